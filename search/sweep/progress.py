"""The progress of a sweep: trials finished of the target, rate, ETA, states, best so far.

The states are Optuna's, with the sweep's own FAILs (:mod:`search.sweep.workers.bookkeeping`)
shown as "re-queued" or "retired", never as "failed". The total follows what
other commands add to this pool's queue or retire from it, so the count of
finished trials never passes it.

On a terminal it is one tqdm line redrawn in place, never wider than the terminal
(its width is read at every redraw, so a resized window is followed and the line
never wraps into broken copies of itself); the bar gets what the numbers leave,
and is left out when that is too little. Elsewhere (a pipe, a log file, CI) it is
one plain line every ``every`` seconds and one at the end.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections import Counter

import optuna
from optuna.trial import TrialState
from tqdm import tqdm

from search.sweep.workers import bookkeeping
from search.sweep.workers.history import FINISHED, History
from search.sweep.workers.storage import storage_of

WITH_BAR = "{n_fmt}/{total_fmt} |{bar}| {desc}"
WITHOUT_BAR = "{n_fmt}/{total_fmt} {desc}"
MIN_BAR = 6  # narrower than this, a bar says nothing: the numbers alone
PLAIN_EVERY_S = 30.0


def rate_text(per_second: float) -> str:
    """Trials per second, or per minute when fewer than one a second (CIFAR-sized trials)."""
    if per_second <= 0:
        return "?/s"
    if per_second >= 1:
        return f"{per_second:.1f}/s"
    return f"{per_second * 60:.1f}/min"


class Progress:
    """Called every half second by the pool while the workers run; :meth:`close` at the end.

    The rate and the ETA are of this run (trials finished before it began are not
    counted), so a resumed sweep does not look faster than it is. The total is
    what the pool's queue holds: finished, running and waiting trials, and those
    that failed during this run. The command has topped the queue up to its target
    before its pool starts, so it is the target (with the replicates), and it
    follows the queue when another command adds replicates that this pool runs or
    retires a duplicate. Trials queued after the workers stopped are not this
    run's: the last line's total is at most the one before (``target`` at first).
    """

    def __init__(
        self, study: optuna.Study, target: int, *, stream=None, every: float = PLAIN_EVERY_S
    ) -> None:
        self.study = study
        # Read at the cost of what changed, not of the queue (a draw every half second).
        # Abstract to mypy only: every method is filled in below the class.
        self.history = History(storage_of(study), look_share=0.0)  # type: ignore[abstract]
        self.target = target
        self.stream = stream if stream is not None else sys.stdout
        self.tty = getattr(self.stream, "isatty", lambda: False)()
        self.every = every
        self.bar: tqdm | None = None
        self.t0 = time.monotonic()
        self.total = target  # the queue's, as of the last count
        self.closing = False
        self.dry = False  # the pool ran dry: what still waits is another command's
        self.first: int | None = None  # trials finished when this run began
        self.failed_before = 0  # real failures when this run began
        self.last_plain = -math.inf
        self.last = ""  # the plain line as of the last call
        self.written = ""  # the plain line last written

    def counts(self) -> Counter:
        """Trials per state name, as :func:`search.sweep.studies.counts` counts them: the
        finished ones as the :class:`History` holds them, the running and waiting ones
        counted by the database."""
        study_id = self.history.get_study_id_from_name(self.study.study_name)
        finished = self.history.get_all_trials(study_id, deepcopy=False, states=FINISHED)
        c = Counter(bookkeeping.state_name(t) for t in finished)
        for state in (TrialState.RUNNING, TrialState.WAITING):
            c[state.name] = self.history.get_n_trials(study_id, state)
        return c

    def __call__(self) -> None:
        c = self.counts()
        done = c["COMPLETE"] + c["PRUNED"]
        if self.first is None:
            self.first, self.failed_before = done, c["FAIL"]
        failed = c["FAIL"] - self.failed_before
        total = done + c["RUNNING"] + c["WAITING"] + failed
        if self.closing:  # replicates another command queued as this pool's queue ran dry
            if self.dry:  # this pool's workers found no trial waiting and stopped
                total -= c["WAITING"]
            # trials queued after the last look are not this run's (the total as of then
            # never dipped below the queue: see below)
            total = max(done, min(total, self.total))
        else:
            # The finished trials come from the history and the others from the database,
            # a moment apart: a trial that finished in between is in neither, and the
            # total would dip below the target. It grows with the queue, never dips.
            total = max(total, self.total)
        self.total = total or self.target
        study_id = self.history.get_study_id_from_name(self.study.study_name)
        best = f"{self.history.get_best_trial(study_id).value:.4f}" if c["COMPLETE"] else "-"
        per_second = (done - self.first) / max(time.monotonic() - self.t0, 1e-9)
        eta = "?"
        if done >= self.total:
            eta = "00:00"
        elif per_second > 0:
            eta = tqdm.format_interval((self.total - done) / per_second)
        states = ", ".join(
            [f"{c['COMPLETE']} complete", f"{c['PRUNED']} pruned", f"{c['FAIL']} failed"]
            + bookkeeping.shown(c)
        )
        if self.tty:
            shown = [f"{c['COMPLETE']} complete"] + [
                text
                for text in [f"{c['PRUNED']} pruned", f"{c['FAIL']} failed"] + bookkeeping.shown(c)
                if not text.startswith("0 ")
            ]
            rate = f"{rate_text(per_second)} ETA {eta}"
            # the longest that fits the terminal; the best value is kept to the last
            texts = [
                f"{rate}, {states}, best {best}",
                f"{rate}, {', '.join(shown)}, best {best}",
                f"{rate}, best {best}",
                f"best {best}",
            ]
            room = self._width() - 1 - len(f"{done}/{self.total} ")
            self._draw(done, next((t for t in texts if len(t) <= room), texts[-1]))
            return
        self.last = (
            f"{done}/{self.total} finished ({states}, {c['RUNNING']} running), "
            f"{rate_text(per_second)}, ETA {eta}, best val acc {best}"
        )
        if time.monotonic() - self.last_plain >= self.every:
            self._write_plain(self.last)

    def _width(self) -> int:
        try:
            return os.get_terminal_size(self.stream.fileno()).columns
        except (AttributeError, OSError, ValueError):
            return int(os.environ.get("COLUMNS", 80))

    def _draw(self, done: int, text: str) -> None:
        ncols = self._width() - 1  # not the last column: some terminals wrap on it
        room = ncols - len(f"{done}/{self.total} || {text}")
        bar_format = WITH_BAR if room >= MIN_BAR else WITHOUT_BAR
        if self.bar is None:
            self.bar = tqdm(
                total=self.total,
                initial=done,
                file=self.stream,
                ncols=ncols,
                ascii=".#",
                bar_format=bar_format,
                desc=text,
                mininterval=0,
                leave=True,
            )
            return
        if ncols < self.bar.ncols:
            # Narrower: tqdm would pad the new line to the old one's length, and the padding
            # would wrap. Clear the row instead and start a fresh status line.
            self.stream.write("\r\x1b[2K")
            self.bar.sp = self.bar.status_printer(self.stream)
        self.bar.ncols, self.bar.bar_format, self.bar.total = ncols, bar_format, self.total
        self.bar.set_description_str(text, refresh=False)
        if done != self.bar.n:
            self.bar.update(done - self.bar.n)
        else:
            self.bar.refresh()

    def _write_plain(self, line: str) -> None:
        self.last_plain = time.monotonic()
        self.written = line
        self.stream.write(line + "\n")
        self.stream.flush()

    def close(self, *, dry: bool = False) -> None:
        """The last state: the bar's final line, or the plain line if it changed.

        ``dry``: the pool ended because its queue ran dry (no stop, no failure). A trial
        waiting then was queued after its workers looked (another command's replicates,
        which that command runs), even if an earlier draw counted it; after a stop, the
        waiting trials are this run's unfinished work and stay in the total.
        """
        self.closing, self.dry = True, dry
        self()
        if self.bar is not None:
            self.bar.close()
        elif self.last and self.last != self.written:
            self._write_plain(self.last)
