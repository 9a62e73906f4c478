"""Optuna storages from a URL: SQLite (default), PostgreSQL, a journal file, or a proxy.

SQLite is set up for many processes on one file: WAL journal (readers such as
optuna-dashboard never block the writers) and a long busy timeout. Every
storage is wrapped in :class:`ResilientStorage`: a call that meets a briefly
unreachable database (a restarted server, a network cut, a locked file) is
retried with back-off instead of killing the worker. ``grpc://HOST:PORT`` is a
``c2f proxy`` (:mod:`search.sweep.workers.proxy`) in front of a database: the
workers of a large cluster hold no database connection of their own.

This is also the one place that touches Optuna's private API, each use with
the reason and a test (``tests/search/test_storage.py``,
``tests/search/sweep/workers/test_proxy.py``) that fails if Optuna changes it:
:func:`storage_of`, :func:`trial_id`, :func:`waiting_trial_ids`, Optuna's trial cache
(:func:`_cached`, :func:`learn_trial`), the upsert of :class:`SQLiteStorage`, and the
gRPC proxy's client (:class:`ProxyStorage`) and server (:func:`proxy_server`).
"""

from __future__ import annotations

import contextlib
import contextvars
import datetime
import errno
import functools
import json
import random
import sqlite3
import time
import weakref
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import optuna
import sqlalchemy
from optuna.storages import BaseStorage, GrpcStorageProxy, RDBStorage
from optuna.storages._rdb import models as rdb_models
from optuna.storages.journal import JournalFileBackend, JournalStorage
from optuna.trial import FrozenTrial, TrialState

from model.errors import UsageError

T = TypeVar("T")
# A server at its connection limit (PostgreSQL's max_connections or a role's CONNECTION
# LIMIT; MySQL's max_connections).
_TOO_MANY_WORDS = (
    "too many connections",
    "too many clients",
    "remaining connection slots are reserved",
)
SQLITE_TIMEOUT_S = 120
MAX_RETRIES = 3
# How long a worker keeps retrying an unreachable database before it gives up.
PATIENCE_S = 300.0


def storage_of(study: optuna.Study) -> BaseStorage:
    """The storage a study was opened with.

    Private (``Study._storage``): a study has no public accessor for it, and the
    worker loop needs the storage's atomic calls, not the study's.
    """
    return study._storage


def trial_id(trial: FrozenTrial | optuna.Trial) -> int:
    """The storage's id of a trial (frozen or running).

    Private (``FrozenTrial._trial_id``, ``Trial._trial_id``): the storage API takes
    trial ids, and the public way to get one (``get_trial_id_from_study_id_trial_number``)
    costs a query per call, on every look at the queue.
    """
    return trial._trial_id


def safe_url(url: str) -> str:
    """The storage URL with any password hidden, for messages."""
    try:
        from sqlalchemy.engine import make_url

        return make_url(url).render_as_string(hide_password=True)
    except Exception:  # noqa: BLE001 - not a SQLAlchemy URL (journal file): nothing to hide
        return url


def relative_url(url: str, base: Path) -> str:
    """``url`` with the path of its SQLite or journal file relative to ``base`` when the file
    is under it (a report does not show where the user's home is); else :func:`safe_url`."""
    path = _file_of(url)
    if path is not None:
        try:
            rel = path.resolve().relative_to(Path(base).resolve())
        except ValueError:
            return safe_url(url)
        return f"sqlite:///{rel}" if sqlite_path(url) else f"journal:///{rel}"
    return safe_url(url)


def sqlite_path(url: str) -> Path | None:
    """The file of a ``sqlite:///`` URL, else None."""
    prefix = "sqlite:///"
    if url.startswith(prefix) and url[len(prefix) :] not in ("", ":memory:"):
        return Path(url[len(prefix) :])
    return None


def _prepare_sqlite(path: Path) -> None:
    con = sqlite3.connect(path, timeout=SQLITE_TIMEOUT_S)
    try:
        # WAL is a property of the file: set once, every later connection uses it. Setting
        # it takes a lock SQLite does not wait for, so only when it is not set yet (and a
        # process doing the same at that moment is retried: with_retries).
        if con.execute("PRAGMA journal_mode").fetchone()[0].lower() != "wal":
            con.execute("PRAGMA journal_mode=WAL")
    finally:
        con.close()


def make_storage(
    url: str,
    *,
    patience: float = PATIENCE_S,
    log: Callable[[str], None] | None = None,
    connections: int = 1,
) -> ResilientStorage:
    """An Optuna storage for ``url``, retrying calls while the database is unreachable.

    - ``sqlite:///path.db``: RDBStorage with WAL and a busy timeout.
    - ``postgresql[+driver]://...``, ``mysql...``: RDBStorage (connections checked
      before use, so a restarted server is survived), holding at most ``connections``
      connections (one for a worker or a command; a proxy serves with more).
    - ``journal:///path.log`` or a path ending in ``.log``: a journal file.
    - ``grpc://HOST:PORT``: a ``c2f proxy`` in front of a database (no connection to the
      database from this process).

    Workers record their own heartbeats (``search.sweep.workers.lost``), on every kind of
    storage, so Optuna's heartbeat is not used. A URL that names no usable storage
    is a :class:`StorageURLError`; a storage that cannot be used (unreachable server,
    a file that cannot be written, a full disk, ...) a :class:`StorageError`, each
    one line saying what to do.
    """
    path = _file_of(url)
    new_file = path is not None and not path.exists()
    try:
        backend = _open(url, connections=connections)
    except Exception as exc:  # noqa: BLE001 - named by describe_failure, else re-raised
        if new_file:  # a storage that could not be made leaves no empty file behind
            for leftover in ("", "-wal", "-shm", "-journal"):
                with contextlib.suppress(OSError):
                    Path(f"{path}{leftover}").unlink()
        named = _named(exc, url)
        if named is exc:
            raise
        raise named from exc
    # Abstract to mypy only: every method is filled in below the class.
    storage = ResilientStorage(backend, patience=patience, log=log, url=url)  # type: ignore[abstract]
    _MADE[:] = [r for r in _MADE if r() is not None] + [weakref.ref(storage)]
    return storage


# Every storage this process made and still holds, for release_all. Plain references
# without callbacks: a weakref callback is code a stop signal could land in.
_MADE: list[weakref.ref[ResilientStorage]] = []


def release_all() -> None:
    """Close the pooled connections of every storage this process still holds (a command
    ending: SQLite then folds its -wal file back into the database and removes it)."""
    for ref in _MADE:
        storage = ref()
        if storage is not None:
            with contextlib.suppress(Exception):
                release(storage)


def _cached(backend: BaseStorage) -> BaseStorage:
    """Optuna's cache of finished trials in front of an RDB storage, as ``optuna.create_study``
    puts it there for a storage it is given (not for a wrapper such as ours).

    Private (``optuna.storages._cached_storage._CachedStorage``): without it every
    ``get_all_trials`` (the pruner's and the sampler's, several a trial) builds every
    trial from the database: 30 ms a call at 100 trials, a third of a quick-start trial.
    """
    if isinstance(backend, RDBStorage):
        from optuna.storages._cached_storage import _CachedStorage

        return _CachedStorage(backend)
    return backend


def learn_trial(storage: BaseStorage, study_id: int, tid: int) -> None:
    """Tell the storage's trial cache of trial ``tid``, which this process took by its id.

    The cache learns of trials only by its own reads of the study and the trials it
    creates. A trial queued by another process after this one's last read, then taken by
    id (:func:`waiting_trial_ids`), was unknown to it, and the cache's
    ``set_trial_param`` raised ``KeyError`` when the trial's objective asked for a
    parameter: a queued replicate failed. Private (``_CachedStorage._studies``,
    ``_add_trials_to_cache``, ``_StudyInfo.unfinished_trial_ids``, ``_lock``): the public
    way, ``get_all_trials``, reads every waiting trial, the cost the queue avoids; it is
    the fallback if Optuna changes them.
    """
    from optuna.storages import _cached_storage as cached

    cache = getattr(storage, "inner", storage)
    if not isinstance(cache, cached._CachedStorage):
        return
    retrying = storage.retrying if isinstance(storage, ResilientStorage) else _call
    if not _CACHE_PRIVATES:
        retrying(cache.get_all_trials, study_id, deepcopy=False, states=(TrialState.RUNNING,))
        return
    frozen = retrying(cache._backend.get_trial, tid)
    with cache._lock:
        info = cache._studies.setdefault(study_id, cached._StudyInfo())
        cache._add_trials_to_cache(study_id, [frozen])
        if not frozen.state.is_finished():
            info.unfinished_trial_ids.add(tid)  # read again until it is finished


def _call(method: Callable[..., T], *args, **kwargs) -> T:  # noqa: ANN002, ANN003
    return method(*args, **kwargs)


def _study_of_trial(storage: BaseStorage, tid: int) -> int | None:
    """The study of trial ``tid`` if the storage keeps Optuna's trial cache in front of a
    database (one indexed query on the private schema: a trial id is all the cache's
    ``set_trial_param`` is given), else None; None too if there is no such trial."""
    from optuna.storages._cached_storage import _CachedStorage

    backend = getattr(storage, "backend", storage)
    if not isinstance(getattr(storage, "inner", storage), _CachedStorage):
        return None
    if not isinstance(backend, RDBStorage):
        return None

    def query() -> int | None:
        with backend.engine.connect() as conn:
            return conn.execute(
                sqlalchemy.text("SELECT study_id FROM trials WHERE trial_id = :t"), {"t": tid}
            ).scalar()

    retrying = storage.retrying if isinstance(storage, ResilientStorage) else _call
    with read_only():
        study_id = retrying(query)
    return None if study_id is None else int(study_id)


def _cache_privates() -> bool:
    """Whether Optuna's trial cache still has what :func:`learn_trial` uses."""
    from optuna.storages import _cached_storage as cached

    info = cached._StudyInfo()
    return (
        all(
            hasattr(cached._CachedStorage, name)
            for name in ("_add_trials_to_cache", "_read_trials_from_remote_storage")
        )
        and isinstance(getattr(info, "unfinished_trial_ids", None), set)
        and isinstance(getattr(info, "trials", None), dict)
    )


_CACHE_PRIVATES = _cache_privates()


SUPPORTED = (
    "sqlite:///PATH.db, postgresql+psycopg2://USER@HOST:PORT/DB, mysql+pymysql://USER@HOST/DB, "
    "journal:///PATH.log or grpc://HOST:PORT (a c2f proxy)"
)
PROXY_SCHEME = "grpc://"
PROXY_INSTALL = "pip install 'coarse2fine[proxy]'"


def proxy_address(url: str) -> tuple[str, int] | None:
    """``(host, port)`` of a ``grpc://HOST:PORT`` storage (a ``c2f proxy``), else None; a
    :class:`StorageURLError` for a ``grpc://`` URL that names no host and port."""
    if not url.startswith(PROXY_SCHEME):
        return None
    rest = url[len(PROXY_SCHEME) :].rstrip("/")
    host, sep, port = rest.rpartition(":")
    example = "grpc://HOST:PORT, e.g. grpc://127.0.0.1:13000 (c2f proxy's --host and --port)"
    if not sep or not host or "/" in rest or "@" in rest or "?" in rest:
        raise StorageURLError(f"storage {url!r}: a proxy's URL is {example}")
    if not port.isdigit() or not 1 <= int(port) <= 65535:
        raise StorageURLError(f"storage {url!r}: the port must be 1 to 65535; {example}")
    return host.removeprefix("[").removesuffix("]"), int(port)


def _connect_proxy(host: str, port: int) -> ProxyStorage:
    """A client of the proxy at ``host:port`` that answered one call, which reads the
    database behind it (so a proxy whose database is down is found here too)."""
    storage = ProxyStorage(host=host, port=port)
    try:
        storage.get_all_studies()
    except BaseException:
        storage.close()
        raise
    return storage


def _proxy_of(storage: object) -> ProxyStorage | None:
    """The proxy client behind ``storage`` if it is one (:class:`ProxyStorage`), else None."""
    inner = getattr(storage, "backend", storage)
    return inner if isinstance(inner, ProxyStorage) else None


QUEUE_SERVICE = "c2f.Queue"  # the proxy's own service (search.sweep.workers.proxy)


def _dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Without Optuna's ExperimentalWarning for its gRPC classes: said once, in the README."""
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


class ProxyStorage(GrpcStorageProxy):
    """Optuna's client of a gRPC storage proxy, with the proxy's queue service beside it.

    :meth:`ask` calls the queue service (``c2f.Queue``); it answers None when the proxy is
    a plain Optuna one (the callers then use Optuna's own calls). :meth:`reconnect` opens
    a new channel and keeps the trial cache (before a fork: a child must not share one).

    Private (``GrpcStorageProxy._setup``, ``_channel``, ``_stub``, ``_cache`` and its
    ``grpc_client``): the queue service shares Optuna's channel, made and remade (after
    unpickling) in ``_setup``; and a new channel must not drop the cache, which would then
    read the whole study again.
    """

    def __init__(self, *, host: str, port: int) -> None:
        self.queue_service = True  # until the proxy says it has none
        with _quiet():
            super().__init__(host=host, port=port)

    def _setup(self) -> None:
        super()._setup()
        self._queue = {
            name: self._channel.unary_unary(
                f"/{QUEUE_SERVICE}/{name}",
                request_serializer=_dumps,
                response_deserializer=json.loads,
            )
            for name in ("Waiting", "Running", "Enqueue")
        }

    def __getstate__(self) -> dict[Any, Any]:
        state = super().__getstate__()
        state.pop("_queue", None)
        return state

    @property
    def address(self) -> str:
        return f"{self._host}:{self._port}"

    def ask(self, name: str, **request: Any) -> dict[str, Any] | None:
        """The queue service's answer to ``name`` (Waiting, Running, Enqueue), or None if
        the proxy has no queue service."""
        import grpc

        if not self.queue_service:
            return None
        try:
            return self._queue[name](request)
        except grpc.RpcError as exc:
            if exc.code() == grpc.StatusCode.UNIMPLEMENTED:  # type: ignore[attr-defined]
                self.queue_service = False
                return None
            raise

    def reconnect(self) -> None:
        """A new channel (connected at the next call), the trial cache kept."""
        cache = self._cache
        self._channel.close()
        self._setup()
        self._cache = cache
        cache.grpc_client = self._stub


def proxy_server(storage: BaseStorage, *, calls: Any) -> Any:
    """A gRPC server (not started, no port yet) with Optuna's storage proxy service on
    ``storage``, serving its calls on the threads of ``calls`` (a ThreadPoolExecutor).

    Private (``optuna.storages._grpc``: ``OptunaStorageProxyService``,
    ``add_StorageServiceServicer_to_server``): the server that
    :func:`optuna.storages.run_grpc_proxy_server` builds and runs, built here, because
    Optuna keeps it to itself: a stop signal must stop it gracefully, the queue service
    must join it, and the port it binds must be known (``--port 0``).
    """
    import grpc
    from optuna.storages._grpc.auto_generated import api_pb2_grpc
    from optuna.storages._grpc.servicer import OptunaStorageProxyService

    # Not SO_REUSEPORT (gRPC's default): a second proxy on a taken port would share it
    # silently, and the workers' calls would go to either one, maybe another database.
    server = grpc.server(calls, options=[("grpc.so_reuseport", 0)])
    api_pb2_grpc.add_StorageServiceServicer_to_server(OptunaStorageProxyService(storage), server)
    return server


def _proxy_installed() -> bool:
    import importlib.util

    return all(importlib.util.find_spec(m) is not None for m in ("grpc", "google.protobuf"))


class StorageURLError(UsageError):
    """A storage URL that names no storage this tool can use (a setting to fix: exit 2)."""


class StorageError(RuntimeError):
    """A storage that cannot be used as it is; the message says what happened and what to do."""


def _open(url: str, *, connections: int = 1) -> BaseStorage:
    check_url(url)
    if url.startswith("journal://") or (url.endswith(".log") and "://" not in url):
        return JournalStorage(JournalFileBackend(url.removeprefix("journal://")))
    address = proxy_address(url)
    if address is not None:
        return with_retries(lambda: _connect_proxy(*address))
    db = sqlite_path(url)
    if db is not None:
        with_retries(lambda: _prepare_sqlite(db))
    engine_kwargs = _engine_kwargs(url, connections=connections)

    def connect_once() -> RDBStorage:
        if db is not None:
            return SQLiteStorage(url, engine_kwargs=engine_kwargs)
        # Optuna's own check of the schema holds two connections at once; this one, one.
        storage = RDBStorage(url, engine_kwargs=engine_kwargs, skip_compatibility_check=True)
        _check_schema(storage)
        return storage

    def connect() -> RDBStorage:
        for attempt in range(CREATION_TRIES):
            try:
                return connect_once()
            except Exception as exc:  # noqa: BLE001 - narrowed by _made_by_another
                if not _made_by_another(exc) or attempt == CREATION_TRIES - 1:
                    raise
                time.sleep(random.uniform(0.05, 0.3))  # apart, or they collide again
        raise AssertionError("unreachable")

    storage = with_retries(connect)
    if db is not None:
        _serialise_sqlite_writes(storage)
    else:
        _one_connection(storage.engine)
    return storage


# Processes that open a new database at once (two machines' first commands, a compose
# file's workers) each create Optuna's tables and record its schema's version: Optuna
# checks, then creates, so all but the first find a table, a type or a row another one
# has just made. Opened again, the storage finds them there and creates nothing.
_MADE_BY_ANOTHER_WORDS = (
    "already exists",  # SQLite, PostgreSQL, MySQL: a table (or PostgreSQL's type) made
    "duplicate key value",  # PostgreSQL: an enum type or a version row (alembic's) made
    "unique constraint failed",  # SQLite: a version row (alembic's) made
    "duplicate entry",  # MySQL: a version row made
)
CREATION_TRIES = 8


def _made_by_another(exc: BaseException) -> bool:
    """Whether ``exc`` is Optuna's table creation finding what another process made."""
    return any(w in str(e).lower() for e in _chain(exc) for w in _MADE_BY_ANOTHER_WORDS)


def _engine_kwargs(url: str, *, connections: int = 1) -> dict:
    """How this tool connects to the database of ``url`` (SQLAlchemy's engine arguments)."""
    if sqlite_path(url) is not None:
        return {"connect_args": {"timeout": SQLITE_TIMEOUT_S}}
    if not url.startswith(("postgresql", "mysql")):
        return {}
    # One connection per process (see _one_connection), ``connections`` for a proxy; one
    # more only while Optuna sets up its tables, which nests two sessions.
    kwargs: dict = {"pool_pre_ping": True, "pool_size": connections, "max_overflow": 1}
    if (
        url.startswith("postgresql")
        and "psycopg" in url.split("://")[0]
        or url.startswith("postgresql://")
    ):
        # A partition that drops packets (no reset) must end in an error, not a query
        # that waits for ever: keepalives find a dead connection in about 25 s.
        kwargs["connect_args"] = {
            "connect_timeout": 10,
            "keepalives": 1,
            "keepalives_idle": 10,
            "keepalives_interval": 5,
            "keepalives_count": 3,
            # A worker stopped (SIGSTOP, a paused VM) inside a transaction would hold
            # its row locks, and every other worker's write to that trial would wait
            # for it: the server ends such a session after 30 s instead.
            "options": "-c idle_in_transaction_session_timeout=30000",
        }
    return kwargs


def _check_schema(storage: RDBStorage) -> None:
    """Optuna's check that its tables are of this version, one connection at a time (the
    same RuntimeError as Optuna's own, which :func:`describe_failure` names)."""
    current, head = storage.get_current_version(), storage.get_head_version()
    if current == head:
        return
    fix = (
        "Please execute `$ optuna storage upgrade --storage $STORAGE_URL` for upgrading "
        "the storage."
        if current in storage.get_all_versions()
        else "Please try updating optuna to the latest version by `$ pip install -U optuna`."
    )
    raise RuntimeError(
        f"The runtime optuna version {optuna.__version__} is no longer compatible with the "
        f"table schema (schema {current}, this Optuna's {head}). {fix}"
    )


def _one_connection(engine: sqlalchemy.engine.Engine) -> None:
    """At most one connection to the server from this process from now on (the pool's
    size: ``connections`` for a proxy), shared by its threads (a worker's heartbeat waits
    for the loop's query, a few ms): a server's max_connections then caps the workers,
    not half as many.

    Private (``QueuePool._max_overflow``): the pool's size is fixed when Optuna makes the
    engine, and Optuna's table set-up needs a second connection; kept by ``dispose``. Left
    as it is (two at most) if SQLAlchemy changes it.
    """
    pool = engine.pool
    if isinstance(pool, sqlalchemy.pool.QueuePool) and isinstance(
        getattr(pool, "_max_overflow", None), int
    ):
        pool._max_overflow = 0


def check_url(url: str) -> None:
    """A :class:`StorageURLError` for a URL that names no storage this tool can use, found
    without writing anything: not a URL, an in-memory database, an unknown scheme, a driver
    that is not installed, the directory of a SQLite or journal file that does not exist."""
    if "://" not in url and not url.endswith(".log"):
        raise StorageURLError(f"storage must be a URL like {SUPPORTED}; got {url!r}")
    if proxy_address(url) is not None:
        if not _proxy_installed():
            raise StorageURLError(
                f"storage {url!r} is a c2f proxy, and talking to one needs grpcio and "
                f"protobuf, which are not installed: {PROXY_INSTALL}"
            )
        return
    if "://" in url and not url.startswith("journal://"):
        from search.config.study import IN_MEMORY, in_memory

        if in_memory(url):
            raise StorageURLError(f"storage {url!r}: {IN_MEMORY}")
        _check_scheme(url)
    path = _file_of(url)
    if path is not None and not path.parent.exists():
        # A typo in a path must not leave a tree of directories behind it. (A file where a
        # directory should be is a storage that cannot be opened, named when it is.)
        existing = path.parent
        while not existing.exists() and existing != existing.parent:
            existing = existing.parent
        if existing.is_dir():
            raise StorageURLError(
                f"storage {safe_url(url)!r}: the directory {path.parent} does not exist; "
                f"create it (mkdir -p {path.parent}) or give a file in an existing directory"
            )


def check_storage(url: str) -> None:
    """Refuse a storage that cannot be used, before anything is written.

    A command calls this first, before it prepares data, makes a directory or creates
    its database: a bad URL (:func:`check_url`); a new SQLite or journal file whose
    directory cannot be written or whose disk is full; an existing file that is not a
    database, is corrupt or of another Optuna (opened once, then closed); a server that
    does not answer, refuses the login, has no connection left or holds tables of
    another Optuna (one connection, reads only, then closed). Raises
    :class:`StorageURLError` (a setting: exit 2) or :class:`StorageError` (exit 1), each
    one line with the fix. Creates nothing: a good new storage is made by the command
    once its settings are known good too.
    """
    check_url(url)
    path = _file_of(url)
    address = proxy_address(url)
    try:
        if address is not None:
            with_retries(lambda: _connect_proxy(*address)).close()
        elif path is None:
            with_retries(lambda: _probe_server(url))
        elif path.exists():
            release(make_storage(url, patience=0))
        else:
            _check_new_file(path)
    except Exception as exc:  # noqa: BLE001 - named by describe_failure, else re-raised
        named = _named(exc, url)
        if named is exc:
            raise
        raise named from exc


# A new storage file needs at least this much room (Optuna's tables in SQLite: ~0.3 MB).
MIN_FREE_BYTES = 1 << 20


def _check_new_file(path: Path) -> None:
    """An OSError, as creating ``path`` would raise it, if its directory cannot be written
    or its disk is full."""
    import os
    import shutil

    parent = path.parent
    if not parent.is_dir():
        raise OSError(errno.ENOTDIR, "Not a directory", str(path))
    if os.statvfs(parent).f_flag & os.ST_RDONLY:
        raise OSError(errno.EROFS, "Read-only file system", str(path))
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OSError(errno.EACCES, "Permission denied", str(path))
    if shutil.disk_usage(parent).free < MIN_FREE_BYTES:
        raise OSError(errno.ENOSPC, "No space left on device", str(path))


def _probe_server(url: str) -> None:
    """Connect once, as the storage will, and read the schema's version if Optuna's tables
    are there; write nothing, keep no connection."""
    engine = sqlalchemy.create_engine(
        url,
        poolclass=sqlalchemy.pool.NullPool,
        **{k: v for k, v in _engine_kwargs(url).items() if k == "connect_args"},
    )
    try:
        with engine.connect() as conn:
            conn.exec_driver_sql("SELECT 1")
            tables = sqlalchemy.inspect(conn).get_table_names()
        if "alembic_version" in tables and "version_info" in tables:
            storage = RDBStorage(
                url,
                engine_kwargs=_engine_kwargs(url),
                skip_table_creation=True,
                skip_compatibility_check=True,
            )
            try:
                _check_schema(storage)
            finally:
                storage.engine.dispose()
    finally:
        engine.dispose()


def _check_scheme(url: str) -> None:
    """A :class:`StorageURLError` for a URL SQLAlchemy cannot parse, a scheme it does not
    know (``sqllite:///``) or a driver that is not installed."""
    from sqlalchemy.engine import make_url
    from sqlalchemy.exc import ArgumentError, NoSuchModuleError

    try:
        parsed = make_url(url)
        dialect = parsed.get_dialect()
    except NoSuchModuleError:
        scheme = url.split("://", 1)[0]
        raise StorageURLError(
            f"unknown storage scheme {scheme + '://'!r} in {safe_url(url)!r}; supported: "
            f"{SUPPORTED}"
        ) from None
    except ArgumentError as exc:
        raise StorageURLError(f"storage {safe_url(url)!r} is not a valid URL ({exc})") from None
    except ValueError:  # the port: SQLAlchemy reads it with int()
        raise StorageURLError(
            f"storage {safe_url(url)!r}: the port must be a number 1 to 65535 "
            "(postgresql+psycopg2://USER@HOST:5432/DB)"
        ) from None
    if parsed.port is not None and not 1 <= parsed.port <= 65535:
        raise StorageURLError(
            f"storage {safe_url(url)!r}: the port must be 1 to 65535, got {parsed.port}"
        )
    try:
        dialect.import_dbapi()
    except ImportError as exc:
        raise StorageURLError(_missing_driver(parsed, exc.name or dialect.driver)) from None


# The drivers this tool is used with, per database, first the one its extras install;
# and how to install each (by the module SQLAlchemy imports).
_DRIVERS = {"postgresql": ("psycopg2", "psycopg"), "mysql": ("pymysql", "MySQLdb")}
_INSTALL = {
    "psycopg2": "pip install 'coarse2fine[postgres]'",
    "psycopg": "pip install 'psycopg[binary]'",
    "pymysql": "pip install pymysql",
    "MySQLdb": "pip install mysqlclient",
    "mysql": "pip install mysql-connector-python",
}


def _missing_driver(parsed: sqlalchemy.engine.URL, module: str) -> str:
    """The message for a URL whose driver is not installed: the URL to write instead when
    another driver of that database is installed, else what to install."""
    import importlib.util

    backend = parsed.get_backend_name()
    url = parsed.render_as_string(hide_password=True)
    implicit = "+" not in parsed.drivername
    said = (
        f"storage {url!r} names no driver, and SQLAlchemy {sqlalchemy.__version__} takes "
        f"{module!r} for it, which is not installed"
        if implicit
        else f"storage {url!r} needs the driver {module!r}, which is not installed"
    )
    drivers = _DRIVERS.get(backend, ())
    installed = [d for d in drivers if d != module and importlib.util.find_spec(d) is not None]
    if installed:
        return f"{said}; {installed[0]} is: start the URL with {backend}+{installed[0].lower()}://"
    if implicit and drivers:
        scheme = f"{backend}+{drivers[0].lower()}://"
        return f"{said}: {_INSTALL[drivers[0]]} and start the URL with {scheme}"
    return f"{said}: {_INSTALL.get(module, f'install the Python package {module!r}')}"


def _named(exc: BaseException, url: str) -> BaseException:
    """``exc`` as a :class:`StorageError` saying what to do, when it is a known failure of a
    storage; else ``exc`` itself."""
    if isinstance(exc, StorageError | StorageURLError | StorageUnavailable):
        return exc
    message = describe_failure(exc, url)
    return StorageError(message) if message else exc


def _where(url: str) -> str:
    """The storage as the user knows it: a file path, or a server and its database."""
    path = _file_of(url)
    if path is not None:
        return str(path)
    with contextlib.suppress(StorageURLError):
        address = proxy_address(url)
        if address is not None:
            return f"the storage proxy at {address[0]}:{address[1]}"
    try:
        from sqlalchemy.engine import make_url

        u = make_url(url)
        name = {"postgresql": "PostgreSQL", "mysql": "MySQL"}.get(u.get_backend_name(), "server")
        port = u.port or {"postgresql": 5432, "mysql": 3306}.get(u.get_backend_name())
        host = f"{u.host or 'localhost'}" + (f":{port}" if port else "")
        return f"{name} at {host}" + (f"/{u.database}" if u.database else "")
    except Exception:  # noqa: BLE001 - a URL SQLAlchemy cannot read: say it as it is
        return safe_url(url)


def _file_of(url: str) -> Path | None:
    """The file of a SQLite or journal storage, else None."""
    db = sqlite_path(url)
    if db is not None:
        return db
    if url.startswith("journal://") or "://" not in url:
        rest = url.removeprefix("journal://")
        return Path("/" + rest.lstrip("/")) if rest.startswith("/") else Path(rest)
    return None


def _read_only_place(path: Path) -> str | None:
    """Why ``path`` cannot be written, if it is read-only: its file system, or the file."""
    import os

    existing = path
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    try:
        if os.statvfs(existing).f_flag & os.ST_RDONLY:
            return "read-only file system"
    except OSError:
        return None
    if path.exists() and not os.access(path, os.W_OK):
        return "read-only file"
    if not os.access(path.parent if path.parent.exists() else existing, os.W_OK):
        return "read-only directory"
    return None


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    e: BaseException | None = exc
    while e is not None and all(e is not s for s in seen):
        seen.append(e)
        orig = getattr(e, "orig", None)  # SQLAlchemy's DBAPIError keeps the driver's error
        if isinstance(orig, BaseException) and all(orig is not s for s in seen):
            seen.append(orig)
        e = e.__cause__ or e.__context__
    return seen


def _from_storage(exc: BaseException) -> bool:
    """An error raised by a database, its driver, the file system, or Optuna's schema check."""
    module = type(exc).__module__.split(".")[0]
    return (
        isinstance(exc, OSError | sqlite3.Error)
        or module in ("sqlalchemy", "psycopg2", "psycopg", "pymysql", "MySQLdb", "grpc")
        or isinstance(exc, optuna.exceptions.StorageInternalError)
        or (isinstance(exc, RuntimeError) and "compatible with the table schema" in str(exc))
    )


def describe_failure(exc: BaseException, url: str) -> str | None:
    """One line for a known failure of the storage at ``url``: what happened and what to
    do. None when ``exc`` is not one (a bug, a bad argument): let it be raised as it is.

    Known: a server that does not answer or refuses the login; a file or directory that
    cannot be created or written, read-only, not a database, corrupt; a full disk; a
    schema made by another Optuna version; a storage proxy that does not answer, and the
    failures of the database behind it, which it passes on.
    """
    where = _where(url)
    check_url_text = "check the host and port in the storage URL"
    check_login = "check user, password and database"
    with contextlib.suppress(StorageURLError):
        address = proxy_address(url)
        if address is not None:
            codes_ = {_rpc_code(e) for e in _chain(exc)} - {None}
            if codes_ & {"UNAVAILABLE", "DEADLINE_EXCEEDED"}:
                return (
                    f"{where} does not answer ({_one_line(exc)}): start it (c2f proxy --storage "
                    f"DATABASE_URL --host HOST --port {address[1]}), or {check_url_text}"
                )
            if not codes_:
                return None
            # The database's own error, passed on by the proxy: said of that database.
            where = f"the database behind {where}"
            check_url_text = check_login = "check the database and the --storage of c2f proxy"
    if url.startswith("journal://") or "://" not in url:
        # A journal file is JSON lines: a line that is not (another program's file, a
        # binary one) stops Optuna's reading of it.
        broken = [e for e in _chain(exc) if isinstance(e, json.JSONDecodeError | UnicodeError)]
        if broken:
            return (
                f"{where} is not a journal file Optuna can read ({_one_line(broken[0])}): "
                "give --storage another file, or move this one away to start afresh"
            )
    # Only the errors of a database, its driver or the file system say what the storage
    # did: a KeyError("Record does not exist.") is Optuna's answer about a study.
    chain = [e for e in _chain(exc) if _from_storage(e)]
    if not chain:
        return None
    texts = " | ".join(str(e).lower() for e in chain)
    codes = {getattr(e, "errno", None) for e in chain if isinstance(e, OSError)}
    first = _one_line(chain[-1])
    again = "then run the same command again (finished trials are kept)"
    if errno.ENOSPC in codes or "disk is full" in texts or "no space left" in texts:
        return f"the disk holding {where} is full ({first}): free some space, {again}"
    path = _file_of(url)
    read_only = _read_only_place(path) if path is not None else None
    if (
        errno.EROFS in codes
        or "readonly database" in texts
        or "read-only file system" in texts
        or (read_only and ("unable to open database file" in texts or codes))
    ):
        why = read_only or first
        beside = " (SQLite writes -wal and -shm files beside it)" if sqlite_path(url) else ""
        return (
            f"{where} cannot be written ({why}): make the file and its directory "
            f"writable{beside}, or give --storage another file; {again}"
        )
    if codes & {errno.EACCES, errno.EPERM}:
        return f"cannot write {where}: permission denied ({first}); fix its permissions, {again}"
    if "disk i/o error" in texts:
        return (
            f"{where}: the disk failed a read or write ({first}): check the disk and its free "
            f"space, {again}"
        )
    if "file is not a database" in texts:
        return (
            f"{where} is not an SQLite database (or not one this SQLite can read): give "
            "--storage another file, or move this one away to start afresh"
        )
    if "malformed" in texts or "database corrupt" in texts:
        return (
            f"{where} is corrupt ({first}): restore a backup, or recover what is left with "
            f"`sqlite3 {where} .recover`; or move it away to start afresh"
        )
    if "unable to open database file" in texts or codes & {
        errno.ENOENT,
        errno.ENOTDIR,
        errno.EISDIR,
        errno.EEXIST,
        errno.ENAMETOOLONG,
    }:
        return (
            f"cannot create or open {where} ({first}): its directory must exist (or be "
            "creatable) and be writable, and the path must name a file"
        )
    if "no longer compatible with the table schema" in texts:
        fix = (
            f"back it up, then run `optuna storage upgrade --storage {safe_url(url)}`"
            if "storage upgrade" in texts
            else "install the newer Optuna that made it (pip install -U optuna)"
        )
        return (
            f"{where} holds tables made by another version of Optuna than this one "
            f"({optuna.__version__}): {fix}"
        )
    if any(w in texts for w in _TOO_MANY_WORDS):
        return f"{where} refused a connection, too many are open ({first}): {TOO_MANY_FIX}"
    if any(w in texts for w in ("password authentication failed", "does not exist", "role ")):
        if not url.startswith(("sqlite", "journal")) and "://" in url:
            return f"{where} refused the login ({first}): {check_login}"
    if is_transient(exc) and not url.startswith(("sqlite", "journal")) and "://" in url:
        return f"{where} does not answer ({first}): start the server, or {check_url_text}"
    if "could not translate host name" in texts or "name or service not known" in texts:
        return f"{where}: unknown host ({first}); check the host in the storage URL"
    return None


TOO_MANY_FIX = (
    "run fewer workers (--workers, here and on other machines), raise "
    "the server's max_connections (or the role's CONNECTION LIMIT), or put a connection "
    "proxy in front of the server: c2f proxy --storage URL, and --storage grpc://HOST:PORT "
    "for the workers and commands"
)


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


def with_retries(fn: Callable[[], T], *, tries: int = MAX_RETRIES) -> T:
    """Call ``fn``, retrying a locked or briefly unreachable database a few times.

    For the commands' one-off calls; a worker's calls go through
    :class:`ResilientStorage`, which retries for longer. A server at its connection
    limit is tried for longer (about 12 s), at jittered intervals: workers that start
    together free and take their slots at different moments.
    """
    attempt = 0
    while True:
        try:
            return fn()
        except Exception as exc:  # noqa: BLE001 - narrowed by is_transient
            too_many = too_many_connections(exc)
            if not is_transient(exc) or attempt >= (TOO_MANY_TRIES if too_many else tries) - 1:
                raise
            delay = min(0.5 * 2**attempt, 4.0)
            time.sleep(delay * random.uniform(0.5, 1.5) if too_many else delay)
            attempt += 1


TOO_MANY_TRIES = 6


def too_many_connections(exc: BaseException) -> bool:
    """Whether ``exc`` (or a cause of it) is a server's refusal at its connection limit."""
    return any(w in str(e).lower() for e in _chain(exc) for w in _TOO_MANY_WORDS)


# Words of the errors a database gives while it restarts or the network is cut.
_TRANSIENT_WORDS = (
    "database is locked",
    "database is busy",
    "could not connect",
    "connection refused",
    "connection reset",
    "connection timed out",
    "server closed the connection",
    "terminating connection",
    "no connection to the server",
    "connection already closed",
    "the database system is",  # starting up, shutting down, in recovery mode
    "is not currently accepting connections",  # ALTER DATABASE ... ALLOW_CONNECTIONS false
    "ssl syscall error",
    "eof detected",
    "broken pipe",
    "timeout expired",
    "could not receive data",
    "could not send data",
    # A server at its connection limit: a slot frees when another process ends. Named
    # (with the fixes) by describe_failure when the retries run out.
    *_TOO_MANY_WORDS,
    # (Two processes creating the tables of a new database at once: _made_by_another.)
)


def is_transient(exc: BaseException) -> bool:
    """True for errors of a database that is briefly unreachable, locked or restarting.

    Looks through the chain of causes: Optuna wraps SQLAlchemy's errors in its
    ``StorageInternalError``. A full disk, a read-only file or a bad URL is not
    transient: retrying cannot help.
    """
    seen: set[int] = set()
    e: BaseException | None = exc
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, ConnectionError | TimeoutError):
            return True
        if getattr(e, "connection_invalidated", False):
            return True
        if _rpc_code(e) in _TRANSIENT_RPC:
            return True
        text = str(e).lower()
        if any(word in text for word in _TRANSIENT_WORDS):
            return True
        e = e.__cause__ or e.__context__
    return False


class StorageUnavailable(RuntimeError):
    """The database stayed unreachable for longer than the worker's patience."""


class ResilientStorage(BaseStorage):
    """An Optuna storage whose every call is retried while the database is unreachable.

    Retries back off from 0.25 s to 5 s, for up to ``patience`` seconds, then
    raise :class:`StorageUnavailable`. ``log`` gets one line when an outage begins
    and one when it ends. ``should_stop`` (set by a worker) ends the retries
    early when the worker is asked to stop. Everything that is not a storage
    method (``engine``, ...) is the wrapped storage's.
    """

    def __init__(
        self,
        backend: BaseStorage,
        *,
        patience: float = PATIENCE_S,
        log: Callable[[str], None] | None = None,
        url: str = "",
    ) -> None:
        self.backend = backend  # the storage itself (RDBStorage, JournalStorage)
        self.inner = _cached(backend)  # what the calls go to
        self.patience = patience
        self.log = log
        self.url = url  # for the message of a failure (StorageError)
        self.should_stop: Callable[[], bool] = lambda: False

    def __getattr__(self, name: str):  # noqa: ANN204 - the wrapped storage's attributes
        if name in ("inner", "backend", "url"):  # not set yet (unpickling)
            raise AttributeError(name)
        return getattr(self.backend, name)

    def __getstate__(self) -> dict:
        # A worker's stop flag and log stay in its process; the cache is rebuilt.
        return {"backend": self.backend, "patience": self.patience, "url": self.url}

    def __setstate__(self, state: dict) -> None:
        self.__init__(  # type: ignore[misc]
            state["backend"], patience=state["patience"], url=state.get("url", "")
        )

    def call(self, name: str, *args, **kwargs):  # noqa: ANN002, ANN003, ANN201
        """The wrapped storage's method ``name``, retried while the database is away."""
        return self.retrying(getattr(self.inner, name), *args, **kwargs)

    def retrying(self, method: Callable[..., T], *args, **kwargs) -> T:  # noqa: ANN002, ANN003
        """``method(*args, **kwargs)``, retried while the database is unreachable.

        A known failure that retrying cannot mend (a full disk, a read-only file, ...) is
        raised as a :class:`StorageError` saying what to do."""
        try:
            return method(*args, **kwargs)
        except Exception as exc:  # noqa: BLE001 - narrowed by is_transient
            if not is_transient(exc):
                self._raise_named(exc)
                raise
            first = exc
        t0 = time.monotonic()
        delay = 0.25
        if self.log is not None:
            self.log(
                f"storage unreachable ({_one_line(first)}); retrying for up to {self.patience:g} s"
            )
        while True:
            if self.should_stop() or time.monotonic() - t0 > self.patience:
                raise StorageUnavailable(
                    f"storage unreachable for {time.monotonic() - t0:.0f} s: {_one_line(first)}"
                ) from first
            time.sleep(delay)
            delay = min(2 * delay, 5.0)
            try:
                result = method(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - narrowed by is_transient
                if not is_transient(exc):
                    self._raise_named(exc)
                    raise
                continue
            if self.log is not None:
                self.log(f"storage reachable again after {time.monotonic() - t0:.1f} s")
            return result

    def _raise_named(self, exc: BaseException) -> None:
        """Raise ``exc`` as a :class:`StorageError` if it is a known failure; else return."""
        named = _named(exc, self.url) if self.url else exc
        if named is not exc:
            raise named from exc

    def set_trial_param(
        self,
        trial_id: int,
        param_name: str,
        param_value_internal: float,
        distribution: optuna.distributions.BaseDistribution,
    ) -> None:
        """The storage's ``set_trial_param``; a trial its cache does not know is learnt first.

        Optuna's cache raises ``KeyError`` for a trial it has not read or made itself:
        one taken by its id in a process whose cache predates it (:func:`learn_trial` at
        the take), and, in a proxy, any trial a worker took through another proxy or the
        database itself, or before this proxy restarted. The proxy's storage is this one.
        """
        args = (trial_id, param_name, param_value_internal, distribution)
        try:
            return self.call("set_trial_param", *args)
        except KeyError:
            study_id = _study_of_trial(self, trial_id)
            if study_id is None:
                raise  # no such trial, or a storage without Optuna's cache
            learn_trial(self, study_id, trial_id)
            return self.call("set_trial_param", *args)


def _one_line(exc: BaseException) -> str:
    cause = exc
    while cause.__cause__ is not None:
        cause = cause.__cause__
    rpc = next((e for e in _chain(exc) if _rpc_code(e) is not None), None)
    if rpc is not None and not isinstance(cause, sqlite3.Error | OSError):
        details = (rpc.details() or "").strip().splitlines()  # type: ignore[attr-defined]
        text = details[0].removeprefix("Exception calling application: ") if details else ""
        return f"{_rpc_code(rpc)}: {text}"
    text = str(cause).strip().splitlines()
    return f"{type(cause).__name__}: {text[0] if text else ''}"


def _rpc_code(exc: BaseException | None) -> str | None:
    """The status of a failed gRPC call (a call to a storage proxy) by name, else None."""
    code = getattr(exc, "code", None)
    if exc is None or type(exc).__module__.split(".")[0] != "grpc" or not callable(code):
        return None
    try:
        return code().name
    except Exception:  # noqa: BLE001 - an RpcError that is not a finished call
        return None


# A proxy that is restarting or unreachable, or too busy to take the call now; CANCELLED:
# a proxy that stopped before it answered (the call is tried again on the next one).
_TRANSIENT_RPC = {"UNAVAILABLE", "DEADLINE_EXCEEDED", "RESOURCE_EXHAUSTED", "ABORTED", "CANCELLED"}


def _delegate(name: str) -> Callable[..., object]:
    def method(self: ResilientStorage, *args, **kwargs):  # noqa: ANN002, ANN003, ANN202
        return self.call(name, *args, **kwargs)

    method.__name__ = name
    return method


# Every other method of Optuna's storage interface goes through ResilientStorage.call.
for _name in sorted(BaseStorage.__abstractmethods__) + [
    n for n in vars(BaseStorage) if not n.startswith("_") and callable(getattr(BaseStorage, n))
]:
    if _name not in vars(ResilientStorage):
        setattr(ResilientStorage, _name, _delegate(_name))
ResilientStorage.__abstractmethods__ = frozenset()


def waiting_trial_ids(storage: BaseStorage, study_id: int, *, limit: int = 8) -> list[int]:
    """The ids of the study's first ``limit`` WAITING trials, oldest first.

    On an RDB storage, one indexed query on the ``trials`` table (private schema):
    Optuna's public way, ``get_all_trials(states=(WAITING,))``, builds every waiting
    trial with its attrs, about 0.5 ms each, on every look at the queue, and a
    queue of 1,000 trials made each look cost longer than a quick-start trial.
    Through a ``c2f proxy``, the same query, run by the proxy.
    """
    proxy = _proxy_of(storage)
    if proxy is not None:
        answer = _retrying(storage)(proxy.ask, "Waiting", study_id=study_id, limit=limit)
        if answer is not None:
            return [int(i) for i in answer["ids"]]
    inner = getattr(storage, "backend", storage)
    if isinstance(inner, RDBStorage) and _FAST_WAITING:

        def query() -> list[int]:
            with inner.engine.connect() as conn:
                rows = conn.execute(
                    sqlalchemy.text(
                        "SELECT trial_id FROM trials WHERE study_id = :s AND state = 'WAITING' "
                        "ORDER BY trial_id LIMIT :n"
                    ),
                    {"s": study_id, "n": limit},
                )
                return [int(r[0]) for r in rows]

        if isinstance(storage, ResilientStorage):
            with read_only():
                return storage.retrying(query)
        with read_only():
            return query()
    trials = storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.WAITING,))
    return [trial_id(t) for t in trials[:limit]]


# The query above names these columns and stores the state by name, as SQLAlchemy does.
_FAST_WAITING = {"trial_id", "study_id", "state"} <= set(
    rdb_models.TrialModel.__table__.columns.keys()
)


def _retrying(storage: BaseStorage) -> Callable[..., Any]:
    return storage.retrying if isinstance(storage, ResilientStorage) else _call


@dataclass(frozen=True)
class Running:
    """A RUNNING trial as the reaper sees it: its ids, when it started (seconds since the
    epoch) and its owner record (system attr ``attr`` of :func:`running_trials`)."""

    trial_id: int
    number: int
    started: float | None
    owner: dict[str, Any] | None


def running_trials(storage: BaseStorage, study_id: int, *, attr: str) -> list[Running]:
    """The study's RUNNING trials, each with its system attr ``attr`` (the owner record).

    On an RDB storage, one indexed query on the private schema (the trials and that one
    attribute): Optuna's public way, ``get_all_trials(states=(RUNNING,))``, reads every
    unfinished trial in full, the waiting ones too, and the reaper looks before every
    take. Through a ``c2f proxy``, the same query, run by the proxy.
    """
    proxy = _proxy_of(storage)
    if proxy is not None:
        answer = _retrying(storage)(proxy.ask, "Running", study_id=study_id, attr=attr)
        if answer is not None:
            return [Running(int(t), int(n), s, o) for t, n, s, o in answer["trials"]]
    inner = getattr(storage, "backend", storage)
    if isinstance(inner, RDBStorage) and _FAST_RUNNING:

        def query() -> list[Running]:
            statement = sqlalchemy.text(
                "SELECT t.trial_id, t.number, t.datetime_start, a.value_json FROM trials t "
                "LEFT JOIN trial_system_attributes a ON a.trial_id = t.trial_id AND a.key = :k "
                "WHERE t.study_id = :s AND t.state = 'RUNNING' ORDER BY t.trial_id"
            ).columns(
                sqlalchemy.column("trial_id", sqlalchemy.Integer),
                sqlalchemy.column("number", sqlalchemy.Integer),
                sqlalchemy.column("datetime_start", sqlalchemy.DateTime),
                sqlalchemy.column("value_json", sqlalchemy.Text),
            )
            with inner.engine.connect() as conn:
                rows = conn.execute(statement, {"s": study_id, "k": attr}).all()
            return [
                Running(
                    int(tid),
                    int(number),
                    start.timestamp() if start is not None else None,
                    json.loads(value) if value is not None else None,
                )
                for tid, number, start, value in rows
            ]

        with read_only():
            return _retrying(storage)(query)
    trials = storage.get_all_trials(study_id, deepcopy=False, states=(TrialState.RUNNING,))
    return [
        Running(
            trial_id(t),
            t.number,
            t.datetime_start.timestamp() if t.datetime_start else None,
            t.system_attrs.get(attr),
        )
        for t in trials
    ]


# The query above names these columns, as Optuna's models define them; Optuna stores a
# system attr as JSON text and a start time as a naive local datetime.
_FAST_RUNNING = {"trial_id", "number", "study_id", "state", "datetime_start"} <= set(
    rdb_models.TrialModel.__table__.columns.keys()
) and {"trial_id", "key", "value_json"} <= set(
    rdb_models.TrialSystemAttributeModel.__table__.columns.keys()
)


def finished_trial_ids(storage: BaseStorage, study_id: int) -> list[int] | None:
    """The ids of the study's finished trials (COMPLETE, PRUNED, FAIL) on an RDB storage, in
    one query on the ``trials`` table (private schema, the columns :func:`waiting_trial_ids`
    names); None on any other storage.

    What the trial history of :mod:`search.sweep.workers.history` asks before it reads the
    few trials it does not hold yet: Optuna's own trial cache reads every unfinished trial
    on every look instead, and a queue of 10,000 WAITING trials made each look cost seconds.
    """
    inner = getattr(storage, "backend", storage)
    if not (isinstance(inner, RDBStorage) and _FAST_WAITING):
        return None

    def query() -> list[int]:
        with inner.engine.connect() as conn:
            rows = conn.execute(
                sqlalchemy.text(
                    "SELECT trial_id FROM trials WHERE study_id = :s "
                    "AND state IN ('COMPLETE', 'PRUNED', 'FAIL')"
                ),
                {"s": study_id},
            )
            return [int(r[0]) for r in rows]

    with read_only():
        if isinstance(storage, ResilientStorage):
            return storage.retrying(query)
        return query()


def set_trial_attrs(
    storage: BaseStorage,
    tid: int,
    *,
    user: Mapping[str, Any] | None = None,
    system: Mapping[str, Any] | None = None,
) -> None:
    """Set several user and system attrs of an unfinished trial: on SQLite and PostgreSQL
    in one transaction, one upsert per table (private schema, the columns and the unique
    key that Optuna's own upsert of one attr uses); elsewhere one call each.

    A trial's record (seed, wall time, epochs, curves, ...) was six transactions, each
    reading the trial again: a fifth of a quick trial's time.
    """
    user, system = dict(user or {}), dict(system or {})
    inner = getattr(storage, "backend", storage)
    if not (isinstance(inner, RDBStorage) and _FAST_ATTRS and _upserts(inner)):
        for key, value in user.items():
            storage.set_trial_user_attr(tid, key, value)
        for key, value in system.items():
            storage.set_trial_system_attr(tid, key, value)
        return
    lock = " FOR UPDATE" if inner.engine.dialect.name == "postgresql" else ""

    def write() -> None:
        with inner.engine.begin() as conn:  # BEGIN IMMEDIATE on SQLite: the write lock
            state = conn.execute(
                sqlalchemy.text(f"SELECT state FROM trials WHERE trial_id = :t{lock}"),
                {"t": tid},
            ).scalar()
            if state is None:
                raise KeyError(f"No trial with trial_id {tid} exists.")
            if TrialState[str(state)].is_finished():  # Optuna's check would read it again
                raise optuna.exceptions.UpdateFinishedTrialError(
                    f"Trial {tid} has already finished and can not be updated."
                )
            _upsert_attrs(conn, "trial_user_attributes", tid, user)
            _upsert_attrs(conn, "trial_system_attributes", tid, system)

    _retried(storage, write)


def claim(storage: BaseStorage, tid: int, system: Mapping[str, Any]) -> bool:
    """Move a WAITING trial to RUNNING and set system attrs on it (its owner record); False
    if it is not WAITING (another process took it, or it is finished).

    On SQLite and PostgreSQL one transaction (private schema: the state change Optuna's
    ``set_trial_state_values`` makes, its start time included, and :func:`set_trial_attrs`'s
    upsert): taking a trial was two, each reading the trial, and a process killed
    between them left a RUNNING trial that no one claimed. Elsewhere Optuna's two calls.
    """
    inner = getattr(storage, "backend", storage)
    if not (isinstance(inner, RDBStorage) and _FAST_CLAIM and _upserts(inner)):
        try:
            if not storage.set_trial_state_values(tid, state=TrialState.RUNNING):
                return False
        except optuna.exceptions.UpdateFinishedTrialError:
            return False
        for key, value in system.items():
            storage.set_trial_system_attr(tid, key, value)
        return True
    update = sqlalchemy.text(
        "UPDATE trials SET state = 'RUNNING', datetime_start = :now "
        "WHERE trial_id = :t AND state = 'WAITING'"
    ).bindparams(sqlalchemy.bindparam("now", type_=sqlalchemy.DateTime()))

    def write() -> bool:
        with inner.engine.begin() as conn:  # BEGIN IMMEDIATE on SQLite: the write lock
            if conn.execute(update, {"t": tid, "now": datetime.datetime.now()}).rowcount != 1:
                return False
            _upsert_attrs(conn, "trial_system_attributes", tid, dict(system))
        return True

    return _retried(storage, write)


def _upsert_attrs(
    conn: sqlalchemy.engine.Connection, table: str, tid: int, attrs: Mapping[str, Any]
) -> None:
    if attrs:
        conn.execute(
            sqlalchemy.text(
                f"INSERT INTO {table} (trial_id, key, value_json) VALUES (:t, :k, :v) "
                "ON CONFLICT (trial_id, key) DO UPDATE SET value_json = excluded.value_json"
            ),
            [{"t": tid, "k": k, "v": json.dumps(v)} for k, v in attrs.items()],
        )


def _retried(storage: BaseStorage, write: Callable[[], T]) -> T:
    """``write()``, with ``storage``'s retries if it has them."""
    retrying = getattr(storage, "retrying", None)
    return retrying(write) if retrying is not None else write()


def _upserts(storage: RDBStorage) -> bool:
    """Whether the database takes ``INSERT ... ON CONFLICT DO UPDATE`` (SQLite 3.24 on)."""
    name = storage.engine.dialect.name
    return name == "postgresql" or (name == "sqlite" and sqlite3.sqlite_version_info >= (3, 24))


# The statements above name these columns, and the unique key (trial_id, key) Optuna's own
# upsert of one attr relies on.
_FAST_ATTRS = all(
    {"trial_id", "key", "value_json"} <= set(model.__table__.columns.keys())
    and any(
        isinstance(c, sqlalchemy.UniqueConstraint)
        and {col.name for col in c.columns} == {"trial_id", "key"}
        for c in model.__table__.constraints
    )
    for model in (rdb_models.TrialUserAttributeModel, rdb_models.TrialSystemAttributeModel)
)
# claim's state change names these columns, and stores the state by name.
_FAST_CLAIM = _FAST_ATTRS and {"trial_id", "state", "datetime_start"} <= set(
    rdb_models.TrialModel.__table__.columns.keys()
)


def state_counts(storage: BaseStorage, study_id: int) -> dict[TrialState, int] | None:
    """How many of the study's trials are in each state, on an RDB storage, in one query
    (private schema, as :func:`finished_trial_ids`); None on any other storage.

    Optuna counts trials by building every one of them (``get_n_trials``): a progress line
    counting a queue of 10,000 WAITING trials cost seconds a draw.
    """
    inner = getattr(storage, "backend", storage)
    if not (isinstance(inner, RDBStorage) and _FAST_WAITING):
        return None

    def query() -> dict[TrialState, int]:
        with inner.engine.connect() as conn:
            rows = conn.execute(
                sqlalchemy.text(
                    "SELECT state, count(*) FROM trials WHERE study_id = :s GROUP BY state"
                ),
                {"s": study_id},
            )
            return {TrialState[str(state)]: int(n) for state, n in rows}

    with read_only():
        if isinstance(storage, ResilientStorage):
            return storage.retrying(query)
        return query()


def enqueue_blank(
    storage: BaseStorage,
    study_id: int,
    n: int,
    *,
    chunk: int = 500,
    between: Callable[[], None] = lambda: None,
) -> None:
    """Queue ``n`` WAITING trials without parameters, as ``study.enqueue_trial({})`` does.

    On an RDB storage, two statements per ``chunk`` trials on the private schema, in one
    transaction that holds the study's row (as Optuna's own trial creation does, so
    numbers stay dense and unique): ``enqueue_trial`` costs 4-6 ms a trial, and a
    10,000-trial target took most of a minute before the first trial trained.
    ``between`` is called before each chunk (a stop signal lands there). Through a
    ``c2f proxy``, the same statements, run by the proxy a chunk a call. Elsewhere (a
    journal file, a plain Optuna proxy), Optuna's way, one trial at a time.
    """
    from optuna.trial import create_trial

    proxy = _proxy_of(storage)
    sent = 0
    while proxy is not None and sent < n:
        between()
        k = min(chunk, n - sent)
        if _retrying(storage)(proxy.ask, "Enqueue", study_id=study_id, n=k) is None:
            break  # a plain Optuna proxy: one trial at a time, below
        sent += k
    n -= sent
    inner = getattr(storage, "backend", storage)
    if not (isinstance(inner, RDBStorage) and _FAST_ENQUEUE):
        template = create_trial(state=TrialState.WAITING, system_attrs={"fixed_params": {}})
        for _ in range(n):
            between()
            storage.create_new_trial(study_id, template_trial=template)
        return

    def insert(k: int) -> None:
        with inner.engine.begin() as conn:  # BEGIN IMMEDIATE on SQLite: the write lock
            if conn.dialect.name != "sqlite":
                conn.execute(
                    sqlalchemy.text("SELECT study_id FROM studies WHERE study_id = :s FOR UPDATE"),
                    {"s": study_id},
                )
            first = conn.execute(
                sqlalchemy.text("SELECT count(*) FROM trials WHERE study_id = :s"), {"s": study_id}
            ).scalar_one()
            conn.execute(
                sqlalchemy.text(
                    "INSERT INTO trials (number, study_id, state, datetime_start, "
                    "datetime_complete) VALUES (:number, :s, 'WAITING', NULL, NULL)"
                ),
                [{"number": first + i, "s": study_id} for i in range(k)],
            )
            conn.execute(
                sqlalchemy.text(
                    "INSERT INTO trial_system_attributes (trial_id, key, value_json) "
                    "SELECT trial_id, 'fixed_params', '{}' FROM trials "
                    "WHERE study_id = :s AND number >= :first"
                ),
                {"s": study_id, "first": first},
            )

    done = 0
    while done < n:
        between()
        k = min(chunk, n - done)
        if isinstance(storage, ResilientStorage):
            storage.retrying(insert, k)
        else:
            insert(k)
        done += k


# The statements above name these columns, as Optuna's models define them.
_FAST_ENQUEUE = {"trial_id", "number", "study_id", "state", "datetime_start"} <= set(
    rdb_models.TrialModel.__table__.columns.keys()
) and {"trial_id", "key", "value_json"} <= set(
    rdb_models.TrialSystemAttributeModel.__table__.columns.keys()
)


def release(storage: object) -> None:
    """Close a storage's pooled connections (before forking: a child must not share them);
    a proxy client's channel is closed too, and opened again at its next call."""
    inner = getattr(storage, "backend", storage)
    if isinstance(inner, RDBStorage):
        inner.engine.dispose()
    proxy = _proxy_of(storage)
    if proxy is not None:
        proxy.reconnect()
