"""Optuna storages from a URL: SQLite (default), PostgreSQL, or a journal file.

SQLite is set up for many processes on one file: WAL journal (readers such as
optuna-dashboard never block the writers) and a long busy timeout, and the
calls Optuna makes outside a trial are retried when the file is still locked.
Heartbeats find the trials of killed workers; they are re-queued with the same
parameters (``RetryHeartbeatStaleTrialCallback``).
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import optuna
from optuna.storages import RDBStorage, RetryHeartbeatStaleTrialCallback
from optuna.storages.journal import JournalFileBackend, JournalStorage

T = TypeVar("T")
SQLITE_TIMEOUT_S = 120
MAX_RETRIES = 3


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///`` URL, else None."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and url[len(prefix) :] not in ("", ":memory:"):
        return Path(url[len(prefix) :])
    return None


def _prepare_sqlite(path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    con = sqlite3.connect(path, timeout=SQLITE_TIMEOUT_S)
    try:
        # WAL is a property of the file: set once, every later connection uses it.
        con.execute("PRAGMA journal_mode=WAL")
    finally:
        con.close()


def make_storage(
    url: str, *, heartbeat_interval: int | None = 10, grace_period: int | None = 30
) -> optuna.storages.BaseStorage:
    """An Optuna storage for ``url``.

    - ``sqlite:///path.db``: RDBStorage with WAL and a busy timeout.
    - ``postgresql[+driver]://...``, ``mysql...``: RDBStorage (connections checked
      before use, so a restarted server is survived).
    - ``journal:///path.log`` or a path ending in ``.log``: a journal file.
    """
    if url.startswith("journal://") or (url.endswith(".log") and "://" not in url):
        path = url.removeprefix("journal://")
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        return JournalStorage(JournalFileBackend(path))
    if "://" not in url:
        raise ValueError(
            f"storage must be a URL like sqlite:///studies/x.db, "
            f"postgresql+psycopg2://user@host/db or journal:///path.log; got {url!r}"
        )
    engine_kwargs: dict = {}
    db = sqlite_path(url)
    if db is not None:
        _prepare_sqlite(db)
        engine_kwargs = {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
    elif url.startswith(("postgresql", "mysql")):
        engine_kwargs = {"pool_pre_ping": True}
    storage = with_retries(
        lambda: RDBStorage(
            url,
            engine_kwargs=engine_kwargs,
            heartbeat_interval=heartbeat_interval,
            grace_period=grace_period,
            heartbeat_stale_trial_callback=RetryHeartbeatStaleTrialCallback(max_retry=3),
        )
    )
    if db is not None:
        _serialise_sqlite_writes(storage)
    return storage


def _serialise_sqlite_writes(storage: RDBStorage) -> None:
    """Make every SQLite transaction take the write lock when it begins.

    Optuna pops a queued trial with SELECT ... FOR UPDATE then UPDATE; SQLite has
    no row locks, and pysqlite only opens a transaction at the UPDATE, so two
    processes could both pop the same WAITING trial. ``BEGIN IMMEDIATE`` makes
    the read and the write one atomic step; WAL still lets readers (the
    dashboard) in while a writer holds the lock.
    """
    from sqlalchemy import event

    engine = storage.engine

    @event.listens_for(engine, "connect")
    def _no_implicit_transactions(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None

    @event.listens_for(engine, "begin")
    def _begin_immediate(conn) -> None:
        conn.exec_driver_sql("BEGIN IMMEDIATE")

    engine.dispose()  # connections made before the listeners existed are dropped


def with_retries(fn: Callable[[], T], *, tries: int = MAX_RETRIES, what: str = "storage") -> T:
    """Call ``fn``, retrying a locked or briefly unreachable database with backoff."""
    for attempt in range(tries):
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - narrowed by message below
            text = str(exc).lower()
            transient = "locked" in text or "busy" in text or "could not connect" in text
            if not transient or attempt == tries - 1:
                raise
            time.sleep(0.5 * 2**attempt)
    raise AssertionError("unreachable")  # pragma: no cover
