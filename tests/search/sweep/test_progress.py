"""The progress line: fits the terminal, says rate, ETA, states and best; plain without a TTY."""

from __future__ import annotations

import io
import re

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from search.sweep import progress as progress_mod
from search.sweep.progress import Progress, rate_text


class Terminal(io.StringIO):
    """What a terminal of ``columns`` columns receives."""

    def __init__(self, columns: int) -> None:
        super().__init__()
        self.columns = columns

    def isatty(self) -> bool:
        return True

    def lines(self) -> list[str]:
        """Every state the line was drawn in (tqdm redraws after a carriage return)."""
        text = self.getvalue().replace("\x1b[2K", "")  # clear the row: nothing drawn
        return [part for part in re.split(r"[\r\n]", text) if part.strip()]


def queue(study: optuna.Study, target: int) -> None:
    """What a command does before its pool starts: ``target`` trials waiting."""
    for _ in range(target):
        study.enqueue_trial({"l2_lambda": 1e-3})


def add(study: optuna.Study, state: TrialState, value: float | None = None) -> None:
    """A worker takes the next waiting trial and ends it in ``state``."""
    trial = study.ask({"l2_lambda": FloatDistribution(1e-5, 1e-1, log=True)})
    if state == TrialState.PRUNED:
        trial.report(0.5, 1)
    study.tell(trial, value, state=state)


@pytest.fixture
def study() -> optuna.Study:
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    return optuna.create_study(direction="maximize")


@pytest.mark.parametrize("columns", [40, 60, 80, 120, 200])
def test_the_line_fits_the_terminal_and_says_everything(study, monkeypatch, columns):
    term = Terminal(columns)
    monkeypatch.setattr(Progress, "_width", lambda self: term.columns)
    clock = iter(range(0, 10**6, 10))  # 10 s between looks
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: float(next(clock)))
    queue(study, 50)
    p = Progress(study, 50, stream=term)
    p()
    for i in range(20):
        add(study, TrialState.COMPLETE, 0.5 + i / 100)
        add(study, TrialState.PRUNED)
    add(study, TrialState.FAIL)
    p()
    p.close()
    lines = term.lines()
    assert len(lines) >= 2
    assert all(len(line) <= columns - 1 for line in lines), [len(x) for x in lines]
    last = lines[-1]
    if columns >= 80:  # the whole text, with a bar from 80 columns up
        assert re.match(r"40/50 \|#+\.+\| ", last), last  # 80 %
        # 40 trials in the 30 s since it began: the rate of this run, and the ETA of 10 more
        assert last.endswith("| 1.3/s ETA 00:07, 20 complete, 20 pruned, 1 failed, best 0.6900")
    else:  # shortened to fit, never wrapped, and the best value kept
        assert last.startswith("40/50") and last.endswith(" 1.3/s ETA 00:07, best 0.6900"), last


def test_a_narrow_line_drops_the_states_at_zero_first(study, monkeypatch):
    term = Terminal(50)
    monkeypatch.setattr(Progress, "_width", lambda self: term.columns)
    queue(study, 50)
    p = Progress(study, 50, stream=term)
    add(study, TrialState.COMPLETE, 0.7)
    p()
    last = term.lines()[-1]
    assert last.endswith(", 1 complete, best 0.7000") and "0 pruned" not in last, last


def test_the_total_never_dips_below_the_queue_while_it_runs(study, monkeypatch):
    """The finished trials come from the history and the rest from the database: a
    trial that finished between the two reads is in neither, and the total must not
    dip below the target for it."""
    term = io.StringIO()
    queue(study, 10)
    p = Progress(study, 10, stream=term, every=0)
    p()
    real = p.counts

    def a_moment_apart():
        c = real()
        c["WAITING"] -= 1  # taken and finished since the history was read
        return c

    monkeypatch.setattr(p, "counts", a_moment_apart)
    p()
    assert p.total == 10 and "0/10 finished" in term.getvalue().splitlines()[-1]


def test_the_bar_follows_a_resized_terminal(study, monkeypatch):
    term = Terminal(120)
    monkeypatch.setattr(Progress, "_width", lambda self: term.columns)
    queue(study, 10)
    p = Progress(study, 10, stream=term)
    p()
    term.columns = 50
    add(study, TrialState.COMPLETE, 0.9)
    p()
    assert len(term.lines()[-1]) <= 49 and "\r\x1b[2K" in term.getvalue()


def test_without_a_terminal_one_plain_line_now_and_then(study, monkeypatch):
    out = io.StringIO()
    now = [0.0]
    monkeypatch.setattr(progress_mod.time, "monotonic", lambda: now[0])
    queue(study, 4)
    p = Progress(study, 4, stream=out, every=30)
    p()
    for t in range(1, 20):  # called every second: no line until 30 s have passed
        now[0] = float(t)
        p()
    add(study, TrialState.COMPLETE, 0.8)
    now[0] = 30.0
    p()
    add(study, TrialState.PRUNED)
    now[0] = 40.0
    p.close()
    lines = out.getvalue().splitlines()
    assert len(lines) == 3 and "\r" not in out.getvalue()
    assert lines[0].startswith("0/4 finished (0 complete, 0 pruned, 0 failed, 0 running)")
    assert lines[1].startswith("1/4 finished (1 complete, 0 pruned, 0 failed, 0 running), 2.0/min")
    assert lines[2] == (
        "2/4 finished (1 complete, 1 pruned, 0 failed, 0 running), 3.0/min, ETA 00:40, "
        "best val acc 0.8000"
    )


def test_rates_are_per_second_or_per_minute():
    assert rate_text(0) == "?/s" and rate_text(2.5) == "2.5/s" and rate_text(0.05) == "3.0/min"
