"""docker/compose.yaml and docker/Dockerfile, checked without a Docker engine.

The compose file is parsed, its ``${VAR:-default}`` interpolated as compose does,
every command of our services is parsed by the project's own argparse parser,
and the services' entry commands are run as subprocesses with the compose
environment, the way the containers would run them (the PostgreSQL host and
the mounted paths swapped for local ones).
"""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys

import optuna
import pytest
import yaml  # PyYAML: a dependency of optuna

from search import proxy, worker
from search.sweep import studies as st
from tests.search import pg_util
from tests.search.conftest import get_json, run_dashboard
from tests.search.sweep.workers.conftest import start_proxy

# One worker runs this module: its module-scoped fixture is built once.
pytestmark = pytest.mark.xdist_group("docker")

REPO = pg_util.REPO
DOCKER = REPO / "docker"
OUR_COMMANDS = {"create": "search.worker", "worker": "search.worker"}
DATABASE = "postgresql+psycopg2://optuna:optuna@postgres:5432/optuna"


def interpolate(value, env: dict[str, str]):
    """Compose's ``${VAR}``, ``${VAR:-default}`` and ``$$`` in every string of ``value``."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def sub(m: re.Match) -> str:
        if m.group(0) == "$$":
            return "$"
        name, op, word = m.group(1), m.group(2), m.group(3) or ""
        if op == ":+":
            return word if env.get(name) else ""
        return env.get(name) or word

    return re.sub(r"\$\$|\$\{(\w+)(?:(:-|:\+)([^}]*))?\}", sub, value)


def load_compose(env: dict[str, str]) -> dict:
    return interpolate(yaml.safe_load((DOCKER / "compose.yaml").read_text()), env)


@pytest.fixture(scope="module")
def compose() -> dict:
    return load_compose({})  # the defaults, as with an empty shell environment


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    text = (DOCKER / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            word, _, rest = line.partition(" ")
            out.append((word.upper(), rest.strip()))
    return out


def app_path(compose: dict, service: str, path: str):
    """A path inside the container -> the host path its volume mounts (or the image's copy)."""
    for volume in compose["services"][service].get("volumes", []):
        host, target = volume.split(":")[:2]
        if path.startswith(target + "/") and not host[0].isalpha():
            return (DOCKER / host / path[len(target) + 1 :]).resolve()
    return REPO / path.removeprefix("/app/")


def test_services_and_their_wiring(compose):
    services = compose["services"]
    assert set(services) == {"postgres", "proxy", "create", "worker", "dashboard"}
    pg = services["postgres"]
    assert pg["image"] == "postgres:16"
    assert "pg_isready" in " ".join(pg["healthcheck"]["test"])
    assert any(v.endswith(":/var/lib/postgresql/data") for v in pg["volumes"])
    assert services["proxy"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    assert "channel_ready_future" in " ".join(services["proxy"]["healthcheck"]["test"])
    assert services["create"]["depends_on"]["proxy"]["condition"] == "service_healthy"
    dep = services["worker"]["depends_on"]["create"]["condition"]
    assert dep == "service_completed_successfully"
    assert services["worker"]["deploy"]["replicas"] >= 1
    assert services["dashboard"]["ports"] == ["127.0.0.1:8080:8080"]  # not on every interface
    for name in ("create", "worker"):
        mounts = services[name]["volumes"]
        assert any(":/app/studies:ro" in v for v in mounts)
        assert any(v.endswith(":/data:ro") for v in mounts)
        assert services[name]["build"] == {"context": "..", "dockerfile": "docker/Dockerfile"}
    assert set(compose["volumes"]) >= {"pgdata", "cache"}


@pytest.mark.parametrize("service", sorted(OUR_COMMANDS))
def test_commands_parse_with_the_project_parser(compose, service, monkeypatch):
    svc = compose["services"][service]
    command = svc["command"]
    assert command[:3] == ["python", "-m", OUR_COMMANDS[service]]
    for key, value in svc["environment"].items():
        monkeypatch.setenv(key, str(value))
    args = worker.build_parser().parse_args(command[3:])  # SystemExit here fails the test
    assert args.storage == "grpc://proxy:13000"  # the proxy service, not the database
    assert args.study_name == "quickstart-coarse"
    assert args.create is (service == "create")
    assert args.threads == 1 and args.cache_dir == "/cache"
    assert not args.data_dir  # the study file's [data] dir: digits read no files
    assert app_path(compose, service, args.study) == REPO / "studies" / "quickstart.toml"
    assert (REPO / "studies" / "quickstart.toml").is_file()


def test_data_dir_is_passed_only_when_given(monkeypatch):
    compose = load_compose({"DATA_DIR": "/srv/cifar-10-batches-py", "WORKER_THREADS": "2"})
    svc = compose["services"]["worker"]
    assert "/srv/cifar-10-batches-py:/data:ro" in svc["volumes"]
    for key, value in svc["environment"].items():
        monkeypatch.setenv(key, str(value))
    args = worker.build_parser().parse_args(svc["command"][3:])
    assert args.data_dir == "/data" and args.threads == 2


def test_the_proxy_serves_the_database_to_the_workers(compose, monkeypatch):
    svc = compose["services"]["proxy"]
    assert svc["command"][:3] == ["python", "-m", "search.proxy"]
    for key, value in svc["environment"].items():
        monkeypatch.setenv(key, str(value))
    args = proxy.build_parser().parse_args(svc["command"][3:])
    assert args.storage == DATABASE
    assert (args.host, args.port) == ("0.0.0.0", 13000)  # the workers' grpc://proxy:13000
    assert "13000" in " ".join(svc["healthcheck"]["test"])


def test_dashboard_command_uses_the_same_storage(compose):
    svc = compose["services"]["dashboard"]
    command = svc["command"]
    assert command[0] == "optuna-dashboard"
    # The database itself, as the proxy serves it: the dashboard does not read a proxy.
    assert command[1] == compose["services"]["proxy"]["environment"]["C2F_STORAGE"] == DATABASE
    assert command[command.index("--port") + 1] == "8080"
    assert command[command.index("--host") + 1] == "0.0.0.0"  # inside the container


def test_dockerfile_installs_the_postgres_extra_as_non_root():
    steps = dockerfile()
    assert steps[0] == ("FROM", "python:3.11-slim")
    runs = " ".join(args for word, args in steps if word == "RUN")
    assert 'pip install ".[postgres,proxy]"' in runs
    users = [args for word, args in steps if word == "USER"]
    assert users and users[-1] not in ("root", "0")
    assert ("WORKDIR", "/app") in steps
    cmd = json.loads(next(args for word, args in reversed(steps) if word == "CMD"))
    assert cmd == ["python", "-m", "search.worker", "--help"]
    # Everything the image copies exists (pip needs README.md: pyproject names it).
    for word, args in steps:
        if word == "COPY":
            *sources, _ = shlex.split(args)
            for source in sources:
                assert list(REPO.glob(source)), f"COPY {source}: not in the repository"
    assert "psycopg2" in (REPO / "pyproject.toml").read_text()


def test_default_command_prints_help():
    cmd = json.loads(next(a for w, a in reversed(dockerfile()) if w == "CMD"))
    out = subprocess.run(
        [sys.executable, *cmd[1:]],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "--study-name" in out.stdout and "C2F_" in out.stdout


# test_proxy runs the proxy and its workers; the tests above check the compose commands
# (the suite's time budget).
@pytest.mark.slow
@pytest.mark.postgres
def test_compose_entry_commands_run_a_study(compose, tmp_path, quick_study):
    """The proxy, create, two worker replicas and the dashboard, as compose runs them, on
    local PostgreSQL (the proxy on a free port of this machine)."""
    with pg_util.temporary_database() as url:
        served = start_proxy(url)
        study_file = quick_study("quickstart", training={"n_cycles": 1, "evals_per_cycle": 4})
        services = compose["services"]
        # The container's environment, with the hosts and mounts of this machine.
        local = {
            "C2F_STORAGE": served.url,
            "C2F_STUDY": str(study_file),
            "C2F_CACHE_DIR": str(tmp_path / "cache"),
        }
        assert services["worker"]["environment"]["C2F_DATA_DIR"] == ""  # as in the container

        def run(service: str) -> subprocess.Popen:
            env = {**services[service]["environment"], **local}
            if service == "create":
                env["C2F_TRIALS"] = "5"
            command = services[service]["command"]
            return pg_util.start_worker(*command[3:], env=env)

        try:
            [out] = pg_util.finish([run("create")])
            assert "target 5 trials" in out and "5 newly queued" in out, out
            replicas = [run("worker"), run("worker")]
            outputs = pg_util.finish(replicas)
        finally:
            served.stop()
        for p, out in zip(replicas, outputs, strict=True):
            assert p.returncode == 0 and "queue of quickstart-coarse empty" in out, out
        study = optuna.load_study(study_name="quickstart-coarse", storage=url)
        c = st.counts(study)
        assert c["COMPLETE"] + c["PRUNED"] == 5 == len(study.trials), c

        # What the dashboard service shows (its command: test_dashboard_command_uses_...).
        with run_dashboard(url) as base:
            body = get_json(base + "/api/studies")
        assert [s["study_name"] for s in body["study_summaries"]] == ["quickstart-coarse"]
