"""Where a study stands: trials per state, its best configuration, whether its workers
live, its real failures and where they were raised; what ``search.status`` shows.

A study is ``running`` if a RUNNING trial's worker is alive (the rule every worker's
reaper uses, :func:`search.sweep.workers.lost.lost_reason`), ``stale`` if RUNNING
trials have no live worker, ``done`` when its finished search trials reach the
target (with a budget in steps, when their steps leave no room for a whole trial more),
``incomplete`` otherwise.
"""

from __future__ import annotations

import os
import re
import sysconfig
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from search.sweep import replicates as rep
from search.sweep import stopping
from search.sweep import studies as st
from search.sweep.workers import bookkeeping, lost

STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")


@dataclass(frozen=True)
class StudyStatus:
    name: str
    counts: dict[str, int]
    target: int | None
    best_value: float | None
    best_params: dict[str, Any]
    alive: int
    stale: int
    verdict: str
    failures: tuple[tuple[str, int], ...] = ()
    best_sd: float | None = None  # over the best configuration's seeds
    best_n: int = 1
    replicates: int = 0  # replicate runs finished (on top of the target)
    # Where each failure was raised (its traceback's last frame outside the service), or "".
    failed_at: tuple[str, ...] = ()
    # The sweep's own FAILs, apart from counts["FAIL"] (search.sweep.workers.bookkeeping).
    requeued: int = 0
    retired: int = 0
    # With a budget in steps: the finished search trials' steps, in whole trials' worth.
    steps: float | None = None
    # What final chose from this study and its test accuracy (the study's user attr
    # ``final``: result.json without the runs), None before final ran on it.
    final: dict[str, Any] | None = None


def liveness(
    running: list[FrozenTrial], *, grace_period: float, now: float | None = None
) -> tuple[int, int]:
    """(alive, stale) counts among the RUNNING trials of a study."""
    now = time.time() if now is None else now
    stale = sum(
        lost.lost_reason(t, grace_period=grace_period, now=now) is not None for t in running
    )
    return len(running) - stale, stale


_FRAME = re.compile(r'^  File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>.+)$', re.M)
# The search package: frames inside it are the service's, not the user's code.
_SERVICE = str(Path(__file__).resolve().parents[1]) + os.sep


# Python's own library and the installed packages (NumPy...): a frame there is where an
# error surfaced, not the line of the user's that caused it.
_LIBRARIES = tuple(
    {
        os.path.realpath(p) + os.sep
        for k in ("stdlib", "platstdlib", "purelib", "platlib")
        if (p := sysconfig.get_paths().get(k))
    }
)


def raised_at(traceback_text: str) -> str:
    """``"my_net.py:31 in train: raise UsageError(...)"``: the last frame of a stored
    traceback in the user's code (outside the search package, Python's library and the
    installed packages; else the last one outside the search package), or "" if there
    is none."""
    frames = [m for m in _FRAME.finditer(traceback_text) if not m["file"].startswith(_SERVICE)]
    own = [m for m in frames if not os.path.realpath(m["file"]).startswith(_LIBRARIES)]
    frames = own or frames
    if not frames:
        return ""
    m = frames[-1]
    code = traceback_text[m.end() :].lstrip("\n").split("\n", 1)[0].strip()
    where = f"{Path(m['file']).name}:{m['line']} in {m['func']}"
    return f"{where}: {code}" if code else where


def _failed_at(study: optuna.Study, reasons: list[tuple[str, int]]) -> tuple[str, ...]:
    """For each reason, where its newest failed trial raised."""
    newest: dict[str, str] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        # The key failure_reasons counts by.
        lines = str(t.user_attrs.get("reason", "no reason recorded")).splitlines()
        newest[_NUMBER.sub("#", (lines or [""])[0][:200])] = str(t.user_attrs.get("traceback", ""))
    return tuple(
        raised_at(newest.get(_NUMBER.sub("#", reason.removesuffix(VARY)), ""))
        for reason, _ in reasons
    )


def failure_reasons(study: optuna.Study, k: int = 3) -> list[tuple[str, int]]:
    """The ``k`` most common reasons of the study's FAILed trials, with their counts.

    Trials failed by the sweep itself (re-queued after an interrupt or a lost
    worker, or retired as not needed) are not failures of the settings
    (:mod:`search.sweep.workers.bookkeeping`).
    """
    counts: Counter[str] = Counter()
    said: dict[str, set[str]] = {}  # the reasons of each kind, as written
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        if bookkeeping.kind(t) is None:
            reason = str(t.user_attrs.get("reason", "no reason recorded")).splitlines()[0][:200]
            kind = _NUMBER.sub("#", reason)  # alike but for the values they name
            counts[kind] += 1
            said.setdefault(kind, set()).add(reason)
    return [
        (min(said[kind]) + (VARY if len(said[kind]) > 1 else ""), n)
        for kind, n in counts.most_common(k)
    ]


VARY = " (values vary)"  # said of a reason whose trials named different values
# A number in a reason: trials that failed alike but for the value they name count as one.
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?")


def standing(
    study: optuna.Study, *, grace_period: float, resume: str, replicates: int = 2
) -> StudyStatus:
    """Where ``study`` stands; ``resume`` is the command that resumes it (said in the
    verdict of a stale or incomplete study). Its best is ranked as the stage's table ranks
    configurations with ``replicates`` (:func:`search.sweep.replicates.configurations`)."""
    name = study.study_name
    trials = study.get_trials(deepcopy=False)
    every = st.counts(study)
    counts = {s: every[s] for s in STATES}
    configs = rep.configurations(trials, replicates=replicates)
    best = configs[0] if configs else None
    n_replicates = sum(rep.is_replicate(t) for t in trials if t.state in st.FINISHED)
    running = [t for t in trials if t.state == TrialState.RUNNING]
    alive, stale = liveness(running, grace_period=grace_period)
    target = study.user_attrs.get("target")
    finished = counts["COMPLETE"] + counts["PRUNED"] - n_replicates
    # the target counts steps: done when no whole trial fits
    steps = st.steps_finished(trials) if st.in_steps(study) else None
    reached = target is not None and (
        finished >= target
        if steps is None
        # or stopped by the rule, which keeps what it has (studies.top_up queues no more)
        else steps > target - 1 + 1e-9 or stopping.stopped(study) is not None
    )
    failures = failure_reasons(study)
    if alive:
        verdict = f"running ({alive} trial(s) with live workers"
        if stale:  # a worker killed while the others go on: they retry its trial
            verdict += (
                f"; {stale} RUNNING without one, which the running workers or {resume} retry"
            )
        verdict += ")"
    elif stale:
        verdict = (
            f"stale ({stale} RUNNING trial(s) without a live worker: run {resume} "
            "again to retry them)"
        )
    elif reached and not counts["WAITING"]:
        stop = stopping.stopped(study)
        verdict = f"done ({stopping.line(stop)})" if stop else "done"
    else:
        verdict = f"incomplete (resume with {resume})"
    return StudyStatus(
        name=name,
        counts=counts,
        target=target,
        best_value=None if best is None else best.mean,
        best_params={} if best is None else dict(best.params),
        best_sd=None if best is None or best.n < 2 else best.sd,
        best_n=0 if best is None else best.n,
        replicates=n_replicates,
        alive=alive,
        stale=stale,
        verdict=verdict,
        failures=tuple(failures),
        failed_at=_failed_at(study, failures),
        requeued=every[bookkeeping.Kind.REQUEUED.name],
        retired=every[bookkeeping.Kind.RETIRED.name],
        steps=steps,
        final=study.user_attrs.get("final"),
    )
