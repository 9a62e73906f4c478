"""Fixtures for the search tests: small copies of the quick-start study in tmp_path."""

from __future__ import annotations

import contextlib
import json
import shutil
import socket
import subprocess
import sys
import time
import tomllib
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import optuna
import pytest
import sqlalchemy.exc
from optuna.trial import TrialState

from tests.conftest import missing

REPO = Path(__file__).resolve().parents[2]
QUICKSTART = REPO / "studies" / "quickstart.toml"


def _toml(value) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, list | tuple):
        return "[" + ", ".join(_toml(v) for v in value) + "]"
    return repr(value)


def dump_toml(doc: dict) -> str:
    """A minimal TOML writer for study files (tables of scalars and lists, one level deep)."""
    lines = [f"{k} = {_toml(v)}" for k, v in doc.items() if not isinstance(v, dict)]

    def table(prefix: str, d: dict) -> None:
        lines.append(f"\n[{prefix}]")
        lines.extend(f"{k} = {_toml(v)}" for k, v in d.items() if not isinstance(v, dict))
        for k, v in d.items():
            if isinstance(v, dict):
                table(f"{prefix}.{k}", v)

    for k, v in doc.items():
        if isinstance(v, dict):
            table(k, v)
    return "\n".join(lines) + "\n"


def write_study(directory: Path, name: str = "qs", **sections) -> Path:
    """The quick-start study with sections updated (``training={"n_cycles": 1}``...)."""
    doc = tomllib.loads(QUICKSTART.read_text())
    doc["name"] = name
    for section, values in sections.items():
        doc.setdefault(section, {}).update(values)
    path = Path(directory) / f"{name}.toml"
    path.write_text(dump_toml(doc))
    return path


@pytest.fixture
def quick_study(tmp_path):
    """Factory: a small, fast quick-start study file in tmp_path."""

    def make(name: str = "qs", **sections) -> Path:
        sections.setdefault("coarse", {"trials": 6})
        sections.setdefault("fine", {"trials": 4, "top_k": 2})
        sections.setdefault("optuna", {})
        sections["optuna"] = {"workers": 1, **sections["optuna"]}
        # No replicates and no race unless a test asks: most tests are about other things.
        sections["coarse"] = {"replicates": 1, **sections["coarse"]}
        sections["fine"] = {"replicates": 1, "race_runs": 0, **sections["fine"]}
        sections.setdefault("final", {})
        sections["final"] = {"seeds": 1, **sections["final"]}
        return write_study(tmp_path, name, **sections)

    return make


STORAGE_KINDS = ["sqlite", "journal", pytest.param("postgres", marks=pytest.mark.postgres)]


@pytest.fixture(params=STORAGE_KINDS)
def any_storage_url(request, tmp_path):
    """The URL of an empty storage of each kind: SQLite, a journal file, PostgreSQL."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path / 'contract.db'}"
    elif request.param == "journal":
        yield f"journal:///{tmp_path / 'contract.log'}"
    else:
        from tests.search import pg_util

        with pg_util.temporary_database() as url:
            yield url


# ----------------------------------------------------------------------------- the dashboard

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


def start_coarse(path: Path, url: str, *flags: str) -> subprocess.Popen:
    """``search.coarse`` as a terminal runs it: in a process group of its own, so a
    Ctrl-C is ``os.killpg(proc.pid, signal.SIGINT)``; stdout and stderr captured."""
    return subprocess.Popen(
        [sys.executable, "-m", "search.coarse", "--study", str(path), "--storage", url, *flags],
        cwd=REPO,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )


def wait_until_training(proc: subprocess.Popen, url: str, name: str, timeout: float = 120) -> None:
    """Until a trial of study ``name`` trains (RUNNING, its parameters drawn); raises if
    ``proc`` ends first or nothing trains within ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, f"the command ended (exit {proc.returncode}) before training"
        storage = optuna.storages.RDBStorage(url)
        try:
            trials = optuna.load_study(study_name=name, storage=storage).get_trials()
        except (KeyError, sqlalchemy.exc.SQLAlchemyError):  # the command is creating it
            trials = []
        finally:
            storage.engine.dispose()
        if any(t.state == TrialState.RUNNING and t.params for t in trials):
            return
        time.sleep(0.05)
    raise AssertionError(f"no trial of {name} trained within {timeout:g} s")


@pytest.fixture
def error_line(capsys):
    """Call it after a command: the one line it printed on stderr, checked to be the only
    line and to carry no traceback."""

    def read() -> str:
        err = capsys.readouterr().err
        assert "Traceback" not in err, err
        lines = [line for line in err.splitlines() if line.strip()]
        assert len(lines) == 1, err
        return lines[0]

    return read


@pytest.fixture
def qs_path(quick_study):
    """A quick-start study of 2 trials of 1 cycle, as a path string for ``--study``."""
    return str(quick_study(coarse={"trials": 2}, training={"n_cycles": 1}))


@contextlib.contextmanager
def tmpfs(path: Path, size: str) -> Iterator[Path]:
    """A tmpfs of ``size`` ("256k") mounted at ``path``, unmounted after (needs root:
    skipped elsewhere, failed in CI)."""
    path.mkdir(parents=True, exist_ok=True)
    done = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
        capture_output=True,
        text=True,
    )
    if done.returncode != 0:
        missing(f"cannot mount a tmpfs (needs root): {done.stderr.strip()}")
    try:
        yield path
    finally:
        subprocess.run(["umount", "-l", str(path)], capture_output=True)


@pytest.fixture
def small_disk(tmp_path):
    """Factory: a tmpfs of ``size`` ("256k") mounted in tmp_path, unmounted after the test
    (needs root: skipped elsewhere, failed in CI)."""
    with contextlib.ExitStack() as stack:
        yield lambda name, size: stack.enter_context(tmpfs(tmp_path / name, size))


def run_coarse(path: Path, url: str, *, timeout: float) -> subprocess.CompletedProcess:
    """``search.coarse`` on a study file and storage, run to its end in a process of its
    own; its output captured."""
    return subprocess.run(
        [sys.executable, "-m", "search.coarse", "--study", str(path), "--storage", url],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def limited_role():
    """Factory: ``(url, admin_url)`` of a new PostgreSQL database owned by a new role that
    may hold at most ``limit`` connections (``admin_url``: the same database as the admin
    user, whose connections do not count). Both dropped after the test."""
    import uuid

    from tests.search import pg_util

    made: list[tuple[str, str]] = []
    admin = pg_util._admin_connection()
    if admin is None:
        missing(f"PostgreSQL does not answer on {pg_util.HOST}:{pg_util.PORT}")
    user = admin.get_dsn_parameters()["user"]

    def make(limit: int) -> tuple[str, str]:
        name = f"c2f_lim_{uuid.uuid4().hex[:10]}"
        with admin.cursor() as cur:
            cur.execute(f'CREATE ROLE "{name}" LOGIN CONNECTION LIMIT {int(limit)}')
            cur.execute(f'CREATE DATABASE "{name}" OWNER "{name}"')
        made.append((name, name))
        return pg_util.url_for(name, name), pg_util.url_for(name, user)

    yield make
    for database, role in made:
        pg_util.drop_database(admin, database)
        with admin.cursor() as cur:
            cur.execute(f'DROP ROLE IF EXISTS "{role}"')
    admin.close()


def connect_as(url: str):
    """A psycopg2 connection as the URL's user (for a limited role: one of its slots)."""
    import psycopg2
    from sqlalchemy.engine import make_url

    u = make_url(url)
    return psycopg2.connect(host=u.host, port=u.port, user=u.username, dbname=u.database)


def queue_for_role(url: str, admin_url: str, n: int, study_name: str = "s") -> None:
    """The study ``study_name`` with ``n`` queued trials in a :func:`limited_role` database,
    set up by the admin (Optuna's first set-up of the tables takes two connections at
    once) and granted to the role."""
    import optuna
    from sqlalchemy.engine import make_url

    storage = optuna.storages.RDBStorage(admin_url)
    study = optuna.create_study(storage=storage, study_name=study_name, direction="maximize")
    for _ in range(n):
        study.enqueue_trial({})
    storage.engine.dispose()
    role = make_url(url).username
    with contextlib.closing(connect_as(admin_url)) as con, con, con.cursor() as cur:
        cur.execute(f'GRANT ALL ON ALL TABLES IN SCHEMA public TO "{role}"')
        cur.execute(f'GRANT ALL ON ALL SEQUENCES IN SCHEMA public TO "{role}"')


def is_new_fine_trial(trial: optuna.trial.FrozenTrial) -> bool:
    """A fine trial of the stage's own target: not a coarse run carried over, not a race
    or replicate run."""
    from search.sweep.narrowing import FROM_COARSE
    from search.sweep.replicates import is_replicate

    return FROM_COARSE not in trial.user_attrs and not is_replicate(trial)
