"""The sweep's own FAILs: trials it re-queued or retired, which are no failure of the settings.

Optuna has no finished state for "not run after all", so the sweep ends two
kinds of trial as FAIL that say nothing about the settings:

- **re-queued**: an interrupt (Ctrl-C, SIGTERM) or a lost worker stopped the
  trial and a WAITING copy of it was queued (:func:`search.sweep.workers.lost.requeue`);
- **retired**: the trial was not needed after all, a second copy of a replicate
  queued by two commands at once, or a WAITING trial beyond a lowered target.

Each is marked when it is made, by the system attr ``c2f_retired`` (:data:`ATTR`)
with its :class:`Kind`, written before the state change (a finished trial takes
no more attributes). Studies from before the mark are recognised by the reason
they recorded (:func:`kind`). The reasons' texts are made here and nowhere else.
Every count and line a user reads (the progress line, the commands' last lines,
``status``, the report) counts these apart from real failures
(:func:`search.sweep.studies.counts`); a trial lost more often than it may be
retried is a real failure, with its reason.
"""

from __future__ import annotations

import enum
from collections.abc import Mapping

import optuna
from optuna.trial import FrozenTrial, TrialState

from search.sweep.workers.storage import claim

ATTR = "c2f_retired"


class Kind(enum.StrEnum):
    """What the sweep did with one of its own FAILs; the value is stored in :data:`ATTR`."""

    REQUEUED = "requeued"  # stopped, and a WAITING copy queued
    RETIRED = "retired"  # not needed: a duplicate replicate, over the target

    @property
    def label(self) -> str:
        """How a count of them reads: "3 re-queued", "1 retired"."""
        return "re-queued" if self is Kind.REQUEUED else "retired"


def interrupted(signal_name: str) -> str:
    """The reason of a trial re-queued because its worker was asked to stop."""
    return f"interrupted ({signal_name})"


def worker_lost(why: str) -> str:
    """The reason of a trial re-queued because its worker is gone."""
    return f"worker lost: {why}"


def not_retried(reason: str, tries: int) -> str:
    """The reason of a lost trial that is not queued again: a real failure."""
    return f"{reason} (not retried: lost {tries} times in a row)"


DUPLICATE_REPLICATE = "not needed: duplicate replicate"
DUPLICATE_RETRY = "not needed: duplicate retry"  # two processes repaired one owed retry


def over_target(target: int) -> str:
    """The reason of a WAITING trial retired because it is over the target: the target was
    lowered below it, or two commands that started at once both queued it."""
    return f"not needed: over the target of {target} (lowered, or queued by two commands at once)"


def retire(storage: optuna.storages.BaseStorage, trial_id: int, reason: str) -> bool:
    """End a WAITING trial that is not needed after all as a retired FAIL with ``reason``
    (one of this module's); False when a worker took it meanwhile (it runs on).

    First taken from the queue as a worker takes one (:func:`claim`: WAITING to RUNNING
    in one step, marked retired), so a trial a worker has just started is never ended
    under it."""
    if not claim(storage, trial_id, {ATTR: Kind.RETIRED}):
        return False
    try:
        storage.set_trial_user_attr(trial_id, "reason", reason)
        return storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
    except optuna.exceptions.UpdateFinishedTrialError:
        return False


# Studies made before ATTR existed: the reasons above, as they were recorded.
_RECORDED = (
    ("interrupted (", Kind.REQUEUED),
    ("worker lost: ", Kind.REQUEUED),
    ("not needed: ", Kind.RETIRED),
)


def kind(trial: FrozenTrial) -> Kind | None:
    """The :class:`Kind` of a FAIL the sweep made itself; None for a real failure and for
    every trial in another state."""
    if trial.state != TrialState.FAIL:
        return None
    marked = trial.system_attrs.get(ATTR)
    if marked is not None:
        return Kind(marked)
    reason = str(trial.user_attrs.get("reason", ""))
    if "(not retried: " in reason:
        return None
    return next((k for prefix, k in _RECORDED if reason.startswith(prefix)), None)


def state_name(trial: FrozenTrial) -> str:
    """The trial's state name, with the sweep's own FAILs as ``REQUEUED`` or ``RETIRED``."""
    k = kind(trial)
    return trial.state.name if k is None else k.name


def shown(counts: Mapping[str, int]) -> list[str]:
    """``["18 re-queued", "2 retired"]``: the kinds that occur in ``counts`` (of
    :func:`search.sweep.studies.counts`), to show after the real states; none is shown
    when there are none."""
    return [f"{counts[k.name]} {k.label}" for k in Kind if counts.get(k.name)]


__all__ = [
    "ATTR",
    "DUPLICATE_REPLICATE",
    "DUPLICATE_RETRY",
    "Kind",
    "interrupted",
    "kind",
    "not_retried",
    "retire",
    "shown",
    "state_name",
    "over_target",
    "worker_lost",
]
