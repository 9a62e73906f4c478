"""Many machines on one PostgreSQL study: separate ``search.worker`` processes share a queue.

Each test gets its own database on the local server (tests/search/pg_util.py).
The workers are real subprocesses, as three machines would start them.
"""

from __future__ import annotations

import os
import re
import signal
import time
from collections import Counter

import optuna
import pytest
from optuna.trial import TrialState

from search import worker
from search.config.study import load_spec
from search.sweep import studies as st
from search.sweep.objective import curves_of
from search.sweep.workers import lost
from tests.search import pg_util
from tests.search.conftest import get_json, run_dashboard

pytestmark = pytest.mark.postgres

# Starting points queued first: each must run exactly once however many workers pop.
STARTS = [
    {"l2_lambda": 1e-3, "eta_max": 0.05},
    {"l2_lambda": 1e-4, "eta_max": 0.1},
    {"l2_lambda": 1e-2, "eta_max": 0.02},
]
# Heartbeats every second, stale after 3 s: a killed worker's trial comes back quickly.
FAST_HEARTBEAT = {"heartbeat_interval": 1, "grace_period": 3}


@pytest.fixture
def pg_url():
    with pg_util.temporary_database() as url:
        yield url


def create_study(path, *, target: int, enqueue=()) -> optuna.Study:
    """What search.coarse does before training: create, record the data, queue the target."""
    spec = load_spec(path)
    study = st.open_study(spec, "coarse")
    st.record_data(study, st.prepare_for(spec, log=lambda *_: None))
    study.set_user_attr("ranges", st.describe_ranges(spec.search))
    st.top_up(study, target, enqueue=list(enqueue))
    return study


def states(study: optuna.Study) -> dict[str, int]:
    return dict(st.counts(study))


@pytest.mark.slow  # test_queue's exactly-once on PostgreSQL covers it (the time budget)
def test_three_workers_run_exactly_the_target(quick_study, pg_url):
    path = quick_study(
        "pg",
        coarse={"trials": 12},
        training={"n_cycles": 1, "evals_per_cycle": 4},
        optuna={"storage": pg_url, **FAST_HEARTBEAT},
    )
    study = create_study(path, target=12, enqueue=STARTS)
    args = ["--storage", pg_url, "--study-name", "pg-coarse", "--study", str(path)]
    procs = [pg_util.start_worker(*args, "--threads", "1", "--poll", "0.2") for _ in range(3)]
    outputs = pg_util.finish(procs)
    for p, out in zip(procs, outputs, strict=True):
        assert p.returncode == 0, out
        assert "joined pg-coarse" in out and "queue of pg-coarse empty" in out, out

    trials = study.get_trials()
    finished = [t for t in trials if t.state in st.FINISHED]
    assert len(finished) == 12 == len(trials), states(study)
    for start in STARTS:
        assert sum(t.params == start for t in finished) == 1, start
    # Blank trials got distinct parameters: the workers' samplers are seeded apart.
    assert len({tuple(sorted(t.params.items())) for t in finished}) == 12
    # Three commands, one worker process each: three owners at most, none of them a command.
    owners = {t.system_attrs[lost.OWNER]["pid"] for t in finished}
    assert len(owners) <= 3 and not owners & {p.pid for p in procs}
    assert all(curves_of(t)["val_acc"] for t in finished)


@pytest.mark.slow  # test_queue's lost trial retried on PostgreSQL covers it (the time budget)
def test_killed_worker_trial_is_retried_by_the_others(quick_study, pg_url):
    # Slower trials (more cycles, no pruning) so one is certainly running when we kill.
    path = quick_study(
        "pgkill",
        coarse={"trials": 6},
        training={"n_cycles": 6},
        optuna={"storage": pg_url, "pruner": "none", **FAST_HEARTBEAT},
    )
    study = create_study(path, target=6)
    args = ["--storage", pg_url, "--study-name", "pgkill-coarse", "--study", str(path)]
    # Three machines; the first one started will be killed in the middle of a trial.
    # It counts as another machine (C2F_MACHINE), so the survivors cannot see that its
    # process is gone: only its heartbeat going stale can bring its trial back.
    victim = pg_util.start_worker(
        *args, "--threads", "1", "--poll", "0.2", env={"C2F_MACHINE": "machine-b"}
    )
    procs = [victim] + [
        pg_util.start_worker(*args, "--threads", "1", "--poll", "0.2") for _ in range(2)
    ]
    killed = None
    deadline = time.monotonic() + 60
    try:
        while killed is None and time.monotonic() < deadline:
            running = study.get_trials(states=(TrialState.RUNNING,))
            mine = [
                t
                for t in running
                if "machine-b" in t.system_attrs.get(lost.OWNER, {}).get("machine", "")
            ]
            mine = [t for t in mine if len(t.params) == 2]  # both suggested: training
            if mine:
                os.killpg(victim.pid, signal.SIGKILL)  # the whole machine dies
                killed = mine[0]
            time.sleep(0.05)
        assert killed is not None, f"never caught the victim mid-trial: {states(study)}"
    finally:
        outputs = pg_util.finish(procs)
    assert victim.returncode == -signal.SIGKILL
    for p, out in zip(procs[1:], outputs[1:], strict=True):
        assert p.returncode == 0, out

    trials = study.get_trials()
    c = states(study)
    assert c.get("COMPLETE", 0) + c.get("PRUNED", 0) == 6, c
    assert c.get("RUNNING", 0) == c.get("WAITING", 0) == 0, c
    failed = trials[killed.number]
    assert failed.state == TrialState.FAIL and failed.params == killed.params
    retries = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert len(retries) == 1, c
    retry = retries[0]
    assert retry.state == TrialState.COMPLETE and retry.params == killed.params
    assert retry.system_attrs["retry_history"] == [killed.number]
    assert "machine-b" not in retry.system_attrs[lost.OWNER]["machine"]  # run by a survivor


def test_worker_refuses_a_study_that_does_not_exist(quick_study, pg_url, capsys):
    path = quick_study("pgmiss", optuna={"storage": pg_url})
    create_study(path, target=2)
    code = worker.main(["--storage", pg_url, "--study-name", "nope-coarse", "--study", str(path)])
    assert code == 2
    err = capsys.readouterr().err
    assert "no study 'nope-coarse'" in err and "pgmiss-coarse" in err  # lists what exists
    assert optuna.get_all_study_names(pg_url) == ["pgmiss-coarse"]  # and created nothing


def test_worker_refuses_different_data(quick_study, pg_url, capsys):
    path = quick_study("pgdata", optuna={"storage": pg_url})
    study = create_study(path, target=2)
    study.set_user_attr("data_checksum", "f" * 64)  # as if created from other source files
    code = worker.main(
        ["--storage", pg_url, "--study-name", "pgdata-coarse", "--study", str(path)]
    )
    assert code == 2
    err = capsys.readouterr().err
    assert "error: study pgdata-coarse was created with data ffffffffffffffff" in err
    assert states(study) == {"WAITING": 2}  # nothing ran


def test_create_then_join_fine_stage_uses_recorded_ranges(quick_study, pg_url, capsys):
    path = quick_study("pgfine", optuna={"storage": pg_url})
    # --create records the study file, so a worker needs only the storage and the name.
    assert (
        worker.main(["--create", "--study", str(path), "--storage", pg_url, "--trials", "3"]) == 0
    )
    assert "target 3 trials" in capsys.readouterr().out
    spec = load_spec(path)
    coarse = optuna.load_study(study_name="pgfine-coarse", storage=pg_url)
    assert coarse.user_attrs["study_file"] == str(path.resolve())
    assert states(coarse) == {"WAITING": 3}
    # A fine study as search.fine leaves it: narrowed ranges recorded, trials queued.
    fine = st.open_study(spec, "fine")
    narrow = {"l2_lambda": [1e-4, 2e-4], "eta_max": [0.01, 0.02]}
    fine.set_user_attr("ranges", narrow)
    fine.set_user_attr("study_file", str(path))
    st.top_up(fine, 2)
    assert worker.main(["--storage", pg_url, "--study-name", "pgfine-fine", "--threads", "1"]) == 0
    done = fine.get_trials()
    assert [t.state in st.FINISHED for t in done] == [True, True]
    for t in done:
        for name, (lo, hi) in narrow.items():
            assert lo <= t.params[name] <= hi
    assert states(coarse) == {"WAITING": 3}  # the fine worker left the coarse study alone


# A live study in the dashboard: test_dashboard (SQLite); PostgreSQL: its other tests.
@pytest.mark.slow
def test_dashboard_reads_the_postgres_study(quick_study, pg_url):
    path = quick_study("pgdash", optuna={"storage": pg_url})
    study = create_study(path, target=2)
    args = ["--storage", pg_url, "--study-name", "pgdash-coarse", "--study", str(path)]
    assert worker.main([*args, "--threads", "1"]) == 0
    with run_dashboard(pg_url) as base:
        summaries = get_json(base + "/api/studies")["study_summaries"]
        assert [s["study_name"] for s in summaries] == ["pgdash-coarse"]
        detail = get_json(f"{base}/api/studies/{summaries[0]['study_id']}")
    assert len(detail["trials"]) == len(study.get_trials()) == 2
    assert {p["name"] for p in detail["union_search_space"]} == {"l2_lambda", "eta_max"}
    assert all(t["state"] in ("Complete", "Pruned") for t in detail["trials"])


def test_sigterm_requeues_the_running_trial_at_once(quick_study, pg_url):
    # docker stop / scaling down sends SIGTERM: the trial goes back to the queue now,
    # not after the heartbeat's grace period.
    path = quick_study(
        "pgterm",
        # a long trial: the signal lands mid-trial on a loaded machine too (the worker
        # stops at the signal, so the length costs nothing)
        training={"n_cycles": 40},
        optuna={"storage": pg_url, "pruner": "none", "grace_period": 600},
    )
    study = create_study(path, target=2)
    proc = pg_util.start_worker("--storage", pg_url, "--study-name", "pgterm-coarse",
                                "--study", str(path), "--threads", "1")  # fmt: skip
    running = None
    deadline = time.monotonic() + 60
    try:
        while running is None and time.monotonic() < deadline:
            # Both params drawn: a trial caught between its two suggests has only one.
            live = [
                t
                for t in study.get_trials(states=(TrialState.RUNNING,))
                if set(t.params) == {"l2_lambda", "eta_max"}
            ]
            running = live[0] if live else None
            time.sleep(0.05)
        assert running is not None, "the worker never started a trial"
        proc.send_signal(signal.SIGTERM)
    finally:
        [out] = pg_util.finish([proc])
    assert proc.returncode == 143, out
    assert "re-queued" in out
    trials = study.get_trials()
    assert trials[running.number].state == TrialState.FAIL
    requeued = [t for t in trials if t.system_attrs.get("requeued_from") == running.number]
    assert [t.state for t in requeued] == [TrialState.WAITING]
    assert requeued[0].params == running.params


# Each stage on PostgreSQL: test_create_then_join_fine_stage_uses_recorded_ranges, the
# dashboard's and the network cut's tests (the suite's time budget).
@pytest.mark.slow
def test_every_command_takes_a_postgresql_url(quick_study, pg_url, capsys):
    """coarse -> fine -> final -> report -> status, all on --storage postgresql+psycopg2://."""
    from search import coarse, final, fine, report, status

    path = quick_study("pgcli", coarse={"trials": 4}, fine={"trials": 3, "top_k": 2})
    flags = ["--study", str(path), "--storage", pg_url]
    assert coarse.main(flags) == 0
    out = capsys.readouterr().out
    assert f"next: python -m search.fine --study {path} --storage {pg_url}" in out
    assert fine.main(flags) == 0
    assert final.main(flags) == 0
    assert "test accuracy" in capsys.readouterr().out
    assert report.main([*flags, "--out", str(path.parent / "rep")]) == 0
    assert (path.parent / "rep" / "report.md").is_file()
    capsys.readouterr()
    assert status.main(flags) == 0
    out = capsys.readouterr().out
    assert "pgcli-coarse" in out and "pgcli-fine" in out and "4/4 finished" in out
    # Nothing went to the default SQLite file beside the study file.
    assert not (path.parent / "pgcli.db").exists()
    storage = optuna.storages.RDBStorage(pg_url)
    names = {s.study_name for s in storage.get_all_studies()}
    assert names == {"pgcli-coarse", "pgcli-fine"}
    fine_study = optuna.load_study(study_name="pgcli-fine", storage=storage)
    assert fine_study.user_attrs["final"]["test_acc"] > 0.8
    storage.engine.dispose()


def test_messages_hide_the_password():
    from search.sweep.workers.storage import safe_url

    url = "postgresql+psycopg2://c2f:s3cret@db.example/optuna"
    assert "s3cret" not in safe_url(url) and "db.example/optuna" in safe_url(url)


def finished_params(study: optuna.Study) -> list[tuple]:
    return [tuple(sorted(t.params.items())) for t in study.get_trials() if t.state in st.FINISHED]


# The 20 s cut is the longer proof (pytest -m slow); 3 s runs with the suite.
@pytest.mark.parametrize("cut_s", [3, pytest.param(20, marks=pytest.mark.slow)])
def test_a_worker_rides_out_a_network_cut(quick_study, pg_url, cut_s):
    proxy = pg_util.CuttableProxy()
    try:
        via_proxy = proxy.url(pg_url)
        path = quick_study(
            "pgcut",
            coarse={"trials": 6},
            training={"n_cycles": 3},
            optuna={"storage": via_proxy, "pruner": "none", "heartbeat_interval": 1},
        )
        create_study(path, target=6)
        study = optuna.load_study(study_name="pgcut-coarse", storage=pg_url)  # not cut
        proc = pg_util.start_worker(
            "--storage", via_proxy, "--study-name", "pgcut-coarse", "--study", str(path),
            "--threads", "1", "--workers", "2", "--poll", "0.2",
        )  # fmt: skip
        deadline = time.monotonic() + 60
        while len(finished_params(study)) < 2 and time.monotonic() < deadline:
            time.sleep(0.1)
        proxy.cut(cut_s)
        [out] = pg_util.finish([proc], timeout=120)
    finally:
        proxy.close()
    assert proc.returncode == 0, out
    assert "storage unreachable" in out and "reachable again" in out, out
    # One cut, one line each from each worker that saw it (its heartbeat thread is silent).
    for line in ("storage unreachable", "storage reachable again"):
        per_worker = Counter(re.findall(rf"^worker (\d+): {line}", out, flags=re.M))
        assert set(per_worker.values()) == {1}, out
    done = finished_params(study)
    assert len(done) == 6 and len(set(done)) == 6, st.counts(study)
    assert "Traceback" not in out


@pytest.mark.slow  # test_resume's silent worker covers the rule (the suite's time budget)
def test_a_worker_stopped_past_the_grace_period_drops_its_trial_and_goes_on(quick_study, pg_url):
    path = quick_study(
        "pgstop",
        coarse={"trials": 6},
        training={"n_cycles": 4},
        optuna={"storage": pg_url, "pruner": "none", **FAST_HEARTBEAT},
    )
    study = create_study(path, target=6)
    args = ["--storage", pg_url, "--study-name", "pgstop-coarse", "--study", str(path)]
    args += ["--threads", "1", "--poll", "0.2"]
    victim = pg_util.start_worker(*args, env={"C2F_MACHINE": "machine-b"})
    deadline = time.monotonic() + 60
    caught = None
    while caught is None and time.monotonic() < deadline:
        running = study.get_trials(states=(TrialState.RUNNING,))
        mine = [t for t in running if len(t.params) == 2 and lost.OWNER in t.system_attrs]
        caught = mine[0] if mine else None
        time.sleep(0.05)
    assert caught is not None, "the worker never started a trial"
    os.killpg(victim.pid, signal.SIGSTOP)  # a laptop lid closed, a VM paused
    try:
        # Another machine takes the stopped worker's trial for dead and runs the queue.
        other = pg_util.start_worker(*args)
        [other_out] = pg_util.finish([other], timeout=120)
        assert other.returncode == 0, other_out
    finally:
        os.killpg(victim.pid, signal.SIGCONT)
    [out] = pg_util.finish([victim], timeout=60)
    assert victim.returncode == 0, out
    said = f"dropped trial {caught.number}: another process took it for lost and queued a copy"
    assert said in out and "its result is not kept" in out, out
    assert "Traceback" not in out
    done = finished_params(study)
    assert len(done) == 6 and len(set(done)) == 6, st.counts(study)
    assert study.get_trials()[caught.number].state == TrialState.FAIL
