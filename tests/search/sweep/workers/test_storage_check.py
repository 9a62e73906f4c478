"""``check_storage``: every storage that cannot be used is refused before anything is
written (no prepared data, no directory), in one line with the fix."""

from __future__ import annotations

import contextlib
import sqlite3
import subprocess
import sys

import optuna
import pytest
from sqlalchemy.engine import make_url

from search.sweep.workers.storage import (
    StorageError,
    StorageURLError,
    check_storage,
    make_storage,
    release,
)
from tests.search.conftest import connect_as


def entries(directory) -> set[str]:
    return {str(p.relative_to(directory)) for p in directory.rglob("*")}


def bad_storages(tmp_path) -> list[tuple[str, type, str]]:
    """(URL, the error, words of its message) for the storages that need no server."""
    notes = tmp_path / "notes.txt"
    notes.write_text("some notes, not a database\n" * 100)
    corrupt = tmp_path / "corrupt.db"
    optuna.create_study(storage=f"sqlite:///{corrupt}", study_name="s")
    raw = bytearray(corrupt.read_bytes())
    raw[100:4096] = b"\xff" * (4096 - 100)
    corrupt.write_bytes(bytes(raw))
    other = tmp_path / "other.db"
    optuna.create_study(storage=f"sqlite:///{other}", study_name="s")
    with sqlite3.connect(other) as con:
        con.execute("UPDATE alembic_version SET version_num = 'v9.9.9.z'")
    pg_down = "postgresql+psycopg2://root@127.0.0.1:1/test"
    return [
        ("not-a-url", StorageURLError, "storage must be a URL like sqlite:///PATH.db"),
        ("sqllite:///x.db", StorageURLError, "unknown storage scheme 'sqllite://'"),
        ("sqlite:///", StorageURLError, "in-memory SQLite database keeps nothing"),
        ("sqlite:///:memory:", StorageURLError, "in-memory SQLite database keeps nothing"),
        ("mysql://me@db.example/x", StorageURLError, "start the URL with mysql+pymysql://"),
        ("mysql+pymysql://me@db.example/x", StorageURLError, "pip install pymysql"),
        ("postgresql+psycopg://me@db.example/x", StorageURLError, "start the URL with"),
        (f"sqlite:///{tmp_path}/no/dir/x.db", StorageURLError, "mkdir -p"),
        (f"journal:///{tmp_path}/no/dir/x.log", StorageURLError, "mkdir -p"),
        (f"sqlite:///{notes}", StorageError, "is not an SQLite database"),
        (f"sqlite:///{notes}/x.db", StorageError, f"cannot create or open {notes}/x.db"),
        (f"sqlite:///{corrupt}", StorageError, "corrupt.db"),
        (f"sqlite:///{other}", StorageError, "holds tables made by another version of Optuna"),
        (pg_down, StorageError, "PostgreSQL at 127.0.0.1:1/test does not answer"),
    ]


def test_every_unusable_storage_is_refused_before_anything_is_written(tmp_path, monkeypatch):
    monkeypatch.setattr(
        "search.sweep.workers.storage.time.sleep", lambda s: None
    )  # no waits to retry
    for name in ("MySQLdb", "pymysql", "psycopg"):
        monkeypatch.setitem(sys.modules, name, None)
    cases = bad_storages(tmp_path)
    before = entries(tmp_path)
    for url, error, words in cases:
        with pytest.raises(error) as caught:
            check_storage(url)
        text = str(caught.value)
        assert words in text and "\n" not in text, (url, text)
    # SQLite's own -wal and -shm files beside an existing database are not counted: they
    # go when its connections close.
    assert {e for e in entries(tmp_path) if not e.endswith(("-wal", "-shm"))} == before


def test_read_only_and_full_disks_are_refused_before_anything_is_written(tmp_path, small_disk):
    full = small_disk("full", "64k")
    with contextlib.suppress(OSError), open(full / "filler", "wb") as f:  # every block taken
        while True:
            f.write(b"\0" * 4096)
            f.flush()
    read_only = small_disk("ro", "1m")
    subprocess.run(["mount", "-o", "remount,ro", str(read_only)], check=True)
    for url, words in [
        (f"sqlite:///{full}/x.db", f"the disk holding {full}/x.db is full"),
        (f"sqlite:///{read_only}/x.db", "cannot be written (read-only file system)"),
        (f"journal:///{read_only}/x.log", "cannot be written (read-only file system)"),
    ]:
        with pytest.raises(StorageError, match=words.replace("(", r"\(").replace(")", r"\)")):
            check_storage(url)
    assert sorted(p.name for p in full.iterdir()) == ["filler"]


@pytest.mark.postgres
def test_a_refused_postgresql_login_database_or_schema_is_refused_writing_nothing():
    from tests.search import pg_util

    with pg_util.temporary_database() as url:
        check_storage(url)  # a good one passes, and is not set up yet
        with contextlib.closing(connect_as(url)) as con, con.cursor() as cur:
            cur.execute(
                "SELECT count(*) FROM information_schema.tables WHERE table_schema = 'public'"
            )
            assert cur.fetchone()[0] == 0
        no_role = make_url(url).set(username="no_such_role").render_as_string(False)
        no_database = make_url(url).set(database="no_such_database").render_as_string(False)
        for bad in (no_role, no_database):
            with pytest.raises(StorageError, match="refused the login .* check user, password"):
                check_storage(bad)
        # Tables of another Optuna: named from a read of their version, nothing written.
        release(make_storage(url))
        with contextlib.closing(connect_as(url)) as con, con, con.cursor() as cur:
            cur.execute("UPDATE alembic_version SET version_num = 'v9.9.9.z'")
        with pytest.raises(StorageError, match="holds tables made by another version of Optuna"):
            check_storage(url)


def test_a_good_new_storage_passes_and_nothing_is_made(tmp_path):
    check_storage(f"sqlite:///{tmp_path / 'good.db'}")
    check_storage(f"journal:///{tmp_path / 'good.log'}")
    assert entries(tmp_path) == set()


def test_an_existing_good_storage_passes_unchanged(tmp_path):
    url = f"sqlite:///{tmp_path / 'done.db'}"
    storage = make_storage(url)
    optuna.create_study(storage=storage, study_name="s").enqueue_trial({"x": 1.0})
    release(storage)
    before = (tmp_path / "done.db").read_bytes()
    check_storage(url)
    assert (tmp_path / "done.db").read_bytes() == before
