"""Real signals to a real sweep: every worker stops, every running trial is re-queued once.

``search.coarse`` runs as a terminal would run it (its own process group); the
signals go to the group (Ctrl-C) or to the command's PID alone (``kill``).
``bench/signal_probe.py`` does the same at many random moments.
"""

from __future__ import annotations

import os
import signal
import time

import optuna
import pytest
import sqlalchemy.exc
from optuna.trial import TrialState

from tests.search.conftest import run_coarse, start_coarse

SLOW_TRIALS = {"n_cycles": 30}  # a few seconds a trial: signals land mid-training


def trials(url: str, name: str = "sig-coarse") -> list[optuna.trial.FrozenTrial]:
    storage = optuna.storages.RDBStorage(url)
    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials()
    finally:
        storage.engine.dispose()


def wait_for_training(url: str, running: int = 1, timeout: float = 60.0) -> None:
    """Until ``running`` trials train (both parameters drawn)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            live = [t for t in trials(url) if t.state == TrialState.RUNNING and len(t.params) == 2]
        except (KeyError, sqlalchemy.exc.SQLAlchemyError):  # the command is creating it
            live = []
        if len(live) >= running:
            return
        time.sleep(0.05)
    raise AssertionError("the sweep never started training")


def group_left(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def check_requeued_once(url: str, reason: str) -> None:
    """Nothing left RUNNING; each interrupted trial has one WAITING retry with its params."""
    ts = trials(url)
    assert not [t for t in ts if t.state == TrialState.RUNNING]
    stopped = [t for t in ts if t.state == TrialState.FAIL]
    assert stopped, "no trial was running when the signal came"
    for t in stopped:
        assert t.user_attrs["reason"] == reason
        retries = [r for r in ts if r.system_attrs.get("requeued_from") == t.number]
        assert len(retries) == 1 and retries[0].state == TrialState.WAITING
        assert retries[0].params == t.params


@pytest.fixture
def sweep(quick_study, tmp_path):
    path = quick_study(
        "sig",
        coarse={"trials": 4},
        training=SLOW_TRIALS,
        optuna={"pruner": "none", "workers": 2},
    )
    return path, f"sqlite:///{tmp_path / 'sig.db'}"


@pytest.mark.slow  # the same path as test_bookkeeping's Ctrl-C then resume (the time budget)
def test_ctrl_c_stops_every_worker_and_the_rerun_meets_the_target(sweep):
    path, url = sweep
    proc = start_coarse(path, url, "--workers", "2")
    wait_for_training(url, running=2)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends
    t0 = time.monotonic()
    out, err = proc.communicate(timeout=20)
    assert time.monotonic() - t0 < 8  # 5 s for the workers to stop, then they are killed
    assert proc.returncode == 130, err
    # One line: no traceback, no "Exception ignored".
    assert [line for line in err.splitlines() if line.strip()] == [
        "interrupted (SIGINT): finished trials are stored, running ones re-queued. "
        "Run the same command again to resume."
    ]
    assert not group_left(proc.pid)
    check_requeued_once(url, "interrupted (SIGINT)")
    rerun = run_coarse(path, url, timeout=180)
    assert rerun.returncode == 0, rerun.stderr
    ts = trials(url)
    assert sum(t.state == TrialState.COMPLETE for t in ts) == 4
    assert not [t for t in ts if t.state in (TrialState.RUNNING, TrialState.WAITING)]


@pytest.mark.parametrize(
    "sig, code",
    [
        (signal.SIGTERM, 143),
        # SIGHUP takes the path SIGTERM takes (the suite's time budget).
        pytest.param(signal.SIGHUP, 129, marks=pytest.mark.slow),
        # SIGINT to the whole group (a terminal's) is every Ctrl-C test's (the time budget).
        pytest.param(signal.SIGINT, 130, marks=pytest.mark.slow),
    ],
)
def test_a_signal_to_the_command_alone_reaches_its_workers(sweep, sig, code):
    path, url = sweep
    proc = start_coarse(path, url)
    wait_for_training(url, running=2)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=20)
    assert proc.returncode == code, err
    assert err.strip().startswith(f"interrupted ({signal.Signals(sig).name})")
    time.sleep(0.5)
    assert not group_left(proc.pid), "a worker outlived the command"
    check_requeued_once(url, f"interrupted ({signal.Signals(sig).name})")


def test_workers_die_with_a_killed_command(sweep):
    path, url = sweep
    proc = start_coarse(path, url)
    wait_for_training(url, running=2)
    proc.kill()  # SIGKILL, as the OOM killer would: the command cannot do anything
    proc.communicate(timeout=20)
    deadline = time.monotonic() + 5
    while group_left(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.1)
    assert not group_left(proc.pid), "orphaned workers still run 5 s after the command died"
    # The orphans re-queued their own trials before they stopped, and took no other.
    check_requeued_once(url, "interrupted (SIGTERM)")
    assert sum(t.state == TrialState.WAITING for t in trials(url)) == 4 - sum(
        t.state == TrialState.COMPLETE for t in trials(url)
    )


def test_a_second_ctrl_c_ends_at_once(sweep, tmp_path):
    """Workers that cannot stop (the database is locked while they re-queue): the second
    Ctrl-C kills them, and the command re-queues their trials itself."""
    import sqlite3

    path, url = sweep
    proc = start_coarse(path, url)
    wait_for_training(url, running=2)
    lock = sqlite3.connect(tmp_path / "sig.db", isolation_level=None)
    lock.execute("BEGIN IMMEDIATE")  # every write waits from now on
    try:
        os.killpg(proc.pid, signal.SIGINT)
        time.sleep(1.0)
        assert proc.poll() is None, "the workers should still be waiting for the lock"
        os.killpg(proc.pid, signal.SIGINT)
        t0 = time.monotonic()
        time.sleep(0.5)
    finally:
        lock.execute("COMMIT")
        lock.close()
    out, err = proc.communicate(timeout=20)
    assert time.monotonic() - t0 < 5
    assert proc.returncode == 130, err
    assert not group_left(proc.pid)
    ts = trials(url)
    assert not [t for t in ts if t.state == TrialState.RUNNING]
    killed = [t for t in ts if t.state == TrialState.FAIL]
    assert len(killed) == 2  # both workers were killed mid-trial
    for t in killed:  # and the command re-queued their trials
        assert t.user_attrs["reason"].startswith("worker lost: its worker (pid")
        retries = [r for r in ts if r.system_attrs.get("requeued_from") == t.number]
        assert len(retries) == 1 and retries[0].params == t.params
