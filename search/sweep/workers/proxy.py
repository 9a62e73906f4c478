"""The storage proxy: Optuna's gRPC storage proxy in front of a database, and its client.

Every worker process that talks to a database holds a connection of its own, and a
server's ``max_connections`` (100 by default on PostgreSQL) then caps the workers of
a whole cluster. ``c2f proxy`` (:func:`serve`) runs Optuna's gRPC storage proxy in
front of the database with a few connections of its own; workers and commands reach
it as ``grpc://HOST:PORT`` through :class:`ProxyStorage` (Optuna's ``GrpcStorageProxy``),
and hold no database connection at all.

Optuna's protocol reads a study's trials only all at once: every unfinished trial,
each time. A worker looking for a queued trial, and the reaper looking for the
trials of dead workers, would read the whole queue on every look (1 ms a trial on
the proxy here: two seconds a look with 2,000 trials queued). So the proxy serves a
second, small service beside Optuna's, ``c2f.Queue``, that answers the queue's three
questions with one SQL statement each, as a worker on the database asks them
(:mod:`search.sweep.workers.storage`): the first WAITING trials, the RUNNING trials
with their owner records, and queueing blank trials in bulk. Taking a trial is still
Optuna's atomic ``set_trial_state_values(RUNNING)`` through Optuna's service. A
client of a plain Optuna proxy (no ``c2f.Queue``) falls back on Optuna's own calls.

Private Optuna use, each with a test (``tests/search/sweep/workers/test_proxy.py``)
that fails if Optuna changes it: ``OptunaStorageProxyService`` and
``add_StorageServiceServicer_to_server`` (the server that
:func:`optuna.storages.run_grpc_proxy_server` runs, built here: Optuna keeps it to itself,
and a stop signal must stop it gracefully and the queue service must join it), and
``GrpcStorageProxy._setup`` / ``_channel`` / ``_cache`` (the channel the queue
service shares, and reconnecting without dropping the trial cache).
"""

from __future__ import annotations

import contextlib
import json
import warnings
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import grpc
import optuna
from optuna.storages import BaseStorage, GrpcStorageProxy

from search.sweep.workers.storage import (
    enqueue_blank,
    running_trials,
    waiting_trial_ids,
)

QUEUE_SERVICE = "c2f.Queue"
DEFAULT_PORT = 13000  # Optuna's
# How long a stopping proxy lets the calls under way finish: a worker's call is then
# answered, or refused before it began (and retried by the worker), never cut halfway.
STOP_GRACE_S = 10.0


def _dumps(value: Any) -> bytes:
    return json.dumps(value).encode()


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Without Optuna's ExperimentalWarning for its gRPC classes: said once, in the README."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        yield


class ProxyStorage(GrpcStorageProxy):
    """Optuna's client of a gRPC storage proxy, with the proxy's queue service beside it.

    :meth:`ask` calls ``c2f.Queue``; it answers None when the proxy is a plain Optuna
    one (the callers then use Optuna's own calls). :meth:`reconnect` opens a new channel
    and keeps the trial cache (before a fork: a child must not share a channel).
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


def _queue_handler(storage: BaseStorage) -> grpc.GenericRpcHandler:
    """``c2f.Queue`` on ``storage`` (the proxy's database): each answer one SQL statement."""

    def waiting(request: dict, _context: grpc.ServicerContext) -> dict:
        ids = waiting_trial_ids(storage, int(request["study_id"]), limit=int(request["limit"]))
        return {"ids": ids}

    def running(request: dict, _context: grpc.ServicerContext) -> dict:
        trials = running_trials(storage, int(request["study_id"]), attr=str(request["attr"]))
        return {"trials": [[r.trial_id, r.number, r.started, r.owner] for r in trials]}

    def enqueue(request: dict, _context: grpc.ServicerContext) -> dict:
        enqueue_blank(storage, int(request["study_id"]), int(request["n"]))
        return {}

    methods: dict[str, Callable[[dict, grpc.ServicerContext], dict]] = {
        "Waiting": waiting,
        "Running": running,
        "Enqueue": enqueue,
    }
    return grpc.method_handlers_generic_handler(
        QUEUE_SERVICE,
        {
            name: grpc.unary_unary_rpc_method_handler(
                fn, request_deserializer=json.loads, response_serializer=_dumps
            )
            for name, fn in methods.items()
        },
    )


class ProxyBindError(ValueError):
    """The proxy cannot listen where it was asked to (a setting to fix: exit 2)."""


def serve(storage: BaseStorage, *, host: str, port: int, threads: int) -> tuple[grpc.Server, int]:
    """Start Optuna's gRPC storage proxy on ``storage`` at ``host:port``, with the queue
    service beside it; the server (running) and the port it listens on (``port`` 0: a
    free one). ``threads`` calls are served at once (one database connection each).

    The server :func:`optuna.storages.run_grpc_proxy_server` builds (its ``make_server``),
    built here: Optuna's does not say which port it bound, and keeps the server to itself.
    """
    from optuna.storages._grpc.auto_generated import api_pb2_grpc
    from optuna.storages._grpc.servicer import OptunaStorageProxyService

    # Not SO_REUSEPORT (gRPC's default): a second proxy on a taken port would share it
    # silently, and the workers' calls would go to either one, maybe another database.
    server = grpc.server(
        ThreadPoolExecutor(max_workers=threads), options=[("grpc.so_reuseport", 0)]
    )
    api_pb2_grpc.add_StorageServiceServicer_to_server(OptunaStorageProxyService(storage), server)
    server.add_generic_rpc_handlers((_queue_handler(storage),))
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as exc:  # grpc: "Failed to bind to address ..."
        raise ProxyBindError(_bind_message(host, port)) from exc
    if not bound:
        raise ProxyBindError(_bind_message(host, port))
    server.start()
    return server, bound


def _bind_message(host: str, port: int) -> str:
    return (
        f"cannot listen on {host}:{port}: the port is taken (another c2f proxy?) or {host!r} "
        "is not an address of this machine; give another --port or --host"
    )
