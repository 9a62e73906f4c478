"""Database connections: one per worker process, none kept by the supervising command
between its progress draws (issue: a server's max_connections capped the workers at
half of it)."""

from __future__ import annotations

import contextlib
import threading
import time
from dataclasses import dataclass

import optuna
import pytest
from optuna.trial import TrialState
from sqlalchemy.engine import make_url

from search.sweep.workers import storage as storage_module
from search.sweep.workers.loop import Sweep
from search.sweep.workers.pool import run_pool
from search.sweep.workers.signals import StopFlag
from search.sweep.workers.storage import make_storage
from tests.search.conftest import connect_as, queue_for_role

pytestmark = pytest.mark.postgres


@dataclass
class Reporting:
    """A worker job whose trials report often while the heartbeat beats often: the two
    threads of a worker query at the same moments."""

    url: str
    threads: int = 1

    def open(self, worker: int) -> Sweep:
        storage = make_storage(self.url)
        study = optuna.load_study(study_name="s", storage=storage)

        def objective(trial: optuna.Trial) -> float:
            for step in range(20):
                trial.report(step / 20, step)
                time.sleep(0.02)
            return 1.0

        return Sweep(storage, study, objective, heartbeat_interval=0.01, grace_period=120.0)


def test_as_many_workers_as_the_role_may_connect_all_run(limited_role, monkeypatch):
    monkeypatch.setattr(storage_module, "TOO_MANY_TRIES", 1)  # a refusal is not waited out
    url, admin_url = limited_role(3)
    queue_for_role(url, admin_url, 6)
    lines: list[str] = []
    result = run_pool(Reporting(url), workers=3, stop=StopFlag(), say=lines.append)
    assert (result.started, result.errors, lines) == (3, [], [])
    trials = optuna.load_study(study_name="s", storage=admin_url).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 6


def test_the_supervising_command_keeps_no_connection_between_draws(limited_role):
    url, admin_url = limited_role(5)
    queue_for_role(url, admin_url, 3)
    command_storage = make_storage(url)
    study = optuna.load_study(study_name="s", storage=command_storage)
    engine = command_storage.backend.engine
    held: list[int] = []

    def draw() -> None:
        held.append(engine.pool.checkedin() + engine.pool.checkedout())  # since the last draw
        study.get_trials(deepcopy=False)

    run_pool(
        Reporting(url),
        workers=1,
        stop=StopFlag(),
        progress=draw,
        release_first=[command_storage],
    )
    assert held and set(held) == {0}, held


def test_a_server_storage_holds_one_connection_however_many_threads_query(limited_role):
    url, admin_url = limited_role(5)
    queue_for_role(url, admin_url, 1)
    storage = make_storage(url)
    engine = storage.backend.engine
    done = threading.Event()

    def heartbeat() -> None:  # a second thread of the process, as a worker's heartbeat
        storage.get_all_studies()
        done.set()

    with engine.connect() as conn:  # the loop's query, in progress
        conn.exec_driver_sql("SELECT 1")
        beat = threading.Thread(target=heartbeat)
        beat.start()
        # It waits for the one connection rather than opening a second.
        assert not done.wait(0.5)
        assert engine.pool.checkedout() == 1
        with contextlib.closing(connect_as(admin_url)) as admin, admin.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM pg_stat_activity WHERE usename = %s",
                (make_url(url).username,),
            )
            assert cur.fetchone()[0] == 1
    beat.join()
    assert done.is_set()
    storage_module.release(storage)
