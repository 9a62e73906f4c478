"""The worker loop: take a queued trial, run it, tell its result; the only one there is.

Every command that trains (coarse, fine, experiment, ``search.worker``) runs
this loop in worker processes started by :mod:`search.sweep.workers.pool`.

Signals (:mod:`search.sweep.workers.signals`) raise :class:`Interrupted` only while
the objective trains and no storage code is on the stack; between steps the
loop looks at the flag. So a signal never interrupts a storage write, and the
running trial is re-queued exactly once, by normal code, before the worker
returns.
"""

from __future__ import annotations

import contextlib
import functools
import os
import random
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass

import optuna
from optuna.trial import TrialState

from search.sweep.workers import bookkeeping, lost
from search.sweep.workers.history import History
from search.sweep.workers.signals import Interrupted, StopFlag
from search.sweep.workers.storage import (
    ResilientStorage,
    StorageError,
    StorageUnavailable,
    claim,
    running_trials,
    waiting_trial_ids,
)


class TrialLost(Exception):  # noqa: N818
    """This worker's trial was finished by another process (it took this one for dead)."""


@dataclass
class Sweep:
    """What one worker needs to run a study's queue."""

    storage: ResilientStorage
    study: optuna.Study
    objective: Callable[[optuna.Trial], float]
    heartbeat_interval: float
    grace_period: float
    poll: float = 1.0  # seconds between looks at the queue while others finish

    @functools.cached_property
    def study_id(self) -> int:
        return self.storage.get_study_id_from_name(self.study.study_name)

    @functools.cached_property
    def history(self) -> History:
        """The storage the worker's trials run with and its reaper reads
        (:class:`~search.sweep.workers.history.History`)."""
        # Abstract to mypy only: every method is filled in below the class.
        return History(self.storage)  # type: ignore[abstract]

    @functools.cached_property
    def trials_study(self) -> optuna.Study:
        """The study as its trials see it: the same sampler and pruner, reading
        :attr:`history`."""
        return optuna.Study(
            self.study.study_name,
            storage=self.history,
            sampler=self.study.sampler,
            pruner=self.study.pruner,
        )


class Heartbeat:
    """Renews the owner record of a running trial every ``interval`` seconds.

    A beat that finds the trial finished (another worker took this one for dead,
    after a stop or a network partition) sets ``lost``; the objective's next
    report then ends the trial here. Beats go to the storage behind the
    :class:`ResilientStorage`, without its retries and its log: while the database
    is away the worker's own calls retry and say so, once.
    """

    def __init__(self, storage: ResilientStorage, tid: int, owner: dict, interval: float) -> None:
        self.storage, self.tid, self.owner, self.interval = storage, tid, owner, interval
        self.lost = False
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name=f"heartbeat-{tid}", daemon=True)

    def __enter__(self) -> Heartbeat:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        self._thread.join()

    def _run(self) -> None:
        # One try a beat: a beat that fails is retried at the next one. Retrying here too
        # would log each outage twice, from this thread and from the worker's.
        storage = self.storage.backend
        while not self._done.wait(self.interval):
            try:
                storage.set_trial_system_attr(
                    self.tid, lost.OWNER, {**self.owner, "t": time.time()}
                )
            except optuna.exceptions.UpdateFinishedTrialError:
                self.lost = True
                return
            except Exception:  # noqa: BLE001 - a missed beat is retried at the next one
                continue


# A take tries the oldest WAITING trial, then up to TAKE_TRIES - 1 others drawn from the
# next TAKE_WINDOW: hundreds of workers that ask at once (through a proxy, all their
# trials end together) each try a different trial, instead of all trying the same eight
# and waiting when they lose.
TAKE_WINDOW = 256
TAKE_TRIES = 8


def take(storage: ResilientStorage, study_id: int) -> int | None:
    """Pop a WAITING trial and claim it with this worker's owner record, atomically (one
    worker only gets it, :func:`~search.sweep.workers.storage.claim`); its id.

    Where the storage takes two steps for it (a journal file), a worker killed between
    them leaves a trial that no one claims; :func:`search.sweep.workers.lost.lost_reason`
    takes it for lost after the grace period. Signals never fall between them (the loop
    is not interruptible there).
    """
    waiting = waiting_trial_ids(storage, study_id, limit=TAKE_WINDOW)
    others = random.sample(waiting[1:], min(TAKE_TRIES - 1, max(0, len(waiting) - 1)))
    for tid in waiting[:1] + others:
        if claim(storage, tid, {lost.OWNER: lost.owner_record()}):
            return tid
    return None


def worker_log(line: str) -> None:
    """One line of a worker's log, on stderr, naming the worker."""
    print(f"worker {os.getpid()}: {line}", file=sys.stderr, flush=True)


def _reason(exc: BaseException) -> str:
    if isinstance(exc, SystemExit):
        return (
            f"SystemExit: the trial's code called sys.exit({exc.code!r}) (or exit()); "
            "return the result instead"
        )
    return f"{type(exc).__name__}: {exc}"


def run_queue(
    sweep: Sweep,
    stop: StopFlag,
    *,
    log: Callable[[str], None] = worker_log,
    on_trial_end: Callable[[], None] | None = None,
) -> int:
    """Take and run trials until none is waiting or running, or ``stop``; how many ran.

    While other workers still run trials and none is waiting, wait: a dead
    worker's trial comes back to the queue. A trial that fails records its
    exception and traceback (user attrs ``reason``, ``traceback``) and the sweep
    goes on. A trial finished meanwhile by another worker is dropped with one
    line of log. :class:`Interrupted` (or a stop seen between steps) re-queues
    the running trial and returns.
    """
    storage = sweep.storage
    study_id = sweep.study_id
    storage.should_stop = lambda: bool(stop)
    ran = idle = 0
    reap_at = 0.0  # when to look for lost trials next
    while not stop:
        try:
            # A lost trial is one whose worker stayed silent for the grace period: looking
            # once a heartbeat interval finds it as soon, and before the queue looks empty.
            if idle or time.monotonic() >= reap_at:
                lost.reap(storage, study_id, grace_period=sweep.grace_period)
                reap_at = time.monotonic() + sweep.heartbeat_interval
            tid = take(storage, study_id)
            if tid is None:
                running = running_trials(storage, study_id, attr=lost.OWNER)
        except StorageUnavailable as exc:
            if not stop:
                log(f"{exc}; trying again")
            continue
        if tid is None:
            if not running:
                return ran
            # The others' last trials usually end within a second: look again soon,
            # then every ``sweep.poll`` seconds.
            stop.wait(min(sweep.poll, 0.05 * 1.5 ** min(idle, 20)))
            idle += 1
            continue
        idle = 0
        if stop:
            _give_back(storage, study_id, tid, stop)
            break
        if _run_one(sweep, tid, stop, log):
            ran += 1
            if on_trial_end is not None:
                on_trial_end()
    return ran


def _run_one(sweep: Sweep, tid: int, stop: StopFlag, log: Callable[[str], None]) -> bool:
    """Run and tell one trial this worker has taken; False if it was dropped or given back."""
    storage, study, study_id = sweep.storage, sweep.trials_study, sweep.study_id
    trial = optuna.Trial(study, tid)
    owner = lost.owner_record()  # what take() wrote; the heartbeat renews its time
    value: float | None = None
    state: TrialState | None = None
    with Heartbeat(storage, tid, owner, sweep.heartbeat_interval) as beat:
        try:
            with stop.allowed():
                value = sweep.objective(_Watched(trial, beat))  # type: ignore[arg-type]
        except Interrupted:
            _give_back(storage, study_id, tid, stop)
            return False
        except optuna.TrialPruned:
            state = TrialState.PRUNED
        except (TrialLost, optuna.exceptions.UpdateFinishedTrialError):
            log(f"dropped trial {trial.number}: {_ended_elsewhere(sweep, tid)}")
            return False
        except StorageUnavailable as exc:
            log(f"dropped trial {trial.number}: {exc}")
            return False
        except StorageError:
            # The storage, not the trial, failed (a full disk): the worker stops; the trial
            # stays RUNNING and is retried, with the same parameters, as a lost one.
            raise
        # A failed trial must not stop the sweep. SystemExit too: the user's code calling
        # sys.exit() would end the worker, and its trial would be retried, and fail, again
        # and again. Not KeyboardInterrupt: code that put Python's own SIGINT handler back
        # turns a real Ctrl-C into one, and that trial must be given back, not failed.
        except (Exception, SystemExit) as exc:  # noqa: BLE001
            state = TrialState.FAIL
            try:
                storage.set_trial_user_attr(tid, "reason", _reason(exc))
                storage.set_trial_user_attr(tid, "traceback", traceback.format_exc()[-4000:])
            except optuna.exceptions.UpdateFinishedTrialError:
                log(f"dropped trial {trial.number}: another worker finished it meanwhile")
                return False
    if stop and state is None and value is None:
        _give_back(storage, study_id, tid, stop)
        return False
    try:
        try:
            study.tell(trial, value, state=state)
        except (ValueError, optuna.exceptions.UpdateFinishedTrialError):
            # Optuna refuses to tell a finished trial (ValueError before its write,
            # UpdateFinishedTrialError at it): another worker took this one for lost.
            if not sweep.history.get_trial(tid).state.is_finished():
                raise
            log(f"dropped trial {trial.number}: {_ended_elsewhere(sweep, tid)}")
            return False
    except StorageUnavailable as exc:
        log(f"dropped trial {trial.number}: {exc}")
        return False
    return True


def _ended_elsewhere(sweep: Sweep, tid: int) -> str:
    """Why this worker's trial was finished by another process, as the trial says it."""
    with contextlib.suppress(Exception):  # only words for a log line
        frozen = sweep.history.get_trial(tid)
        if bookkeeping.kind(frozen) is bookkeeping.Kind.REQUEUED:
            why = str(frozen.user_attrs.get("reason", "")).splitlines()[0]
            return (
                f"another process took it for lost and queued a copy ({why}); its result "
                "is not kept"
            )
    return "another worker finished it meanwhile"


def _give_back(storage: ResilientStorage, study_id: int, tid: int, stop: StopFlag) -> None:
    """Re-queue a trial this worker took, because it was asked to stop."""
    name = signal.Signals(stop.signum).name if stop.signum else "stop"
    with contextlib.suppress(StorageUnavailable):
        storage.should_stop = lambda: False  # a few seconds' patience for this last write
        storage.patience, patience = min(storage.patience, 5.0), storage.patience
        try:
            frozen = storage.get_trial(tid)
            if not frozen.state.is_finished():
                reason = bookkeeping.interrupted(name)
                lost.requeue(storage, study_id, frozen, reason, limit=None)
        finally:
            storage.patience = patience


class _Watched:
    """The trial as the objective sees it: its reports end a trial another worker finished."""

    def __init__(self, trial: optuna.Trial, beat: Heartbeat) -> None:
        self._trial, self._beat = trial, beat

    def __getattr__(self, name: str):  # noqa: ANN204 - everything else is the trial's
        return getattr(self._trial, name)

    def report(self, value: float, step: int) -> None:
        if self._beat.lost:
            raise TrialLost(f"trial {self._trial.number}")
        self._trial.report(value, step)
