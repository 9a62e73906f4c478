"""A one-line progress report of a sweep, redrawn in place on a terminal."""

from __future__ import annotations

import sys

import optuna

from search.sweep.studies import counts


class Progress:
    """A one-line progress report: trials finished of the target, best so far."""

    def __init__(self, study: optuna.Study, target: int, *, stream=None) -> None:
        self.study = study
        self.target = target
        self.stream = stream if stream is not None else sys.stdout
        self.last = ""
        self.tty = getattr(self.stream, "isatty", lambda: False)()

    def __call__(self) -> None:
        c = counts(self.study)
        done = c["COMPLETE"] + c["PRUNED"]
        best = "-"
        if c["COMPLETE"]:
            best = f"{self.study.best_value:.4f}"
        width = 30
        filled = int(width * min(done, self.target) / max(self.target, 1))
        line = (
            f"[{'#' * filled}{'.' * (width - filled)}] {done}/{self.target} finished "
            f"({c['COMPLETE']} complete, {c['PRUNED']} pruned, {c['FAIL']} failed, "
            f"{c['RUNNING']} running)  best val acc {best}"
        )
        if line == self.last:
            return
        self.last = line
        if self.tty:
            self.stream.write("\r" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        self()
        if self.tty and self.last:
            self.stream.write("\n")
            self.stream.flush()
