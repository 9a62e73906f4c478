"""The storage a worker's trials run with: the study's history for the sampler and the
pruner, read at the cost of what changed, never the queue.

Optuna's sampler and pruner read every trial of the study: TPE once a trial, a
pruner at every report. Behind an RDB storage, Optuna's trial cache answers each
such read by reading every unfinished trial again, the WAITING ones included; with
10,000 trials queued a read cost seconds, and a quick-start sweep of 1,000 trials
ran at 0.35-3.5 trials/s instead of 20. :class:`History` answers them instead:

- A finished trial never changes: it is read once and kept. Before a read is
  answered, one query lists the ids of the finished trials
  (:func:`~search.sweep.workers.storage.finished_trial_ids`; on other storages,
  Optuna's own read of the finished trials), and only the trials not held yet are read.
- That look is skipped while the last one is younger than :data:`LOOK_SHARE` times
  what it cost, so looking never takes more than a tenth of the worker's time:
  another worker's finished trial is seen a few milliseconds later at most. A
  trial this process finished is always seen by the next read.
- RUNNING and WAITING trials are listed only when asked for by state (one query,
  the state filtered by the database; again only once the last one is not recent,
  as above): ``get_all_trials(states=None)`` lists the finished trials, the study's
  history. That is what it is read for here (TPE and the intersection search space
  keep the finished trials of that list; TPE's ``constant_liar``, Optuna's default,
  asks for the RUNNING ones by state), and reading the queue was the cost.
- Every write and every other read goes to the storage itself, with the worker's
  retries, not through Optuna's trial cache: a trial queued by another process
  after this one last looked runs like any other (that cache raised ``KeyError``
  when such a trial set its first parameter).
"""

from __future__ import annotations

import bisect
import copy
import threading
import time
from collections.abc import Callable, Container, Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

from optuna.storages import BaseStorage
from optuna.trial import FrozenTrial, TrialState

from search.sweep.workers.storage import (
    ResilientStorage,
    finished_trial_ids,
    state_counts,
    trial_id,
)

T = TypeVar("T")
FINISHED = (TrialState.COMPLETE, TrialState.PRUNED, TrialState.FAIL)
# A look at which trials finished is skipped while the last one is younger than this many
# times its cost: looking takes at most a tenth of the time.
LOOK_SHARE = 10.0
# More trials to read than this (a study resumed with many finished trials): one query
# reads every finished trial instead of one query each.
BULK = 32


def _number(trial: FrozenTrial) -> int:
    return trial.number


@dataclass
class _Finished:
    """The finished trials of one study that this process holds, by id and by number."""

    by_id: dict[int, FrozenTrial] = field(default_factory=dict)
    ordered: list[FrozenTrial] = field(default_factory=list)
    by_state: dict[TrialState, list[FrozenTrial]] = field(
        default_factory=lambda: {s: [] for s in FINISHED}
    )
    looked_at: float = -float("inf")
    look_cost: float = 0.0
    stale: bool = True  # this process finished a trial since the last look

    def add(self, trials: Iterable[FrozenTrial]) -> None:
        for t in trials:
            if trial_id(t) in self.by_id or not t.state.is_finished():
                continue
            self.by_id[trial_id(t)] = t
            bisect.insort(self.ordered, t, key=_number)
            bisect.insort(self.by_state[t.state], t, key=_number)

    def listed(self, states: tuple[TrialState, ...]) -> list[FrozenTrial]:
        """The trials in ``states`` (finished ones), by number; a new list."""
        if len(states) == len(FINISHED):
            return list(self.ordered)
        if len(states) == 1:
            return list(self.by_state[states[0]])
        return sorted((t for s in states for t in self.by_state[s]), key=_number)


@dataclass
class _Read:
    """Unfinished trials as last read, and when."""

    trials: list[FrozenTrial]
    looked_at: float
    look_cost: float


class History(BaseStorage):
    """``storage`` as the trials of a worker run with it (see the module's docstring).

    Every method of Optuna's storage interface goes to ``storage``'s own storage
    (``storage.backend`` for a :class:`ResilientStorage`, through its retries) but
    :meth:`get_all_trials`, :meth:`get_n_trials`, :meth:`get_best_trial` and
    :meth:`get_trial` of a finished trial, which are answered from what is held.
    """

    def __init__(self, storage: BaseStorage, *, look_share: float = LOOK_SHARE) -> None:
        self.storage = storage
        self.look_share = look_share  # 0: look at every read
        self.backend = getattr(storage, "backend", storage)
        self._finished: dict[int, _Finished] = {}
        # Finished trials read by id (a trial told here, read back by Optuna's tell), for
        # the next look to take instead of reading them again.
        self._read: dict[int, FrozenTrial] = {}
        self._live: dict[tuple[int, tuple[TrialState, ...]], _Read] = {}
        self._studies: dict[str, int] = {}
        self._directions: dict[int, Any] = {}
        self._lock = threading.RLock()

    def call(self, name: str, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        """The storage's own method ``name``, with the worker's retries."""
        return self.retrying(getattr(self.backend, name), *args, **kwargs)

    def retrying(self, method: Callable[..., T], *args, **kwargs) -> T:  # noqa: ANN002, ANN003
        if isinstance(self.storage, ResilientStorage):
            return self.storage.retrying(method, *args, **kwargs)
        return method(*args, **kwargs)

    # Names never change: asked once (Optuna's Study asks them for every study object).
    def get_study_id_from_name(self, study_name: str) -> int:
        if study_name not in self._studies:
            self._studies[study_name] = self.call("get_study_id_from_name", study_name)
        return self._studies[study_name]

    def get_study_directions(self, study_id: int) -> Any:  # noqa: ANN401 - Optuna's type
        if study_id not in self._directions:
            self._directions[study_id] = self.call("get_study_directions", study_id)
        return self._directions[study_id]

    def get_all_trials(
        self,
        study_id: int,
        deepcopy: bool = True,
        states: Container[TrialState] | None = None,
    ) -> list[FrozenTrial]:
        wanted = FINISHED if states is None else tuple(s for s in TrialState if s in states)
        live = tuple(s for s in wanted if s not in FINISHED)
        with self._lock:
            held = self._held(study_id)
            trials = held.listed(tuple(s for s in wanted if s in FINISHED))
            if live:
                # Those finished since the unfinished ones were read are listed once, finished.
                unfinished = self._unfinished(study_id, live)
                trials += [t for t in unfinished if trial_id(t) not in held.by_id]
                trials.sort(key=_number)
        return copy.deepcopy(trials) if deepcopy else trials

    def get_n_trials(
        self, study_id: int, state: tuple[TrialState, ...] | TrialState | None = None
    ) -> int:
        states = (state,) if isinstance(state, TrialState) else state
        if states is not None and all(s in FINISHED for s in states):
            return len(self.get_all_trials(study_id, deepcopy=False, states=states))
        # Counted by the database where it can (Optuna counts by reading every trial).
        counts = state_counts(self.storage, study_id)
        if counts is None:
            return self.call("get_n_trials", study_id, state)
        return sum(n for s, n in counts.items() if states is None or s in states)

    def get_best_trial(self, study_id: int) -> FrozenTrial:
        return super().get_best_trial(study_id)  # from the finished trials held

    def get_trial(self, trial_id: int) -> FrozenTrial:
        with self._lock:
            for held in self._finished.values():
                if trial_id in held.by_id:
                    return held.by_id[trial_id]
            if trial_id in self._read:
                return self._read[trial_id]
        trial = self.call("get_trial", trial_id)
        if trial.state.is_finished():
            with self._lock:
                self._read[trial_id] = trial
        return trial

    def set_trial_state_values(
        self,
        trial_id: int,
        state: TrialState,
        values: Sequence[float] | None = None,
    ) -> bool:
        changed = self.call("set_trial_state_values", trial_id, state=state, values=values)
        if state.is_finished():
            with self._lock:
                for held in self._finished.values():
                    held.stale = True
        return changed

    def _unfinished(self, study_id: int, states: tuple[TrialState, ...]) -> list[FrozenTrial]:
        """The study's trials in ``states`` (unfinished ones), read again unless the last read
        is recent (as :meth:`_held` looks)."""
        start = time.perf_counter()
        last = self._live.get((study_id, states))
        if last is not None and start - last.looked_at < self.look_share * last.look_cost:
            return last.trials
        trials = self.call("get_all_trials", study_id, deepcopy=False, states=states)
        now = time.perf_counter()
        self._live[(study_id, states)] = _Read(trials, looked_at=now, look_cost=now - start)
        return trials

    def _held(self, study_id: int) -> _Finished:
        """The study's finished trials, brought up to date unless the last look is recent."""
        held = self._finished.setdefault(study_id, _Finished())
        start = time.perf_counter()
        if not held.stale and start - held.looked_at < self.look_share * held.look_cost:
            return held
        ids = finished_trial_ids(self.storage, study_id)
        looked = time.perf_counter()
        missing = None if ids is None else [i for i in ids if i not in held.by_id]
        if missing is None or len(missing) > BULK:
            # Not an RDB storage (Optuna's read of the finished trials is the look), or many
            # to read at once.
            held.add(self.call("get_all_trials", study_id, deepcopy=False, states=FINISHED))
            if missing is None:
                looked = time.perf_counter()
        else:
            held.add(
                self._read.pop(i) if i in self._read else self.call("get_trial", i)
                for i in missing
            )
        held.look_cost = looked - start
        held.looked_at = time.perf_counter()
        held.stale = False
        return held


def _delegate(name: str) -> Callable[..., object]:
    def method(self: History, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        return self.call(name, *args, **kwargs)

    method.__name__ = name
    return method


_OWN = {n for n in vars(History) if not n.startswith("_")}
for _name in sorted(BaseStorage.__abstractmethods__) + [
    n for n in vars(BaseStorage) if not n.startswith("_") and callable(getattr(BaseStorage, n))
]:
    if _name not in _OWN:
        setattr(History, _name, _delegate(_name))
History.__abstractmethods__ = frozenset()
