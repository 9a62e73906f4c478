"""Through ``c2f proxy`` (started by each test), on SQLite and PostgreSQL: the queue, the
lost-trial rule, a coarse stage with its exact target, kill -9 and Ctrl-C semantics, a
proxy restarted under running workers, and a proxy that is down said in one line."""

from __future__ import annotations

import contextlib
import json
import multiprocessing
import os
import pickle
import signal
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from search import coarse, status, worker
from search import proxy as proxy_command
from search.sweep import studies as st
from search.sweep.workers import bookkeeping, lost
from search.sweep.workers.loop import take
from search.sweep.workers.storage import (
    ProxyStorage,
    StorageError,
    StorageURLError,
    check_storage,
    check_url,
    enqueue_blank,
    make_storage,
    proxy_address,
    release,
    running_trials,
    trial_id,
    waiting_trial_ids,
)
from tests.search import pg_util
from tests.search.conftest import REPO, free_port, start_coarse, wait_until_training
from tests.search.sweep.workers.conftest import running_proxy, start_proxy

FORK = multiprocessing.get_context("fork")
PARAMS = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}
# A user's training function slow enough to be killed mid-trial: 1.2 s a trial, and held
# at its start while a file "hold" lies beside it (a test kills a worker meanwhile, so the
# kill lands mid-trial however loaded the machine).
SLOW = """\
import pathlib
import time

HOLD = pathlib.Path(__file__).with_name("hold")

def train(hp, data, report):
    deadline = time.monotonic() + 60
    while HOLD.exists() and time.monotonic() < deadline:
        time.sleep(0.05)
    for step in (1, 2, 3, 4):
        time.sleep(0.3)
        report(step, 0.5)
    return 0.5
"""


@pytest.fixture(
    scope="module", params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def proxied(request, tmp_path_factory):
    """(database URL, proxy in front of it), one for the module: tests name their studies."""
    if request.param == "sqlite":
        url = f"sqlite:///{tmp_path_factory.mktemp('proxied') / 'behind.db'}"
        with running_proxy(url) as proxy:
            yield url, proxy
    else:
        with pg_util.temporary_database() as url, running_proxy(url) as proxy:
            yield url, proxy


def new_study(url: str, name: str):
    storage = make_storage(url)
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize")
    return storage, study, storage.get_study_id_from_name(name)


def dead_pid() -> int:
    probe = subprocess.Popen([sys.executable, "-c", "pass"])
    probe.wait()
    return probe.pid


def in_processes(n: int, target, *args) -> None:
    procs = [FORK.Process(target=target, args=(*args, i)) for i in range(n)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0


# ----------------------------------------------------------------------------- URLs


def test_grpc_urls_name_a_host_and_a_port():
    check_url("grpc://127.0.0.1:13000")
    check_url("grpc://proxy-host:13000/")
    assert proxy_address("grpc://[::1]:13000") == ("::1", 13000)
    assert proxy_address("postgresql+psycopg2://u@h/db") is None
    for bad, said in [
        ("grpc://127.0.0.1", "grpc://HOST:PORT"),
        ("grpc://:13000", "grpc://HOST:PORT"),
        ("grpc://h:13000/db", "grpc://HOST:PORT"),
        ("grpc://h:99999", "the port must be 1 to 65535"),
        ("grpc://h:port", "the port must be 1 to 65535"),
    ]:
        with pytest.raises(StorageURLError, match=said):
            check_url(bad)


def test_check_storage_accepts_a_proxy_and_names_one_that_is_down(proxied):
    _, proxy = proxied
    check_storage(proxy.url)  # answers, and the database behind it too
    down = f"grpc://127.0.0.1:{free_port()}"
    with pytest.raises(StorageError) as raised:
        check_storage(down)
    line = str(raised.value)
    assert "\n" not in line
    assert f"the storage proxy at {down.removeprefix('grpc://')} does not answer" in line
    assert "c2f proxy --storage DATABASE_URL" in line and "UNAVAILABLE" in line


# ----------------------------------------------------------------------------- the queue


def _drain(url: str, name: str, out: Path, i: int) -> None:
    storage = make_storage(url)
    sid = storage.get_study_id_from_name(name)
    taken = []
    while (tid := take(storage, sid)) is not None:
        taken.append(tid)
    (out / f"{i}.json").write_text(json.dumps(taken))


def test_a_queued_trial_is_taken_exactly_once_through_the_proxy(proxied, tmp_path):
    _, proxy = proxied
    storage, study, sid = new_study(proxy.url, "once")
    enqueue_blank(storage, sid, 30)  # the proxy's bulk statement
    release(storage)  # a channel is not shared with forked children
    in_processes(3, _drain, proxy.url, "once", tmp_path)
    taken = [tid for i in range(3) for tid in json.loads((tmp_path / f"{i}.json").read_text())]
    trials = study.get_trials()
    assert len(trials) == 30 and [t.number for t in trials] == list(range(30))
    assert sorted(taken) == sorted(trial_id(t) for t in trials)
    assert len(set(taken)) == len(taken)
    assert all(t.state == TrialState.RUNNING for t in trials)
    assert len({t.system_attrs[lost.OWNER]["pid"] for t in trials}) <= 3


def test_the_queue_questions_are_answered_as_optuna_would(proxied):
    url, proxy = proxied
    storage, study, sid = new_study(proxy.url, "questions")
    enqueue_blank(storage, sid, 5)
    study.enqueue_trial({"x": 0.25})  # Optuna's own way, one trial
    for _ in range(2):
        take(storage, sid)
    direct = make_storage(url)
    everything = direct.get_all_trials(sid)
    waiting = [trial_id(t) for t in everything if t.state == TrialState.WAITING]
    assert waiting_trial_ids(storage, sid, limit=100) == waiting
    assert waiting_trial_ids(storage, sid, limit=2) == waiting[:2]
    running = running_trials(storage, sid, attr=lost.OWNER)
    assert [r.trial_id for r in running] == [
        trial_id(t) for t in everything if t.state == TrialState.RUNNING
    ]
    for r in running:
        frozen = direct.get_trial(r.trial_id)
        assert r.owner == frozen.system_attrs[lost.OWNER] and r.number == frozen.number
        assert abs(r.started - frozen.datetime_start.timestamp()) < 1e-3
    # Blank trials queued in bulk through the proxy are the ones Optuna queues.
    assert all(t.system_attrs["fixed_params"] == {} for t in everything[:5])


def _reap(url: str, name: str, i: int) -> None:
    storage = make_storage(url)
    lost.reap(storage, storage.get_study_id_from_name(name), grace_period=60)


def test_a_lost_trial_is_retried_once_however_many_reap_it_through_the_proxy(proxied):
    _, proxy = proxied
    storage, study, sid = new_study(proxy.url, "lost")
    for x in range(6):
        study.enqueue_trial({"x": x / 10})
    lost_ids = []
    while (tid := take(storage, sid)) is not None:
        storage.set_trial_system_attr(tid, lost.OWNER, {**lost.owner_record(), "pid": dead_pid()})
        lost_ids.append(tid)
    release(storage)
    in_processes(3, _reap, proxy.url, "lost")
    trials = study.get_trials()
    for tid in lost_ids:
        frozen = storage.get_trial(tid)
        assert frozen.state == TrialState.FAIL and "worker lost" in frozen.user_attrs["reason"]
        retries = [t for t in trials if t.system_attrs.get("requeued_from") == frozen.number]
        assert len(retries) == 1 and retries[0].state == TrialState.WAITING
        assert retries[0].params == frozen.params


def test_a_trial_queued_behind_the_proxys_back_runs_through_it(proxied):
    """The proxy's trial cache learns of a trial it never read nor made (queued on the
    database itself, as by another proxy, or before this proxy restarted) when a worker
    sets its parameters: Optuna's cache raised KeyError and the trial failed."""
    url, proxy = proxied
    storage, study, sid = new_study(proxy.url, "behind")
    study.enqueue_trial({"x": 0.5})
    storage.get_all_trials(sid)  # the proxy's cache reads the study now
    direct = optuna.load_study(study_name="behind", storage=make_storage(url))
    direct.enqueue_trial({"x": 0.75})  # behind the proxy's back
    taken = [take(storage, sid), take(storage, sid)]
    assert None not in taken
    values = [optuna.Trial(study, tid).suggest_float("x", 0.0, 1.0) for tid in taken]
    assert sorted(values) == [0.5, 0.75]


# ----------------------------------------------------------------------------- commands


SLOW_STUDY = """\
name = "{name}"
[data]
name = "digits"
[model]
train = "slow.py:train"
[training]
batch_size = 50
n_s = 5
n_cycles = 2
[search]
l2_lambda = [1e-5, 1e-1]
eta_max = [1e-3, 5e-1]
[coarse]
trials = {trials}
replicates = 1
[optuna]
workers = {workers}
pruner = "none"
sampler = "random"
"""


def slow_study(
    tmp_path: Path, name: str, trials: int, workers: int, storage: str | None = None
) -> Path:
    """A study of a user's function that takes 1.2 s a trial (digits, no pruner), with
    its [optuna] storage if given."""
    (tmp_path / "slow.py").write_text(SLOW)
    path = tmp_path / f"{name}.toml"
    text = SLOW_STUDY.format(name=name, trials=trials, workers=workers)
    path.write_text(text + (f'storage = "{storage}"\n' if storage else ""))
    return path


def owner_of_a_running_trial(
    proc: subprocess.Popen, url: str, name: str, timeout: float = 60
) -> tuple[int, int]:
    """(number, worker pid) of a trial that trains now."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the command ended: {proc.communicate()}"
        try:
            trials = optuna.load_study(study_name=name, storage=url).get_trials()
        except KeyError:  # the command is creating it
            trials = []
        for t in trials:
            owner = t.system_attrs.get(lost.OWNER)
            # Both parameters drawn: a kill between the two would leave half a set.
            if t.state == TrialState.RUNNING and owner and len(t.params) == 2:
                return t.number, int(owner["pid"])
        time.sleep(0.05)
    raise AssertionError(f"no trial of {name} trained within {timeout:g} s")


# A lost trial retried once through the proxy: the test of that name above; a worker
# killed mid-trial: test_resume and test_signals (the suite's time budget).
@pytest.mark.slow
@pytest.mark.parametrize(
    "backend", ["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)]
)
def test_a_coarse_stage_through_the_proxy_reaches_its_target_with_a_worker_killed(
    backend, tmp_path
):
    """Two workers through the proxy; one is killed (-9) mid-trial; the stage still ends
    with its exact target, the killed trial re-queued once with its parameters."""
    with contextlib.ExitStack() as stack:
        if backend == "sqlite":
            url = f"sqlite:///{tmp_path / 'behind.db'}"
        else:
            url = stack.enter_context(pg_util.temporary_database())
        proxy = stack.enter_context(running_proxy(url))
        killed_run_through_the_proxy(url, proxy, tmp_path)


def killed_run_through_the_proxy(url: str, proxy, tmp_path: Path) -> None:
    path = slow_study(tmp_path, "killed", trials=4, workers=2)
    hold = tmp_path / "hold"
    hold.touch()  # the trials wait at their start until the kill
    proc = start_coarse(path, proxy.url)
    killed, pid = owner_of_a_running_trial(proc, url, "killed-coarse")
    os.kill(pid, signal.SIGKILL)
    hold.unlink()
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "target 4 trials" in out
    study = optuna.load_study(study_name="killed-coarse", storage=url)  # as the dashboard
    c = st.counts(study)
    assert c["COMPLETE"] == 4 and c["REQUEUED"] == 1 and c["FAIL"] == 0, c
    assert c["RUNNING"] == c["WAITING"] == 0, c
    dead = study.trials[killed]
    assert bookkeeping.state_name(dead) == "REQUEUED"
    assert f"pid {pid}" in dead.user_attrs["reason"]
    [retry] = [t for t in study.trials if t.system_attrs.get("requeued_from") == killed]
    assert retry.state == TrialState.COMPLETE and retry.params == dead.params
    status = subprocess.run(
        [sys.executable, "-m", "search.status", "--storage", proxy.url],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert status.returncode == 0 and "killed-coarse: done" in status.stdout, status.stderr
    assert "4/4 finished" in status.stdout


def finished_count(url: str, name: str) -> int:
    return st.finished(optuna.load_study(study_name=name, storage=url))[0]


@pytest.mark.slow  # over the suite's time budget; run with -m slow
def test_workers_ride_out_a_proxy_restart_and_ctrl_c_requeues_their_trials(tmp_path):
    """The proxy is stopped (SIGTERM: 143) and started again on its port under running
    workers: they retry, say so, and go on. Then Ctrl-C: 130, the running trials
    re-queued, every trial of the target there once; the proxy stops on SIGINT (130)."""
    url = f"sqlite:///{tmp_path / 'behind.db'}"
    proxy = start_proxy(url)
    # The proxy named by the study file's [optuna] storage this time, not by --storage.
    path = slow_study(tmp_path, "restart", trials=12, workers=2, storage=proxy.url)
    proc = None
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "search.coarse", "--study", str(path)],
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        wait_until_training(proc, url, "restart-coarse")
        code, said = proxy.stop(signal.SIGTERM)
        assert code == 143 and "proxy: stopped (SIGTERM)" in said, said
        before = finished_count(url, "restart-coarse")
        time.sleep(0.5)  # the workers' calls are refused meanwhile, and retried
        proxy = start_proxy(url, port=proxy.port)
        deadline = time.monotonic() + 60
        while finished_count(url, "restart-coarse") <= before + 1:
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.05)
        os.killpg(proc.pid, signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc is not None and proc.poll() is None:
            proc.kill()
        code, said = proxy.stop(signal.SIGINT)
    assert proc.returncode == 130, err
    assert "storage unreachable" in err and "storage reachable again" in err
    assert "interrupted (SIGINT)" in err
    c = st.counts(optuna.load_study(study_name="restart-coarse", storage=url))
    assert c["RUNNING"] == c["FAIL"] == 0 and c["REQUEUED"] >= 1, c
    assert c["COMPLETE"] + c["WAITING"] == 12 and c["COMPLETE"] > before + 1, c
    assert code == 130 and "proxy: stopped (SIGINT)" in said, said


@pytest.mark.parametrize("command", [coarse, status, worker])
def test_a_proxy_that_is_down_is_one_line(command, qs_path, error_line):
    down = f"grpc://127.0.0.1:{free_port()}"
    args = ["--storage", down]
    args += ["--study", qs_path] if command is not worker else ["--study-name", "qs-coarse"]
    assert command.main(args) == 1
    line = error_line()
    assert line.startswith(f"error: the storage proxy at {down.removeprefix('grpc://')} ")
    assert "does not answer" in line and "c2f proxy --storage" in line


def test_the_proxy_refuses_what_it_cannot_serve(capsys, tmp_path, proxied):
    _, proxy = proxied
    for storage, said in [
        (f"journal:///{tmp_path / 'x.log'}", "serves databases, not journal files"),
        (proxy.url, "that is a proxy"),
        ("sqlite:///", "in-memory"),
    ]:
        assert proxy_command.main(["--storage", storage]) == 2
        [line] = capsys.readouterr().err.strip().splitlines()
        assert said in line, line
    taken = ["--storage", f"sqlite:///{tmp_path / 'y.db'}", "--host", "127.0.0.1"]
    assert proxy_command.main([*taken, "--port", str(proxy.port)]) == 2
    [line] = capsys.readouterr().err.strip().splitlines()
    assert f"cannot listen on 127.0.0.1:{proxy.port}: the port is taken" in line
    # As its own process: gRPC's log line of the failed bind does not come before it.
    env = {k: v for k, v in os.environ.items() if k != "GRPC_VERBOSITY"}
    ran = subprocess.run(
        [sys.executable, "-m", "search.proxy", *taken, "--port", str(proxy.port)],
        capture_output=True,
        text=True,
        env=env,
        cwd=Path(__file__).resolve().parents[4],
        timeout=60,
    )
    assert ran.returncode == 2
    [line] = ran.stderr.strip().splitlines()
    assert line.startswith("error: cannot listen on"), ran.stderr


# ----------------------------------------------------------------------------- Optuna's privates


def test_the_private_grpc_api_still_does_what_we_use_it_for(proxied):
    """The proxy client's channel is replaced without losing its trial cache, and it
    pickles without its channel (GrpcStorageProxy._setup, _channel, _cache)."""
    _, proxy = proxied
    storage, study, sid = new_study(proxy.url, "privates")
    study.enqueue_trial({"x": 0.5})
    client = storage.backend
    assert isinstance(client, ProxyStorage)
    assert len(client.get_all_trials(sid)) == 1
    cache = client._cache
    client.reconnect()
    assert client._cache is cache and cache.grpc_client is client._stub
    assert len(client.get_all_trials(sid)) == 1
    assert waiting_trial_ids(storage, sid) == [trial_id(study.trials[0])]
    copy = pickle.loads(pickle.dumps(client))
    assert copy.address == client.address and copy.get_all_trials(sid)[0].params == {}
