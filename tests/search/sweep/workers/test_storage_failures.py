"""Storage and disk failures: one line saying what happened and what to do, exit 1, no
traceback (exit 2 for a URL that names no storage); the database is never left corrupt
and no finished trial is lost when the disk fills mid-run."""

from __future__ import annotations

import contextlib
import os
import shutil
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import optuna
import pytest
from optuna.trial import TrialState

from search import coarse, status
from search.sweep import studies as st
from search.sweep.workers.storage import StorageError, describe_failure, make_storage
from tests.search.conftest import tmpfs

REPO = Path(__file__).resolve().parents[4]


def fill(directory: Path) -> Path:
    """Fill the file system of ``directory`` to the last byte; the filler file."""
    filler = directory / "filler"
    with contextlib.suppress(OSError), open(filler, "wb") as f:
        while True:
            f.write(b"\0" * 65536)
            f.flush()
    with contextlib.suppress(OSError), open(filler, "ab") as f:  # the last partial block
        while True:
            f.write(b"\0" * 512)
            f.flush()
    return filler


def one_line(capsys) -> str:
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture
def qs(quick_study):
    return str(quick_study(coarse={"trials": 2}, training={"n_cycles": 1}))


def test_a_url_that_names_no_storage_is_a_setting(qs, capsys):
    for url, words in [
        ("sqllite:///x.db", "unknown storage scheme 'sqllite://'"),
        ("sqlite:///", "in-memory SQLite database keeps nothing"),
        ("sqlite:///:memory:", "in-memory SQLite database keeps nothing"),
        ("not-a-url", "storage must be a URL like sqlite:///PATH.db"),
        ("postgresql+psycopg2://postgres@127.0.0.1:notaport/test", "port must be a number 1"),
        ("postgresql+psycopg2://postgres@127.0.0.1:99999/test", "1 to 65535, got 99999"),
    ]:
        assert coarse.main(["--study", qs, "--storage", url]) == 2, url
        line = one_line(capsys)
        assert line.startswith("error: ") and words in line, line


def test_a_storage_that_cannot_be_used_is_one_line_and_exit_1(qs, tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(
        "search.sweep.workers.storage.time.sleep", lambda s: None
    )  # no waits to retry
    a_file = tmp_path / "notes.txt"
    a_file.write_text("some notes, not a database\n" * 100)
    binary = tmp_path / "binary.log"
    binary.write_bytes(b"\xff\xfe\x00garbage\n")
    pg_down = "postgresql+psycopg2://root@127.0.0.1:1/test"
    for url, words in [
        (f"sqlite:///{a_file}", f"{a_file} is not an SQLite database"),
        (f"journal:///{a_file}", f"{a_file} is not a journal file Optuna can read"),
        (f"journal:///{binary}", f"{binary} is not a journal file Optuna can read"),
        (f"sqlite:///{a_file}/x.db", f"cannot create or open {a_file}/x.db"),
        (pg_down, "PostgreSQL at 127.0.0.1:1/test does not answer"),
    ]:
        assert coarse.main(["--study", qs, "--storage", url]) == 1, url
        line = one_line(capsys)
        assert line.startswith("error: ") and words in line, line
    # Optuna's own answers about studies and trials are not failures of the storage.
    assert describe_failure(KeyError("Record does not exist."), pg_down) is None
    assert describe_failure(ValueError("database 'x' does not exist"), pg_down) is None
    assert "start the server, or check the host and port" in describe_failure(
        _error_of(lambda: make_storage(pg_down)), pg_down
    )


def _error_of(fn) -> BaseException:
    try:
        fn()
    except BaseException as exc:  # noqa: BLE001 - the error is what is looked at
        return exc.__cause__ or exc
    raise AssertionError("no error")


def _finished_db(quick_study, tmp_path) -> Path:
    path = quick_study("done", coarse={"trials": 2}, training={"n_cycles": 1})
    assert coarse.main(["--study", str(path)]) == 0
    return tmp_path / "done.db"


def test_corrupt_truncated_and_other_version_databases(quick_study, tmp_path, capsys):
    db = _finished_db(quick_study, tmp_path)
    capsys.readouterr()
    truncated = tmp_path / "truncated.db"
    shutil.copy(db, truncated)
    with open(truncated, "r+b") as f:
        f.truncate(os.path.getsize(truncated) // 3)
    assert status.main(["--storage", f"sqlite:///{truncated}"]) == 1
    line = one_line(capsys)
    assert f"{truncated} is corrupt" in line and ".recover" in line, line

    for version, fix in [
        ("v3.0.0.a", "run `optuna storage upgrade --storage sqlite:///"),  # an older schema
        ("v99.0.0", "install the newer Optuna that made it"),  # a newer one
    ]:
        other = tmp_path / f"{version}.db"
        shutil.copy(db, other)
        con = sqlite3.connect(other)
        con.execute("UPDATE alembic_version SET version_num = ?", (version,))
        con.commit()
        con.close()
        assert status.main(["--storage", f"sqlite:///{other}"]) == 1
        line = one_line(capsys)
        assert "holds tables made by another version of Optuna" in line and fix in line, line


def test_read_only_database_and_full_disk_before_the_run(quick_study, tmp_path, capsys):
    db = _finished_db(quick_study, tmp_path)
    path = str(tmp_path / "done.toml")
    with tmpfs(tmp_path / "ro", "2m") as ro:
        shutil.copy(db, ro / "done.db")
        subprocess.run(["mount", "-o", "remount,ro", str(ro)], check=True)
        capsys.readouterr()
        for url in (f"sqlite:///{ro}/done.db", f"sqlite:///{ro}/new.db", f"journal:///{ro}/j.log"):
            assert coarse.main(["--study", path, "--storage", url, "--trials", "3"]) == 1
            line = one_line(capsys)
            assert "cannot be written (read-only file system)" in line, line
    with tmpfs(tmp_path / "full", "256k") as full:
        fill(full)
        for url in (f"sqlite:///{full}/x.db", f"journal:///{full}/x.log"):
            assert coarse.main(["--study", path, "--storage", url]) == 1
            line = one_line(capsys)
            assert f"the disk holding {full}/x." in line and "is full" in line, line
            assert "free some space, then run the same command again" in line


def test_storage_errors_are_named_in_the_storage_not_by_the_caller(tmp_path):
    """The wrapper every call goes through names a failure: no caller needs to."""
    url = f"sqlite:///{tmp_path / 'n.db'}"
    storage = make_storage(url)
    study = optuna.create_study(storage=storage, study_name="n")
    (tmp_path / "n.db").write_bytes(b"garbage" * 1000)
    storage.backend.engine.dispose()
    with pytest.raises(StorageError, match="is not an SQLite database"):
        study.get_trials()


def _counts(db: Path) -> dict[str, int]:
    if not db.exists():
        return {}
    con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=30)
    try:
        rows = con.execute("SELECT state, count(*) FROM trials GROUP BY state").fetchall()
    except sqlite3.OperationalError:  # no tables yet
        return {}
    finally:
        con.close()
    return dict(rows)


# The full disk's message: test_read_only_database_and_full_disk_before_the_run (the time budget).
@pytest.mark.slow
def test_disk_full_mid_run_loses_nothing_and_resumes_to_the_exact_target(quick_study, tmp_path):
    """Fill the disk under a running coarse search: it stops with one line and exit 1, the
    database stays sound with every finished trial; freed, the same command finishes
    exactly the target."""
    with tmpfs(tmp_path / "disk", "8m") as disk:
        db = disk / "qs.db"
        path = quick_study(
            coarse={"trials": 16},
            training={"n_cycles": 2},
            optuna={
                "workers": 2,
                "storage": f"sqlite:///{db}",
                "pruner": "none",
                # The trial taken when the disk filled may have no owner record (its write
                # failed): it counts as lost after the grace period, short here.
                "heartbeat_interval": 1,
                "grace_period": 3,
            },
        )
        cmd = [sys.executable, "-m", "search.coarse", "--study", str(path)]
        env = {**os.environ, "PYTHONPATH": str(REPO)}
        proc = subprocess.Popen(
            cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        deadline = time.monotonic() + 120
        while _counts(db).get("COMPLETE", 0) < 3 and proc.poll() is None:
            assert time.monotonic() < deadline, "no trial finished in 2 minutes"
            time.sleep(0.05)
        filler = fill(disk)
        before = {
            t.number: t.value
            for t in optuna.load_study(
                study_name="qs-coarse", storage=f"sqlite:///{db}"
            ).get_trials(states=(TrialState.COMPLETE,))
        }
        out, err = proc.communicate(timeout=120)
        assert proc.returncode == 1, (out, err)
        assert "Traceback" not in err, err
        errors = [line for line in err.splitlines() if line.startswith("error: ")]
        assert len(errors) == 1 and f"the disk holding {db} is full" in errors[0], err
        assert "free some space, then run the same command again" in errors[0]

        filler.unlink()  # the user frees space
        con = sqlite3.connect(db)
        assert con.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        con.close()
        rerun = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
        assert rerun.returncode == 0, rerun.stderr
        study = optuna.load_study(study_name="qs-coarse", storage=f"sqlite:///{db}")
        trials = study.get_trials()
        assert sum(t.state in st.FINISHED for t in trials) == 16
        assert not [t for t in trials if t.state in st.LIVE]
        for number, value in before.items():  # every trial finished before the disk filled
            assert trials[number].state == TrialState.COMPLETE and trials[number].value == value
