"""The sweep's contract, run the same on every storage kind (SQLite, journal file, PostgreSQL).

A queued trial is taken exactly once; a lost trial is retried once; the target
is never overshot; a worker whose trial was finished elsewhere goes on; a
signal re-queues the running trial once and never interrupts a storage write.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from search.sweep import studies as st
from search.sweep.studies import top_up
from search.sweep.workers import bookkeeping, lost
from search.sweep.workers.loop import Sweep, run_queue, take
from search.sweep.workers.signals import Interrupted, StopFlag, signals_recorded
from search.sweep.workers.storage import (
    ResilientStorage,
    StorageUnavailable,
    is_transient,
    make_storage,
    release,
    storage_of,
    trial_id,
    waiting_trial_ids,
)

FORK = multiprocessing.get_context("fork")
PARAMS = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}


def new_study(url: str, name: str = "contract") -> tuple[ResilientStorage, optuna.Study, int]:
    storage = make_storage(url)
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize")
    return storage, study, storage.get_study_id_from_name(name)


def objective(trial) -> float:
    x = trial.suggest_float("x", 0.0, 1.0)
    trial.report(x, 1)
    return x


def sweep_of(storage, study, fn=objective, *, grace: float = 30.0) -> Sweep:
    return Sweep(storage, study, fn, heartbeat_interval=1.0, grace_period=grace, poll=0.05)


def dead_pid() -> int:
    probe = subprocess.Popen([sys.executable, "-c", "pass"])
    probe.wait()
    return probe.pid


def lose_a_trial(storage, study_id: int, x: float) -> int:
    """A trial taken by a process that has exited since (as after a SIGKILL)."""
    storage.create_new_trial(
        study_id,
        template_trial=optuna.create_trial(
            state=TrialState.WAITING, params={"x": x}, distributions=PARAMS
        ),
    )
    tid = take(storage, study_id)
    assert tid is not None
    storage.set_trial_system_attr(tid, lost.OWNER, {**lost.owner_record(), "pid": dead_pid()})
    return tid


def in_processes(n: int, target, *args) -> None:
    procs = [FORK.Process(target=target, args=(*args, i)) for i in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0


def _drain(url: str, out: Path, i: int) -> None:
    storage = make_storage(url)
    sid = storage.get_study_id_from_name("contract")
    taken = []
    while (tid := take(storage, sid)) is not None:
        taken.append(tid)
    (out / f"{i}.json").write_text(json.dumps(taken))


def test_a_queued_trial_is_taken_exactly_once(any_storage_url, tmp_path):
    storage, study, sid = new_study(any_storage_url)
    for _ in range(30):
        study.enqueue_trial({})
    release(storage)
    in_processes(3, _drain, any_storage_url, tmp_path)
    taken = [tid for i in range(3) for tid in json.loads((tmp_path / f"{i}.json").read_text())]
    assert sorted(taken) == sorted(trial_id(t) for t in study.get_trials())
    assert len(set(taken)) == len(taken) == 30
    # Each taken trial names its worker: one record of who runs it.
    owners = {t.system_attrs[lost.OWNER]["pid"] for t in study.get_trials()}
    assert len(owners) <= 3 and os.getpid() not in owners


def _reap(url: str, i: int) -> None:
    storage = make_storage(url)
    lost.reap(storage, storage.get_study_id_from_name("contract"), grace_period=60)


def test_a_lost_trial_is_retried_once_however_many_reap_it(any_storage_url):
    storage, study, sid = new_study(any_storage_url)
    lost_ids = [lose_a_trial(storage, sid, x / 10) for x in range(8)]
    release(storage)
    in_processes(3, _reap, any_storage_url)
    trials = study.get_trials()
    for tid in lost_ids:
        frozen = storage.get_trial(tid)
        assert frozen.state == TrialState.FAIL
        assert "worker lost" in frozen.user_attrs["reason"]
        retries = [t for t in trials if t.system_attrs.get("requeued_from") == frozen.number]
        assert len(retries) == 1 and retries[0].state == TrialState.WAITING
        assert retries[0].params == frozen.params
        assert lost.OWNER not in retries[0].system_attrs


def test_a_retry_owed_by_a_process_that_died_is_queued_once(any_storage_url, monkeypatch):
    monkeypatch.setattr(lost, "OWED_SETTLE_S", 0.0)  # the debt is old enough at once
    storage, study, sid = new_study(any_storage_url)
    tid = lose_a_trial(storage, sid, 0.5)
    # Died between failing the trial and queueing its retry.
    storage.set_trial_system_attr(tid, lost.RETRY, "owed")
    storage.set_trial_state_values(tid, state=TrialState.FAIL)
    top_up(study, 1)
    top_up(study, 1)
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[1].params == {"x": 0.5} and trials[1].system_attrs["requeued_from"] == 0


@pytest.mark.parametrize("payer", ["the failing process", "nobody"])
def test_a_fresh_debt_is_waited_for_then_paid_once(any_storage_url, monkeypatch, payer):
    """A debt younger than OWED_SETTLE_S may be one whose process is queueing the retry
    this moment: the repair waits for it to settle, then pays it only if still unpaid."""
    monkeypatch.setattr(lost, "OWED_SETTLE_S", 0.4)
    storage, study, sid = new_study(any_storage_url)
    tid = lose_a_trial(storage, sid, 0.5)
    storage.set_trial_system_attr(tid, lost.RETRY, "owed")
    storage.set_trial_state_values(tid, state=TrialState.FAIL)
    if payer == "nobody":  # it died: the repair pays, after the wait
        assert lost.repair_owed_retries(storage, sid) == [0]
    else:  # alive: it queues the retry while the repair waits
        failed = storage.get_trial(tid)
        timer = threading.Timer(0.05, lost._add_retry, (storage, sid, failed))
        timer.start()
        assert lost.repair_owed_retries(storage, sid) == []
        timer.join()
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING]
    assert trials[1].system_attrs["requeued_from"] == 0


def test_two_repairs_of_one_debt_at_once_leave_one_retry(any_storage_url, monkeypatch):
    """Two processes (workers joining a study) each see the debt unpaid and queue a retry:
    the second copy is retired while it waits, whichever process looks."""
    monkeypatch.setattr(lost, "OWED_SETTLE_S", 0.0)
    storage, study, sid = new_study(any_storage_url)
    tid = lose_a_trial(storage, sid, 0.5)
    storage.set_trial_system_attr(tid, lost.RETRY, "owed")  # as lost.requeue marks it
    storage.set_trial_system_attr(tid, bookkeeping.ATTR, bookkeeping.Kind.REQUEUED)
    storage.set_trial_state_values(tid, state=TrialState.FAIL)
    lost._add_retry(storage, sid, storage.get_trial(tid))  # the other process's repair
    lost._add_retry(storage, sid, storage.get_trial(tid))  # this one's, at the same moment
    assert lost.retire_duplicate_retries(storage, sid) == [2]
    assert lost.retire_duplicate_retries(storage, sid) == []  # the other process's look
    trials = study.get_trials()
    assert [bookkeeping.state_name(t) for t in trials] == ["REQUEUED", "WAITING", "RETIRED"]
    assert trials[2].user_attrs["reason"] == bookkeeping.DUPLICATE_RETRY
    counts = st.counts(study)
    assert counts["FAIL"] == 0 and counts["WAITING"] == 1, counts


def test_retries_stop_after_three_losses_in_a_row(any_storage_url):
    storage, study, sid = new_study(any_storage_url)
    lose_a_trial(storage, sid, 0.5)
    for _ in range(lost.MAX_RETRIES_OF_LOST_TRIAL + 1):
        lost.reap(storage, sid, grace_period=60)
        tid = take(storage, sid)
        if tid is None:
            break
        storage.set_trial_system_attr(tid, lost.OWNER, {**lost.owner_record(), "pid": dead_pid()})
    trials = study.get_trials()
    assert len(trials) == 1 + lost.MAX_RETRIES_OF_LOST_TRIAL
    assert all(t.state == TrialState.FAIL for t in trials)
    assert "not retried: lost 4 times in a row" in trials[-1].user_attrs["reason"]
    assert trials[-1].system_attrs["retry_history"] == [0, 1, 2]


def test_the_target_is_never_overshot(any_storage_url):
    storage, study, sid = new_study(any_storage_url)
    assert top_up(study, 6) == 6
    # Run again with a lower target: the queue shrinks to it.
    assert top_up(study, 3) == 0
    assert run_queue(sweep_of(storage, study), StopFlag()) == 3
    states = [t.state for t in study.get_trials()]
    assert states.count(TrialState.COMPLETE) == 3 and TrialState.WAITING not in states
    assert top_up(study, 6) == 3  # a larger target later queues the rest
    assert run_queue(sweep_of(storage, study), StopFlag()) == 3
    assert sum(t.state == TrialState.COMPLETE for t in study.get_trials()) == 6


@pytest.mark.parametrize("wakes_up_to", ["report", "return"])
def test_a_worker_whose_trial_was_finished_elsewhere_goes_on(any_storage_url, wakes_up_to):
    storage, study, sid = new_study(any_storage_url)
    top_up(study, 3)
    other = make_storage(any_storage_url)  # another worker, which took this one for dead
    lines: list[str] = []

    def taken_for_dead(trial) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)
        if trial.number == 0:
            lost.requeue(other, sid, other.get_trial(trial_id_of(trial)), "worker lost: test")
        if wakes_up_to == "report":  # the stale worker wakes up and reports, or returns
            trial.report(x, 1)
        return x

    ran = run_queue(sweep_of(storage, study, taken_for_dead), StopFlag(), log=lines.append)
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL
    assert ran == 3 and sum(t.state == TrialState.COMPLETE for t in trials) == 3
    assert lines == [
        "dropped trial 0: another process took it for lost and queued a copy (worker lost: "
        "test); its result is not kept"
    ]


def trial_id_of(trial) -> int:
    return trial._trial_id


def test_an_interrupt_requeues_the_running_trial_once(any_storage_url):
    storage, study, sid = new_study(any_storage_url)
    top_up(study, 2)

    def interrupted(trial) -> float:
        trial.suggest_float("x", 0.0, 1.0)
        os.kill(os.getpid(), signal.SIGINT)  # arrives in pure Python code: raised at once
        raise AssertionError("not reached")

    stop = StopFlag(hard_exit=False)
    with signals_recorded(stop):
        assert run_queue(sweep_of(storage, study, interrupted), stop) == 0
    assert stop.signum == signal.SIGINT
    trials = study.get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.WAITING, TrialState.WAITING]
    assert trials[0].user_attrs["reason"] == "interrupted (SIGINT)"
    assert trials[2].system_attrs["requeued_from"] == 0
    assert trials[2].params == trials[0].params
    # The retry runs, with the same parameters.
    assert run_queue(sweep_of(storage, study), StopFlag()) == 2
    assert study.get_trials()[2].params == trials[0].params


def test_a_signal_never_interrupts_a_storage_write(tmp_path):
    storage, study, sid = new_study(f"sqlite:///{tmp_path / 'w.db'}")
    top_up(study, 1)
    write = storage.backend.set_trial_intermediate_value  # what a trial's report calls

    def signalled_mid_write(trial_id, step, value):
        os.kill(os.getpid(), signal.SIGINT)  # lands inside the storage's own code
        return write(trial_id, step, value)

    def reports_then_trains(trial) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)
        trial.report(x, 1)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:  # training: the waiting signal is raised here
            pass
        raise AssertionError("not interrupted")

    storage.backend.set_trial_intermediate_value = signalled_mid_write
    stop = StopFlag(hard_exit=False)
    with signals_recorded(stop):
        assert run_queue(sweep_of(storage, study, reports_then_trains), stop) == 0
    [trial] = [t for t in study.get_trials() if t.number == 0]
    assert trial.intermediate_values == {1: trial.params["x"]}  # the write went through
    assert trial.state == TrialState.FAIL and trial.user_attrs["reason"] == "interrupted (SIGINT)"


def test_the_flag_raises_only_where_it_is_safe():
    stop = StopFlag()
    with signals_recorded(stop), pytest.raises(Interrupted):
        with stop.allowed():
            os.kill(os.getpid(), signal.SIGTERM)
            for _ in range(10**6):  # the handler runs between these bytecodes
                pass
    stop = StopFlag()
    with signals_recorded(stop):
        os.kill(os.getpid(), signal.SIGHUP)  # not interruptible: only recorded
        assert stop.signum == signal.SIGHUP


class Flaky:
    """A storage method that fails ``n`` times with ``exc`` before it works."""

    def __init__(self, n: int, exc: Exception) -> None:
        self.n, self.exc, self.calls = n, exc, 0

    def get_all_studies(self):
        self.calls += 1
        if self.calls <= self.n:
            raise self.exc
        return ["ok"]


def test_resilient_storage_retries_only_what_may_pass(monkeypatch):
    monkeypatch.setattr("time.sleep", lambda s: None)
    from sqlalchemy.exc import OperationalError

    reset = optuna.exceptions.StorageInternalError("commit failed")
    reset.__cause__ = OperationalError("SELECT 1", {}, Exception("server closed the connection"))
    assert is_transient(reset)
    lines: list[str] = []
    storage = ResilientStorage(Flaky(3, reset), patience=60, log=lines.append)  # type: ignore
    assert storage.get_all_studies() == ["ok"]
    assert len(lines) == 2 and "unreachable" in lines[0] and "again" in lines[1]
    closed = 'FATAL:  database "x" is not currently accepting connections'  # maintenance
    assert is_transient(OperationalError("SELECT 1", {}, Exception(closed)))
    full = OperationalError("INSERT", {}, Exception("database or disk is full"))
    assert not is_transient(full)
    with pytest.raises(OperationalError):
        ResilientStorage(Flaky(1, full)).get_all_studies()  # type: ignore[arg-type]
    impatient = ResilientStorage(Flaky(10**6, reset), patience=0)  # type: ignore[arg-type]
    with pytest.raises(StorageUnavailable, match="server closed the connection"):
        impatient.get_all_studies()


def test_the_private_optuna_api_still_does_what_we_use_it_for(tmp_path):
    """If Optuna changes these, this fails (search.sweep.workers.storage wraps each use)."""
    storage, study, sid = new_study(f"sqlite:///{tmp_path / 'p.db'}")
    study.enqueue_trial({"x": 0.5})
    [frozen] = study.get_trials()
    assert trial_id(frozen) == storage.get_trial_id_from_study_id_trial_number(sid, 0)
    assert storage_of(study) is storage
    # Optuna's trial cache is in front of an RDB storage, as create_study would put it.
    from optuna.storages._cached_storage import _CachedStorage

    assert isinstance(storage.inner, _CachedStorage) and storage.inner._backend is storage.backend


def test_waiting_trials_are_listed_oldest_first_as_optuna_lists_them(any_storage_url):
    storage, study, sid = new_study(any_storage_url)
    for _ in range(5):
        study.enqueue_trial({})
    take(storage, sid)  # the oldest is RUNNING now
    public = [
        trial_id(t)
        for t in storage.get_all_trials(sid, deepcopy=False, states=(TrialState.WAITING,))
    ]
    assert waiting_trial_ids(storage, sid, limit=3) == public[:3]
    assert waiting_trial_ids(storage, sid) == public and len(public) == 4


def test_blank_trials_queued_at_once_are_the_ones_optuna_queues(any_storage_url):
    """enqueue_blank (two statements a chunk on an RDB storage) makes what
    study.enqueue_trial({}) makes; numbers stay dense when both are mixed; workers run them."""
    from search.sweep.workers.storage import enqueue_blank

    storage, study, sid = new_study(any_storage_url)
    study.enqueue_trial({})
    enqueue_blank(storage, sid, 7, chunk=3)
    study.enqueue_trial({"x": 0.5})
    enqueue_blank(storage, sid, 2)
    trials = study.get_trials()  # through Optuna's cache, as the workers read them
    assert [t.number for t in trials] == list(range(11))
    reference = trials[0]
    for t in trials[1:8] + trials[9:]:
        assert t.state == TrialState.WAITING and t.params == {} and t.user_attrs == {}
        assert t.system_attrs == reference.system_attrs == {"fixed_params": {}}
        assert t.datetime_start == reference.datetime_start is None
    assert trials[8].system_attrs == {"fixed_params": {"x": 0.5}}
    assert run_queue(sweep_of(storage, study), StopFlag()) == 11
    done = study.get_trials()
    assert all(t.state == TrialState.COMPLETE for t in done) and len(done) == 11
    assert done[8].params == {"x": 0.5}
