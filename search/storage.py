"""Optuna storages from a URL: SQLite (default), PostgreSQL, or a journal file.

SQLite is set up for many processes on one file: WAL journal (readers such as
optuna-dashboard never block the writers) and a long busy timeout, and the
calls Optuna makes outside a trial are retried when the file is still locked.
Heartbeats find the trials of killed workers; they are re-queued with the same
parameters (:func:`retry_lost_trial`).
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import sqlite3
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import optuna
from optuna.storages import RDBStorage
from optuna.storages._rdb import models as rdb_models
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import TrialState

T = TypeVar("T")
SQLITE_TIMEOUT_S = 120
MAX_RETRIES = 3


def safe_url(url: str) -> str:
    """The storage URL with any password hidden, for messages."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a SQLAlchemy URL (journal file): nothing to hide
        return url


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

    def connect() -> RDBStorage:
        # Heartbeats are what make a killed worker's trial come back; Optuna still
        # calls them experimental and would warn on every worker start.
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            cls = SQLiteStorage if db is not None else RDBStorage
            return cls(
                url,
                engine_kwargs=engine_kwargs,
                heartbeat_interval=heartbeat_interval,
                grace_period=grace_period,
                heartbeat_stale_trial_callback=retry_lost_trial,
            )

    storage = with_retries(connect)
    if db is not None:
        _serialise_sqlite_writes(storage)
    return storage


_READ_ONLY: contextvars.ContextVar[bool] = contextvars.ContextVar("c2f_read_only", default=False)


class SQLiteStorage(RDBStorage):
    """RDBStorage tuned for many worker processes on one SQLite file.

    - Reads (``get_*`` and the getters Optuna's trial cache calls) run in deferred
      transactions: in WAL mode they need no lock, so a sampler reading every
      finished trial never holds up another worker's write. Every other
      transaction begins with ``BEGIN IMMEDIATE`` (:func:`_serialise_sqlite_writes`).
    - ``trial.report`` is one upsert instead of Optuna's three ORM queries: a
      trial reports at every evaluation point, and with several workers on short
      trials the write lock held through those queries was what limited them.
      If the installed Optuna's tables differ from what the statement expects,
      Optuna's own implementation is used.
    """

    def __setstate__(self, state: dict) -> None:
        # Unpickling builds a new engine: give it the same transaction rules.
        super().__setstate__(state)
        _serialise_sqlite_writes(self)

    def set_trial_intermediate_value(
        self, trial_id: int, step: int, intermediate_value: float
    ) -> None:
        if not _FAST_REPORT:
            super().set_trial_intermediate_value(trial_id, step, intermediate_value)
            return
        value, kind = _IV.intermediate_value_to_stored_repr(intermediate_value)
        with self.engine.begin() as conn:  # BEGIN IMMEDIATE
            state = conn.exec_driver_sql(
                "SELECT state FROM trials WHERE trial_id = ?", (trial_id,)
            ).scalar()
            if state is None:
                raise KeyError(f"No trial with trial_id {trial_id} exists.")
            self.check_trial_is_updatable(trial_id, TrialState[state])
            conn.exec_driver_sql(
                "INSERT INTO trial_intermediate_values "
                "(trial_id, step, intermediate_value, intermediate_value_type) "
                "VALUES (?, ?, ?, ?) ON CONFLICT (trial_id, step) DO UPDATE SET "
                "intermediate_value = excluded.intermediate_value, "
                "intermediate_value_type = excluded.intermediate_value_type",
                (trial_id, step, value, kind.name),
            )


_IV = rdb_models.TrialIntermediateValueModel
# The upsert above names these columns and stores the enum by name, as SQLAlchemy does.
_FAST_REPORT = (
    set(_IV.__table__.columns.keys())
    >= {
        "trial_id",
        "step",
        "intermediate_value",
        "intermediate_value_type",
    }
    and "state" in rdb_models.TrialModel.__table__.columns.keys()
)


@contextlib.contextmanager
def read_only() -> Iterator[None]:
    """SQLite transactions begun inside are deferred (no write lock); others unaffected."""
    token = _READ_ONLY.set(True)
    try:
        yield
    finally:
        _READ_ONLY.reset(token)


# The system attr where a worker records which process runs a trial (search.study).
OWNER = "c2f_owner"
MAX_RETRIES_OF_LOST_TRIAL = 3


def requeue(
    study: optuna.Study, failed: optuna.trial.FrozenTrial, *, limit: int | None = None
) -> bool:
    """Queue a failed trial again with the same parameters; False if it ran out of retries.

    Its system attrs go along (``fixed_params`` holds the parameters of an enqueued
    trial that died before it suggested them), but not the owner of the dead run.
    ``failed_trial`` and ``retry_history`` follow Optuna's retry callback:
    the first trial of the series and every try so far.
    """
    system_attrs = {k: v for k, v in failed.system_attrs.items() if k != OWNER}
    history = [*system_attrs.get("retry_history", []), failed.number]
    if limit is not None and len(history) > limit:
        return False
    system_attrs |= {
        "requeued_from": failed.number,
        "failed_trial": system_attrs.get("failed_trial", failed.number),
        "retry_history": history,
    }
    study.add_trial(
        optuna.create_trial(
            state=TrialState.WAITING,
            params=failed.params,
            distributions=failed.distributions,
            system_attrs=system_attrs,
        )
    )
    return True


def retry_lost_trial(study: optuna.Study, failed: optuna.trial.FrozenTrial) -> None:
    """The heartbeat's stale-trial callback: the same retry as every other lost trial."""
    requeue(study, failed, limit=MAX_RETRIES_OF_LOST_TRIAL)


def _read_only(method: Callable[..., T]) -> Callable[..., T]:
    @functools.wraps(method)
    def wrapper(self, *args, **kwargs):  # noqa: ANN001, ANN202
        with read_only():
            return method(self, *args, **kwargs)

    return wrapper


# The public getters, and the private ones Optuna's trial cache calls instead.
_READS = {"_get_trials", "_get_best_trial_id", "_get_stale_trial_ids"}
for _name in dir(RDBStorage):
    if (_name.startswith("get_") or _name in _READS) and callable(getattr(RDBStorage, _name)):
        setattr(SQLiteStorage, _name, _read_only(getattr(RDBStorage, _name)))


def _serialise_sqlite_writes(storage: RDBStorage) -> None:
    """Make every SQLite write transaction take the write lock when it begins.

    Optuna pops a queued trial with SELECT ... FOR UPDATE then UPDATE; SQLite has
    no row locks, and pysqlite only opens a transaction at the UPDATE, so two
    processes could both pop the same WAITING trial. ``BEGIN IMMEDIATE`` makes
    the read and the write one atomic step; WAL still lets readers (the
    dashboard) in while a writer holds the lock. The reads of
    :class:`SQLiteStorage` begin a deferred transaction instead, which takes no
    lock. ``synchronous=NORMAL`` (safe with WAL: a crash of the process loses
    nothing, a power cut at most the last commits, never consistency) saves an
    fsync on every report.
    """
    from sqlalchemy import event

    engine = storage.engine

    @event.listens_for(engine, "connect")
    def _no_implicit_transactions(dbapi_connection, _record) -> None:
        dbapi_connection.isolation_level = None
        dbapi_connection.execute("PRAGMA synchronous=NORMAL")

    @event.listens_for(engine, "begin")
    def _begin(conn) -> None:
        if _READ_ONLY.get():
            conn.exec_driver_sql("BEGIN")
        else:
            _begin_immediate(conn.connection.dbapi_connection)

    engine.dispose()  # connections made before the listeners existed are dropped


def _begin_immediate(dbapi_connection: sqlite3.Connection) -> None:
    """``BEGIN IMMEDIATE``, retried at sub-millisecond intervals while the lock is taken.

    SQLite's own busy handler sleeps 1, 2, 5, 10, ... ms between tries, which is
    longer than most of Optuna's write transactions (a report takes ~1 ms): with
    several workers reporting often, half their time went to sleeping on a lock
    that was already free. The busy timeout is off only for these tries.
    """
    deadline = time.monotonic() + SQLITE_TIMEOUT_S
    delay = 5e-5
    dbapi_connection.execute("PRAGMA busy_timeout=0")
    try:
        while True:
            try:
                dbapi_connection.execute("BEGIN IMMEDIATE")
                return
            except sqlite3.OperationalError as exc:
                if "locked" not in str(exc) and "busy" not in str(exc):
                    raise
                if time.monotonic() > deadline:
                    raise
            time.sleep(delay)
            delay = min(delay * 1.5, 2e-3)
    finally:
        dbapi_connection.execute(f"PRAGMA busy_timeout={SQLITE_TIMEOUT_S * 1000}")


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
