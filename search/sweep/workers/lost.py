"""Who runs a trial, whether that worker is still alive, and retrying the trials of dead ones.

One record says who runs a trial: the system attr ``c2f_owner`` (machine, PID,
process start time, and the time of its last sign of life, renewed by the
worker's heartbeat). One rule, :func:`lost_reason`, says whether that worker is
gone; the reaper of every worker and ``search.status`` both use it.

One rule retries a lost trial, :func:`requeue`: the process that moves the
trial from RUNNING to FAIL (an atomic state change in every storage, so exactly
one process succeeds) is the one that queues its parameters again. A process
that dies between those two steps leaves the trial marked ``c2f_retry = owed``;
:func:`repair_owed_retries` (run by every command before it tops its queue up,
and by ``worker`` joining a study) queues those. Two processes that repair the
same debt at once (or a repair while the dying process's retry is being queued)
each queue a copy; :func:`retire_duplicate_retries`, run after every repair,
keeps the first and retires the others while they wait. So a lost trial is
retried once.
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import socket
import time
from pathlib import Path
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from search.sweep.workers import bookkeeping
from search.sweep.workers.storage import running_trials, trial_id

# The system attrs this module owns.
OWNER = "c2f_owner"
RETRY = "c2f_retry"  # "owed" between failing a lost trial and queueing its retry
MAX_RETRIES_OF_LOST_TRIAL = 3
# A process queues the retry of a trial it failed within milliseconds; a debt older than
# this is one whose process died (a second Ctrl-C), and a repair pays it.
OWED_SETTLE_S = 5.0


@functools.cache
def this_machine() -> str:
    """Names this host, boot and PID namespace: a PID means one process only within it.

    ``C2F_MACHINE``, when set, is added to the name: processes that should count
    as different machines although they share all three.
    """
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):  # not Linux: the host name must do
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    if os.environ.get("C2F_MACHINE"):
        parts.append(os.environ["C2F_MACHINE"])
    return "/".join(parts)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def process_start(pid: int) -> str | None:
    """The start time of a process (clock ticks since boot), or None if it is gone.

    With the PID it identifies one process even when the PID is reused later;
    "" where /proc cannot tell.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def owner_record() -> dict[str, Any]:
    """This process as a trial's owner, alive now (``t`` is renewed by the heartbeat)."""
    pid = os.getpid()
    return {
        "machine": this_machine(),
        "host": socket.gethostname(),
        "pid": pid,
        "start": process_start(pid) or "",
        "t": time.time(),
    }


def owner_gone(owner: dict[str, Any]) -> bool:
    """True if ``owner`` ran on this machine and that process has exited.

    The PID must be gone (``kill(pid, 0)``, which works without /proc), or be
    another process now: a different start time, where /proc tells it.
    """
    if owner.get("machine") != this_machine():
        return False  # another machine's: only its heartbeat can tell
    pid = int(owner["pid"])
    if not pid_alive(pid):
        return True
    start = process_start(pid)
    return bool(owner.get("start")) and bool(start) and start != owner["start"]


def lost_reason(
    trial: FrozenTrial, *, grace_period: float, now: float | None = None
) -> str | None:
    """Why the worker of a RUNNING trial is gone, or None if it may be alive.

    Gone when its process on this machine has exited, or when its last sign of
    life (taking the trial, then every heartbeat) is older than ``grace_period``
    seconds. Clocks of machines that share a storage must agree to well within
    the grace period (as NTP keeps them).
    """
    if trial.state != TrialState.RUNNING:
        return None
    started = trial.datetime_start.timestamp() if trial.datetime_start else None
    return _gone(trial.system_attrs.get(OWNER), started, grace_period=grace_period, now=now)


def _gone(
    owner: dict[str, Any] | None, started: float | None, *, grace_period: float, now: float | None
) -> str | None:
    """:func:`lost_reason` of a RUNNING trial from its owner record and start time."""
    now = time.time() if now is None else now
    if not owner:
        # Taken by a process that died before it could say so (or not by a worker).
        start = started if started is not None else now
        if now - start > grace_period:
            return f"no worker claimed it in {grace_period:g} s"
        return None
    if owner_gone(owner):
        return f"its worker (pid {owner['pid']} on this machine) exited mid-trial"
    silent = now - float(owner.get("t", 0.0))
    if silent > grace_period:
        return (
            f"no heartbeat from its worker (pid {owner['pid']} on {owner.get('host', '?')}) "
            f"for {silent:.0f} s (grace period {grace_period:g} s)"
        )
    return None


def requeue(
    storage: optuna.storages.BaseStorage,
    study_id: int,
    trial: FrozenTrial,
    reason: str,
    *,
    limit: int | None = MAX_RETRIES_OF_LOST_TRIAL,
) -> bool:
    """Fail a RUNNING trial and queue its parameters again; False if another process did.

    ``reason`` is one of :mod:`search.sweep.workers.bookkeeping`'s; the trial is marked
    re-queued there, so no count shows it as failed.

    The state change to FAIL is the claim: only the process whose change
    succeeds queues the retry. ``limit`` bounds the tries in a row of a trial
    that keeps losing its worker (None for an interrupt, which is no fault of
    the trial); past it the trial is failed and not queued again.
    """
    tid = trial_id(trial)
    tries = len(trial.system_attrs.get("retry_history", [])) + 1
    owed = limit is None or tries <= limit
    if not owed:
        reason = bookkeeping.not_retried(reason, tries)
    try:
        # Reason, debt and mark first: a finished trial takes no more attributes.
        storage.set_trial_user_attr(tid, "reason", reason)
        if owed:
            storage.set_trial_system_attr(tid, RETRY, "owed")
            storage.set_trial_system_attr(tid, bookkeeping.ATTR, bookkeeping.Kind.REQUEUED)
        if not storage.set_trial_state_values(tid, state=TrialState.FAIL):
            return False
    except optuna.exceptions.UpdateFinishedTrialError:
        return False  # another process finished or failed it first
    if owed:
        _add_retry(storage, study_id, storage.get_trial(tid))
    return True


IDENTITY_ATTRS = ("replicate",)


def _add_retry(storage: optuna.storages.BaseStorage, study_id: int, failed: FrozenTrial) -> None:
    """Queue a WAITING copy of ``failed``: its params, ``fixed_params``, retry history.

    ``failed_trial`` and ``retry_history`` follow Optuna's retry callback: the first
    trial of the series and every try so far. The owner of the dead run stays behind.
    """
    left = (OWNER, RETRY, bookkeeping.ATTR)
    system_attrs = {k: v for k, v in failed.system_attrs.items() if k not in left}
    system_attrs |= {
        "requeued_from": failed.number,
        "failed_trial": system_attrs.get("failed_trial", failed.number),
        "retry_history": [*system_attrs.get("retry_history", []), failed.number],
    }
    # What the trial is (a replicate's seed index) goes with it; what it did stays behind.
    identity = {k: v for k, v in failed.user_attrs.items() if k in IDENTITY_ATTRS}
    template = optuna.create_trial(
        state=TrialState.WAITING,
        params=failed.params,
        distributions=failed.distributions,
        system_attrs=system_attrs,
        user_attrs=identity,
    )
    storage.create_new_trial(study_id, template_trial=template)


def reap(storage: optuna.storages.BaseStorage, study_id: int, *, grace_period: float) -> list[int]:
    """Fail and retry every RUNNING trial of the study whose worker is gone; their numbers.

    The RUNNING trials and their owner records are read alone
    (:func:`search.sweep.workers.storage.running_trials`: one query, also through a proxy),
    not every trial: every worker reaps before it takes a trial. A trial that looks lost
    is read in full and judged again before it is failed.
    """
    reaped = []
    now = time.time()
    for r in running_trials(storage, study_id, attr=OWNER):
        if _gone(r.owner, r.started, grace_period=grace_period, now=now) is None:
            continue
        try:
            t = storage.get_trial(r.trial_id)
        except KeyError:
            continue  # deleted with its study meanwhile
        reason = lost_reason(t, grace_period=grace_period, now=time.time())
        if reason is not None and requeue(storage, study_id, t, bookkeeping.worker_lost(reason)):
            reaped.append(t.number)
    return reaped


def repair_owed_retries(storage: optuna.storages.BaseStorage, study_id: int) -> list[int]:
    """Queue the retries that a process died before queueing; the failed trials' numbers.

    Runs before a process's workers start. A debt younger than :data:`OWED_SETTLE_S`
    may be one whose process is queueing the retry this moment: it is waited for (a
    command started within seconds of a second Ctrl-C), then read again. A copy another
    process queued at the same time is retired at once (:func:`retire_duplicate_retries`).
    """

    def unpaid() -> list[FrozenTrial]:
        trials = storage.get_all_trials(study_id, deepcopy=False)
        retried = {t.system_attrs.get("requeued_from") for t in trials}
        return [
            t
            for t in trials
            if t.state == TrialState.FAIL
            and t.system_attrs.get(RETRY) == "owed"
            and t.number not in retried
        ]

    owed = unpaid()
    ended = [t.datetime_complete for t in owed if t.datetime_complete is not None]
    if ended:
        settled = max(ended) + datetime.timedelta(seconds=OWED_SETTLE_S)
        wait = (settled - datetime.datetime.now()).total_seconds()
        if wait > 0:
            time.sleep(min(wait, OWED_SETTLE_S))
            owed = unpaid()
    repaired = []
    for t in owed:
        _add_retry(storage, study_id, t)
        repaired.append(t.number)
    if repaired:
        retire_duplicate_retries(storage, study_id)
    return repaired


def retire_duplicate_retries(storage: optuna.storages.BaseStorage, study_id: int) -> list[int]:
    """Fail the WAITING retries of a lost trial queued twice, keeping the first (the
    lowest number, which workers take first); the retired trials' numbers. They count as
    retired, not failed (:mod:`search.sweep.workers.bookkeeping`). Every process that runs
    this keeps the same one, so two at once retire the same copies."""
    seen: set[int] = set()
    retired = []
    trials = storage.get_all_trials(study_id, deepcopy=False)
    for t in sorted(trials, key=lambda t: t.number):
        source = t.system_attrs.get("requeued_from")
        if source is None:
            continue
        if source not in seen:
            seen.add(source)
        elif t.state == TrialState.WAITING:
            if bookkeeping.retire(storage, trial_id(t), bookkeeping.DUPLICATE_RETRY):
                retired.append(t.number)
    return retired


__all__ = [
    "MAX_RETRIES_OF_LOST_TRIAL",
    "OWNER",
    "lost_reason",
    "owner_gone",
    "owner_record",
    "reap",
    "repair_owed_retries",
    "retire_duplicate_retries",
    "requeue",
    "this_machine",
]
