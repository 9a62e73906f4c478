"""Workers on a Dask cluster: ``search.worker --backend dask`` on a local cluster that the
tests start (two worker processes of one thread each), against PostgreSQL.

The command runs as a terminal runs it (its own process group); its workers run as the
cluster's tasks, each forking one worker process on its cluster machine.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass

import joblib
import optuna
import pytest
import sqlalchemy.exc
from optuna.trial import TrialState

from search import worker
from search.config.study import load_spec
from search.sweep import stage
from search.sweep import studies as st
from search.sweep.workers import lost
from search.sweep.workers.loop import Sweep
from search.sweep.workers.pool import register_backends, run_pool
from search.sweep.workers.signals import StopFlag
from search.sweep.workers.storage import make_storage
from tests.conftest import missing
from tests.search import pg_util
from tests.search.conftest import free_port

# One cluster for the module, in one test process: it takes seconds to start.
pytestmark = pytest.mark.xdist_group("dask")

SLOW_TRIALS = {"n_cycles": 30}  # a few seconds a trial: signals land mid-training
INTERRUPTED = "interrupted (SIGINT): finished trials are stored, running ones re-queued. "
INTERRUPTED += "Run the same command again to resume."


@pytest.fixture(scope="module")
def cluster():
    """``(address, client)`` of a local Dask cluster: 2 worker processes, 1 thread each."""
    try:
        import distributed
    except ImportError:
        missing('Dask is not installed (pip install -e ".[dev]")')
    with (
        distributed.LocalCluster(
            processes=True, n_workers=2, threads_per_worker=1, dashboard_address=None
        ) as local,
        distributed.Client(local) as client,
    ):
        yield local.scheduler_address, client


@pytest.fixture
def pg_url():
    with pg_util.temporary_database() as url:
        yield url


def create(path, url: str, trials: int) -> None:
    assert (
        worker.main(["--create", "--study", str(path), "--storage", url, "--trials", str(trials)])
        == 0
    )


def trials(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    storage = optuna.storages.RDBStorage(url)
    try:
        return optuna.load_study(study_name=name, storage=storage).get_trials()
    finally:
        storage.engine.dispose()


def start_on_cluster(url: str, name: str, address: str, workers: int = 2) -> subprocess.Popen:
    """``search.worker --backend dask`` in a process group of its own; stdout and stderr
    captured apart."""
    return subprocess.Popen(
        [sys.executable, "-m", "search.worker", "--storage", url, "--study-name", name]
        + ["--backend", "dask", "--scheduler", address, "--workers", str(workers)],
        cwd=pg_util.REPO,
        env={**os.environ, "PYTHONPATH": str(pg_util.REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_for_training(url: str, name: str, running: int, timeout: float = 60.0) -> None:
    """Until ``running`` trials train (their parameters drawn)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            ts = trials(url, name)
        except (KeyError, sqlalchemy.exc.SQLAlchemyError):
            ts = []
        if sum(t.state == TrialState.RUNNING and len(t.params) == 2 for t in ts) >= running:
            return
        time.sleep(0.05)
    raise AssertionError(f"{running} trials of {name} never trained together")


def cluster_children(client) -> list:
    """The processes that the cluster's worker processes started (forked workers)."""
    import psutil  # comes with Dask

    pids = client.run(os.getpid).values()
    return [c for pid in pids for c in psutil.Process(pid).children(recursive=True)]


def cluster_idle(client, timeout: float = 10.0) -> None:
    """Until no task runs on the cluster and no forked worker is left there."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        busy = [k for keys in client.processing().values() for k in keys]
        if not busy and not cluster_children(client):
            return
        time.sleep(0.1)
    raise AssertionError(
        f"still on the cluster: {client.processing()}, {cluster_children(client)}"
    )


def check_requeued_once(url: str, name: str, reason: str) -> None:
    """Nothing RUNNING; each stopped trial has one WAITING retry with its parameters."""
    ts = trials(url, name)
    assert not [t for t in ts if t.state == TrialState.RUNNING]
    stopped = [t for t in ts if t.state == TrialState.FAIL]
    assert len(stopped) == 2, [(t.number, t.state) for t in ts]
    for t in stopped:
        assert t.user_attrs["reason"] == reason
        retries = [r for r in ts if r.system_attrs.get("requeued_from") == t.number]
        assert len(retries) == 1 and retries[0].state == TrialState.WAITING
        assert retries[0].params == t.params


@pytest.mark.postgres
def test_a_worker_command_on_a_dask_cluster_runs_exactly_the_target(cluster, pg_url, quick_study):
    address, client = cluster
    path = quick_study("dk", coarse={"trials": 4}, training={"n_cycles": 1})
    create(path, pg_url, 4)
    proc = start_on_cluster(pg_url, "dk-coarse", address)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert f"2 worker(s) on the Dask cluster at {address} joined dk-coarse" in out, out
    assert "queue of dk-coarse empty: 4 finished of target 4 (0 failed)" in out, out
    # the last to end the stage says what comes next, with the flags that name the study
    assert f"next: python -m search.fine --study {path} --storage {pg_url}" in out, out
    ts = trials(pg_url, "dk-coarse")
    assert len(ts) == 4 and all(t.state in st.FINISHED for t in ts)
    # Run by the cluster's tasks: each said it started, on a run's topic.
    runs = [
        sorted(index for _, (index, what, _) in events if what == "started")
        for topic, events in client.get_events().items()
        if topic.startswith("c2f-")
    ]
    assert [0, 1] in runs, runs
    owners = {t.system_attrs[lost.OWNER]["pid"] for t in ts}
    assert proc.pid not in owners and len(owners) <= 2
    cluster_idle(client)


def training_on_cluster(
    quick_study, url: str, name: str, address: str, training: dict = SLOW_TRIALS
) -> subprocess.Popen:
    """The command on a study of 2 slow trials, once both train on the cluster."""
    path = quick_study(name, coarse={"trials": 2}, training=training, optuna={"pruner": "none"})
    create(path, url, 2)
    proc = start_on_cluster(url, f"{name}-coarse", address)
    wait_for_training(url, f"{name}-coarse", running=2)
    return proc


# Ctrl-C reaching every worker: test_signals; the cluster's exact target: the test above
# (the suite's time budget).
@pytest.mark.slow
@pytest.mark.postgres
def test_ctrl_c_stops_the_cluster_workers_and_a_resume_meets_the_target(
    cluster, pg_url, quick_study
):
    address, client = cluster
    proc = training_on_cluster(quick_study, pg_url, "dkint", address)
    os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends
    out, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    assert [line for line in err.splitlines() if line.strip()] == [INTERRUPTED]
    cluster_idle(client)  # the tasks ended, and their worker processes with them
    check_requeued_once(pg_url, "dkint-coarse", "interrupted (SIGINT)")

    # The resume runs the re-queued trials; short ones here (the study file is read again).
    quick_study("dkint", coarse={"trials": 2}, training={"n_cycles": 1}, optuna={"pruner": "none"})
    again = start_on_cluster(pg_url, "dkint-coarse", address)
    out, err = again.communicate(timeout=120)
    assert again.returncode == 0, err
    assert "empty: 2 finished of target 2 (0 failed, 2 re-queued)" in out, out
    ts = trials(pg_url, "dkint-coarse")
    assert sum(t.state == TrialState.COMPLETE for t in ts) == 2
    assert not [t for t in ts if t.state in (TrialState.RUNNING, TrialState.WAITING)]


@pytest.mark.slow  # over the suite's time budget; run with -m slow
@pytest.mark.postgres
def test_a_killed_command_stops_its_workers_on_the_cluster(cluster, pg_url, quick_study):
    address, client = cluster
    # Trials that outlast the silence the tasks wait for (COMMAND_SILENCE_S) several times.
    proc = training_on_cluster(quick_study, pg_url, "dkkill", address, {"n_cycles": 150})
    proc.kill()  # SIGKILL: the command can do nothing; its record on the scheduler goes silent
    proc.communicate(timeout=10)
    cluster_idle(client, timeout=20)
    # The workers took the silence for their command's death: each re-queued its trial.
    check_requeued_once(pg_url, "dkkill-coarse", "interrupted (SIGTERM)")


@dataclass
class HalfBroken:
    """A worker job on a PostgreSQL study: worker 1 cannot open it, worker 0 runs it."""

    url: str
    threads: int = 1

    def open(self, worker: int) -> Sweep:
        if worker == 1:
            raise RuntimeError("this machine has no data")
        storage = make_storage(self.url)
        study = optuna.load_study(study_name="s", storage=storage)
        return Sweep(storage, study, lambda trial: 1.0, heartbeat_interval=1, grace_period=60)


@pytest.mark.slow  # over the suite's time budget; run with -m slow
@pytest.mark.postgres
def test_a_cluster_worker_that_cannot_start_is_said_with_how_many_run(cluster, pg_url):
    _, client = cluster
    study = optuna.create_study(study_name="s", storage=pg_url, direction="maximize")
    for _ in range(3):
        study.enqueue_trial({})
    register_backends()
    lines: list[str] = []
    with joblib.parallel_config(backend="c2f-dask", client=client):
        result = run_pool(HalfBroken(pg_url), workers=2, stop=StopFlag(), say=lines.append)
    assert lines == [
        "worker 1 could not start: worker 1 failed: RuntimeError: this machine has no data",
        "1 of the 2 workers run",
    ]
    assert result.started == 1 and result.errors == [] and result.codes == {0: 0, 1: 1}
    assert [t.state for t in study.get_trials()] == [TrialState.COMPLETE] * 3


@pytest.mark.slow  # over the suite's time budget; run with -m slow
@pytest.mark.postgres
def test_a_cluster_machine_without_the_prepared_data_prepares_its_own(
    cluster, pg_url, quick_study, tmp_path
):
    _, client = cluster
    path = quick_study("dkdata", coarse={"trials": 2}, training={"n_cycles": 1})
    create(path, pg_url, 2)
    spec = load_spec(path).with_overrides(storage=pg_url)
    prepared = st.prepare_for(spec, log=lambda *_: None)
    job = stage.StageJob(
        spec, "coarse", str(tmp_path / "not-on-this-machine"), prepared.checksum, spec.search, 1
    )
    register_backends()
    lines: list[str] = []
    with joblib.parallel_config(backend="c2f-dask", client=client):
        result = run_pool(job, workers=1, stop=StopFlag(), say=lines.append)
    assert (result.errors, result.started, lines) == ([], 1, [])
    assert [t.state for t in trials(pg_url, "dkdata-coarse")] == [TrialState.COMPLETE] * 2


def test_sqlite_is_refused_for_dask_naming_the_fix(qs_path, tmp_path, error_line):
    url = f"sqlite:///{tmp_path / 'x.db'}"
    args = ["--storage", url, "--study-name", "qs-coarse", "--study", qs_path]
    assert worker.main([*args, "--backend", "dask", "--scheduler", "tcp://127.0.0.1:8786"]) == 2
    line = error_line()
    assert line.startswith(f"error: --backend dask cannot use --storage {url}: a file"), line
    assert "postgresql+psycopg2://USER@HOST/DB" in line and "grpc://HOST:PORT" in line


def test_dask_without_a_scheduler_says_which_flag(error_line):
    url = "postgresql+psycopg2://u@127.0.0.1:1/db"
    assert worker.main(["--storage", url, "--study-name", "qs-coarse", "--backend", "dask"]) == 2
    assert error_line() == (
        "error: --backend dask needs --scheduler tcp://HOST:8786 (the Dask scheduler's address)"
    )


def test_a_missing_dask_names_the_extra(monkeypatch, error_line):
    import search.sweep.workers

    monkeypatch.setitem(sys.modules, "distributed", None)  # as if it were not installed
    monkeypatch.delitem(sys.modules, "search.sweep.workers.cluster", raising=False)
    monkeypatch.delattr(search.sweep.workers, "cluster", raising=False)
    url = "postgresql+psycopg2://u@127.0.0.1:1/db"
    args = ["--storage", url, "--study-name", "qs-coarse", "--backend", "dask"]
    assert worker.main([*args, "--scheduler", "tcp://127.0.0.1:8786"]) == 2
    assert error_line() == (
        'error: --backend dask needs Dask, an optional extra: pip install -e ".[dask]" '
        '(or pip install "coarse2fine[dask]")'
    )


def test_no_scheduler_at_the_address_is_one_line():
    from search.sweep.workers import cluster
    from search.sweep.workers.pool import WorkersFailed

    port = free_port()
    with pytest.raises(WorkersFailed) as caught:
        cluster.connect(f"tcp://127.0.0.1:{port}", timeout=1.0)
    assert str(caught.value).startswith(f"no Dask scheduler answers at tcp://127.0.0.1:{port}")
    assert "--scheduler tcp://HOST:8786" in str(caught.value)


def test_tasks_the_command_stopped_waiting_for_have_no_exit_code():
    import concurrent.futures

    from search.sweep.workers.cluster import _codes

    ended, lost, running = (concurrent.futures.Future() for _ in range(3))
    ended.set_result([130])  # joblib's batch of one: the worker's exit code
    lost.set_exception(RuntimeError("the cluster lost its machine"))
    closed: list[bool] = []

    def outputs():
        try:
            yield 130
        finally:
            closed.append(True)

    results = outputs()
    next(results)  # joblib's generator has started
    assert _codes(results, [ended, lost, running], 3) == {0: 130, 1: None, 2: None}
    assert closed == [True]  # joblib's generator left, not waited on
