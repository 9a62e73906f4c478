"""A PostgreSQL server at its connection limit: the message says so with the fixes, a
worker that cannot connect is said at once with how many run, and a command whose
workers all fail to connect exits 1."""

from __future__ import annotations

import time
from dataclasses import dataclass

import optuna
import pytest

from search import coarse
from search.sweep.workers import storage as storage_module
from search.sweep.workers.loop import Sweep
from search.sweep.workers.pool import WorkersFailed, run_pool, run_workers
from search.sweep.workers.signals import StopFlag
from search.sweep.workers.storage import make_storage
from tests.search.conftest import connect_as, queue_for_role

pytestmark = pytest.mark.postgres

FIXES = (
    "run fewer workers (--workers, here and on other machines), raise the server's "
    "max_connections (or the role's CONNECTION LIMIT), or put a connection proxy"
)


@dataclass
class SlowQueue:
    """A worker job: connect as the limited role, then one trial that takes a while (the
    connection is held meanwhile)."""

    url: str
    threads: int = 1

    def open(self, worker: int) -> Sweep:
        storage = make_storage(self.url, patience=5.0)
        study = optuna.load_study(study_name="s", storage=storage)

        def objective(trial: optuna.Trial) -> float:
            time.sleep(2.0)
            return 1.0

        return Sweep(storage, study, objective, heartbeat_interval=60.0, grace_period=120.0)


@pytest.fixture
def no_waiting(monkeypatch):
    # A refusal at the limit is retried for about 12 s: once is enough here.
    monkeypatch.setattr(storage_module, "TOO_MANY_TRIES", 1)


def test_a_worker_that_cannot_connect_is_said_with_how_many_run(limited_role, no_waiting):
    url, admin_url = limited_role(1)
    queue_for_role(url, admin_url, 2)
    lines: list[str] = []
    result = run_pool(SlowQueue(url), workers=2, stop=StopFlag(), say=lines.append)
    assert result.started == 1 and result.errors == [], (result, lines)
    assert len(lines) == 2, lines
    assert lines[0].startswith("worker ") and " could not start: PostgreSQL at " in lines[0]
    assert "refused a connection, too many are open (" in lines[0] and FIXES in lines[0]
    assert lines[1] == "1 of the 2 workers run"
    study = optuna.load_study(study_name="s", storage=admin_url)
    assert [t.state for t in study.get_trials()] == [optuna.trial.TrialState.COMPLETE] * 2


def test_when_no_worker_can_connect_the_run_fails_saying_why(limited_role, no_waiting):
    url, admin_url = limited_role(1)
    queue_for_role(url, admin_url, 1)
    taken = connect_as(url)
    try:
        with pytest.raises(WorkersFailed) as caught:
            run_workers(SlowQueue(url), workers=2)
    finally:
        taken.close()
    text = str(caught.value)
    assert text.startswith("none of the 2 workers could start: PostgreSQL at "), text
    assert "too many connections for role" in text and FIXES in text, text


def test_a_command_at_the_connection_limit_says_so_with_the_fixes(
    limited_role, no_waiting, quick_study, error_line
):
    url, _ = limited_role(1)
    study = quick_study(coarse={"trials": 2}, training={"n_cycles": 1})
    taken = connect_as(url)
    try:
        assert coarse.main(["--study", str(study), "--storage", url]) == 1
    finally:
        taken.close()
    line = error_line()
    assert "refused a connection, too many are open" in line and FIXES in line, line
    assert "check user, password" not in line
