"""The progress of a sweep: trials finished of the target, rate, ETA, states, best so far.

On a terminal it is one tqdm line redrawn in place, as wide as the terminal (followed
when the window is resized, so it never wraps and leaves broken lines behind).
Elsewhere (a pipe, a log file, CI) it is one plain line every ``every`` seconds and
one at the end.
"""

from __future__ import annotations

import math
import sys
import time

import optuna
from tqdm import tqdm

from search.sweep.studies import counts

# ``{postfix}`` is the states and the best value; tqdm sizes ``{bar}`` to what is left
# of the terminal's width and cuts the line at the edge if even that is too much.
BAR_FORMAT = "{n_fmt}/{total_fmt} |{bar}| {rate_fmt} ETA {remaining} | {postfix}"
PLAIN_EVERY_S = 30.0


class Progress:
    """Called every half second by the pool while the workers run; :meth:`close` at the end."""

    def __init__(
        self, study: optuna.Study, target: int, *, stream=None, every: float = PLAIN_EVERY_S
    ) -> None:
        self.study = study
        self.target = target
        self.stream = stream if stream is not None else sys.stdout
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.every = every
        self.bar: tqdm | None = None
        self.t0 = time.monotonic()
        self.first: int | None = None  # trials finished when this run began
        self.last_plain = -math.inf
        self.last = ""  # the plain line as of the last call
        self.written = ""  # the plain line last written

    def __call__(self) -> None:
        c = counts(self.study)
        done = c["COMPLETE"] + c["PRUNED"]
        best = f"{self.study.best_value:.4f}" if c["COMPLETE"] else "-"
        states = f"{c['COMPLETE']} complete, {c['PRUNED']} pruned, {c['FAIL']} failed"
        if self.first is None:
            self.first = done
        if self.tty:
            self._draw(done, f"{states} | best {best}")
            return
        now = time.monotonic()
        rate = (done - self.first) / max(now - self.t0, 1e-9)
        eta = "?"
        if rate > 0 and done < self.target:
            eta = tqdm.format_interval((self.target - done) / rate)
        line = (
            f"{done}/{self.target} finished ({states}, {c['RUNNING']} running), "
            f"{rate * 60:.1f} trials/min, ETA {eta}, best val acc {best}"
        )
        self.last = line
        if now - self.last_plain >= self.every:
            self._write_plain(line)

    def _draw(self, done: int, postfix: str) -> None:
        if self.bar is None:
            self.bar = tqdm(
                total=self.target,
                initial=done,
                file=self.stream,
                dynamic_ncols=True,
                ascii=".#",
                unit="trial",
                bar_format=BAR_FORMAT,
                mininterval=0,
                leave=True,
            )
        self.bar.set_postfix_str(postfix, refresh=False)
        if done != self.bar.n:
            self.bar.update(done - self.bar.n)
        else:
            self.bar.refresh()

    def _write_plain(self, line: str) -> None:
        self.last_plain = time.monotonic()
        self.written = line
        self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        """The last state: the bar's final line, or the plain line if it changed."""
        self()
        if self.bar is not None:
            self.bar.close()
        elif self.last and self.last != self.written:
            self._write_plain(self.last)
