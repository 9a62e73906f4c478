"""optuna-dashboard, started for real, reads a coarse study from SQLite through its JSON API.

``run_dashboard(url)`` is reusable: ``from tests.search.test_dashboard import run_dashboard``.
"""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import optuna
import pytest

from search import coarse
from search.config.study import load_spec
from tests.conftest import missing
from tests.search.conftest import write_study

# One worker runs this module: its module-scoped fixture is built once.
pytestmark = pytest.mark.xdist_group("dashboard")

STARTUP_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _command(storage_url: str, port: int) -> list[str]:
    args = [storage_url, "--host", "127.0.0.1", "--port", str(port), "--server", "wsgiref"]
    exe = shutil.which("optuna-dashboard")
    if exe is not None:
        return [exe, *args]
    # The console script is not on PATH (a venv not activated): same entry point.
    return [sys.executable, "-c", "from optuna_dashboard._cli import main; main()", *args]


def get_json(url: str, timeout: float = 10.0):
    with urllib.request.urlopen(url, timeout=timeout) as response:
        return json.loads(response.read())


@contextlib.contextmanager
def run_dashboard(storage_url: str, *, timeout: float = STARTUP_TIMEOUT_S) -> Iterator[str]:
    """Start optuna-dashboard on a free loopback port; yield its base URL; always stop it."""
    try:
        import optuna_dashboard  # noqa: F401
    except ImportError:
        missing("optuna-dashboard is not installed")
    port = free_port()
    base = f"http://127.0.0.1:{port}"
    proc = subprocess.Popen(
        _command(storage_url, port),
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + timeout
        while True:
            if proc.poll() is not None:
                raise RuntimeError(
                    f"optuna-dashboard exited with code {proc.returncode}: {proc.stderr.read()}"
                )
            try:
                get_json(f"{base}/api/meta", timeout=2.0)
                break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                if time.monotonic() > deadline:
                    raise TimeoutError(
                        f"optuna-dashboard did not answer on {base} within {timeout:.0f} s"
                    ) from None
                time.sleep(0.2)
        yield base
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        proc.stderr.close()


@pytest.fixture(scope="module")
def coarse_study(tmp_path_factory):
    path = write_study(
        tmp_path_factory.mktemp("dashboard"),
        "dash",
        coarse={"trials": 4, "replicates": 1},
        training={"n_cycles": 1},
        optuna={"workers": 1, "n_startup_trials": 1},
    )
    assert coarse.main(["--study", str(path)]) == 0
    return load_spec(path)


def test_dashboard_reads_the_study(coarse_study):
    url = coarse_study.storage_url()
    study = optuna.load_study(study_name="dash-coarse", storage=url)
    db_trials = study.get_trials()
    with run_dashboard(url) as base:
        summaries = get_json(f"{base}/api/studies")["study_summaries"]
        by_name = {s["study_name"]: s for s in summaries}
        assert "dash-coarse" in by_name
        assert by_name["dash-coarse"]["directions"] == ["maximize"]
        detail = get_json(f"{base}/api/studies/{by_name['dash-coarse']['study_id']}")
    assert detail["name"] == "dash-coarse"
    trials = detail["trials"]
    assert len(trials) == len(db_trials) == 4
    assert sorted(t["number"] for t in trials) == [t.number for t in db_trials]
    assert detail["has_intermediate_values"] is True
    for t, db in zip(sorted(trials, key=lambda t: t["number"]), db_trials, strict=True):
        assert t["state"] == db.state.name.capitalize()
        steps = [v["step"] for v in t["intermediate_values"]]
        assert steps and steps == sorted(db.intermediate_values)
        assert {p["name"] for p in t["params"]} == {"l2_lambda", "eta_max"}
        for p in t["params"]:
            assert p["distribution"]["type"] == "FloatDistribution"
            assert p["distribution"]["log"] is True
    space = {p["name"]: p["distribution"] for p in detail["union_search_space"]}
    assert set(space) == {"l2_lambda", "eta_max"} and all(d["log"] for d in space.values())
    attrs = {a["key"] for a in detail["user_attrs"]}
    assert {"ranges", "target", "data_checksum"} <= attrs
    assert detail["objective_names"] == ["val_acc"]  # not "Objective 0"
    for t in trials:  # the trial view lists these: short values, no page of curves
        shown = {a["key"]: a["value"] for a in t["user_attrs"]}
        assert {"wall_time", "epochs_run", "diverged"} <= set(shown) and "curves" not in shown
        assert all(len(str(v)) < 200 for v in shown.values()), shown


def test_run_dashboard_stops_the_server(coarse_study):
    with run_dashboard(coarse_study.storage_url()) as base:
        assert get_json(f"{base}/api/meta")
    with pytest.raises(urllib.error.URLError):
        get_json(f"{base}/api/meta", timeout=2.0)
