"""The stop rule: end a stage's search when what is left to find is below the seed noise.

After each search trial of the stage, the model of the landscape
(:mod:`search.sweep.surrogate`) bounds how much better than the best configuration
already run any configuration of the stage's ranges can be
(:func:`search.sweep.surrogate.regret_bound`, the bound of Optuna's terminator).
When that bound is below the seed noise of one run, a configuration still to be
found could not be told from the best one already run, so the search stops: its
waiting trials are retired (bookkeeping, not failures) and the stage goes on to its
replicates and its race. The study records when and why (user attr ``stopped``),
and a command run again with the same target does not queue them again; a larger
target than the one it stopped under searches on.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from search.config import space as sp
from search.sweep import studies as st
from search.sweep import surrogate
from search.sweep.narrowing import FROM_COARSE
from search.sweep.replicates import is_replicate
from search.sweep.workers import bookkeeping
from search.sweep.workers.storage import storage_of, trial_id

STOPPED = "stopped"  # study attr: when the search stopped, under which target, and why
# Search trials of the stage's own (not carried over from coarse) that must be finished
# before the rule is asked: the first ones run the configurations the stage starts from.
MIN_OWN_TRIALS = 2
REASON = "not needed: the search stopped, its expected gain below the seed noise"


@dataclass(frozen=True)
class Gain:
    """What the model says is left to find: the bound and the seed noise of one run (both
    in accuracy), over ``runs`` runs."""

    bound: float
    noise: float
    runs: int

    @property
    def below_noise(self) -> bool:
        return self.bound < self.noise

    def describe(self) -> str:
        return (
            f"expected gain at most {100 * self.bound:.2f} points, below the seed noise of "
            f"one run ({100 * self.noise:.2f}) over {self.runs} runs"
        )


def own_search_trials(trials: Sequence[FrozenTrial]) -> list[FrozenTrial]:
    """The stage's own search trials: no replicate, no run carried over from coarse."""
    return [t for t in trials if not is_replicate(t) and FROM_COARSE not in t.user_attrs]


def expected_gain(
    trials: Sequence[FrozenTrial], space: Mapping[str, sp.Range], *, n_val: int | None = None
) -> Gain | None:
    """The bound on what is left to find among ``trials``' runs over ``space``, or None
    when the model has too little to fit."""
    model = surrogate.fit(trials, space, n_val=n_val)
    if model is None:
        return None
    visited, _ = surrogate.observations(trials)
    return Gain(surrogate.regret_bound(model, visited, space), model.noise_sd, model.n_runs)


def due(trials: Sequence[FrozenTrial]) -> bool:
    """Whether the rule may be asked: enough of the stage's own search trials finished,
    and some still waiting (there is something to save)."""
    own = own_search_trials(trials)
    finished = sum(t.state in st.FINISHED for t in own)
    waiting = any(t.state == TrialState.WAITING for t in own)
    return finished >= MIN_OWN_TRIALS and waiting


def stop(study: optuna.Study, gain: Gain) -> dict[str, Any] | None:
    """Retire the stage's waiting search trials and record why (user attr ``stopped``);
    the record, or None when none was left waiting (the workers took the last ones
    meanwhile: the search ended by itself, nothing is recorded).

    The record and the lowered target are written before the first trial is retired:
    a command killed halfway leaves a stop that its rerun completes (its target is the
    lowered one, and :func:`search.sweep.studies.top_up` retires what still waits above
    it). Then the record is written again with what was left: a worker may have taken a
    trial first, and another process may have stopped the same search at once, so the
    trials saved are the asked target minus the one kept.
    """
    storage = storage_of(study)
    trials = study.get_trials(deepcopy=False)
    waiting = [t for t in own_search_trials(trials) if t.state == TrialState.WAITING]
    if not waiting:
        return None
    earlier = stopped(study) or {}
    asked = int(earlier.get("asked") or study.user_attrs.get("target") or 0)
    taken = {t.number for t in waiting}
    kept = _kept(study, [t for t in trials if t.number not in taken])
    record = {
        "asked": asked,
        "target": kept,
        "saved": max(0, asked - kept),
        "bound": gain.bound,
        "noise": gain.noise,
        "runs": gain.runs,
    }
    study.set_user_attr(STOPPED, record)
    study.set_user_attr("target", record["target"])
    for t in waiting:
        bookkeeping.retire(storage, trial_id(t), REASON)  # False: a worker took it first
    trials = study.get_trials(deepcopy=False)
    record["target"] = _kept(study, [t for t in trials if t.state != TrialState.WAITING])
    record["saved"] = max(0, asked - record["target"])
    study.set_user_attr(STOPPED, record)
    study.set_user_attr("target", record["target"])
    return record


def _kept(study: optuna.Study, trials: Sequence[FrozenTrial]) -> int:
    """What ``trials`` count towards a target, as :func:`search.sweep.studies.top_up`
    counts them (finished, running or waiting, replicates aside; with a budget in steps
    their shares), rounded up: a target that queues nothing more."""
    return math.ceil(st.counted_toward(study, trials) - 1e-9)


def stopped(study: optuna.Study) -> dict[str, Any] | None:
    """The study's record of its stop, or None (never stopped, or asked to search on)."""
    return study.user_attrs.get(STOPPED) or None


def line(record: Mapping[str, Any]) -> str:
    """How a stop reads, on the command's screen and in the report."""
    return (
        f"the search stopped at {record['target']} of {record['asked']} trials: "
        f"{Gain(record['bound'], record['noise'], record['runs']).describe()}; "
        f"{record['saved']} trial(s) not run"
    )


def resumed_target(
    study: optuna.Study, target: int, *, enabled: bool, log: Callable[..., None] = print
) -> int:
    """The target a command run again tops the stage up to: the one it stopped at, unless
    ``target`` is larger than the one it stopped under or the rule is no longer
    ``enabled`` (then the record is cleared and the search goes on)."""
    record = stopped(study)
    if record is None:
        return target
    if enabled and target <= int(record["asked"]):
        log(f"{line(record)}; a larger --trials searches on", flush=True)
        return min(target, int(record["target"]))
    study.set_user_attr(STOPPED, None)
    return target


class Stopper:
    """The pool's progress callback with the stop rule: after each finished trial of the
    study, while search trials wait, ask the rule (:func:`expected_gain`); when the
    expected gain is below the seed noise, :func:`stop` the search."""

    def __init__(
        self,
        study: optuna.Study,
        space: Mapping[str, sp.Range],
        progress: Any,
        *,
        log: Callable[..., None] = print,
    ) -> None:
        self.study = study
        self.space = space
        self.progress = progress
        self.log = log
        self.seen = -1  # finished trials when the rule was last asked
        self.done = stopped(study) is not None
        self.last: Gain | None = None  # the rule's last answer, when it did not stop
        self.asked = False

    def __call__(self) -> None:
        if self.progress is not None:
            self.progress()
        if self.done:
            return
        n = self._finished()
        if n == self.seen:
            return
        self.seen = n
        trials = self.study.get_trials(deepcopy=False)
        if not due(trials):
            return
        self.asked = True
        gain = expected_gain(trials, self.space, n_val=surrogate.n_val_of(self.study))
        if gain is None or not gain.below_noise:
            self.last = gain or self.last
            return
        record = stop(self.study, gain)
        self.done = True  # only once stop() has written its record: else asked again
        if record is not None:
            self.log(f"\nstop: {line(record)}", flush=True)
        else:  # the workers took the last waiting trials meanwhile
            self.last = gain

    def summary(self) -> str | None:
        """What the rule said when the search ran to its target: None when it stopped the
        search or was never asked (nothing waited once two trials of the stage's own had
        finished)."""
        if stopped(self.study) is not None:
            return None
        if not self.asked:
            return "stop rule: not asked (no trial waited once the stage had run two)"
        if self.last is None:
            return (
                "stop rule: the search ran to its target; the model of the landscape could "
                f"not be fitted (fewer than {surrogate.MIN_RUNS} runs, or runs that all "
                "scored the same)"
            )
        said = (
            f"the last bound on its expected gain, {100 * self.last.bound:.2f} points, was "
            f"{'below' if self.last.below_noise else 'above'} the seed noise of one run "
            f"({100 * self.last.noise:.2f}) over {self.last.runs} runs"
        )
        if self.last.below_noise:  # it fired when the workers had taken every trial
            said += ", but no trial was left waiting to stop"
        return f"stop rule: the search ran to its target; {said}"

    def _finished(self) -> int:
        """Finished trials of the study, from the progress line's cache when it has one
        (read at the cost of what changed, twice a second)."""
        states = st.FINISHED
        history = getattr(self.progress, "history", None)
        if history is None:
            return len(self.study.get_trials(deepcopy=False, states=states))
        study_id = history.get_study_id_from_name(self.study.study_name)
        return len(history.get_all_trials(study_id, deepcopy=False, states=states))

    def close(self, *, dry: bool) -> None:
        close = getattr(self.progress, "close", None)
        if close is not None:
            close(dry=dry)
