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
The client and the server's Optuna part (private API) are in ``storage``.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import grpc
from optuna.storages import BaseStorage

from model.errors import UsageError
from search.sweep.workers.storage import (
    QUEUE_SERVICE,
    enqueue_blank,
    proxy_server,
    running_trials,
    waiting_trial_ids,
)

DEFAULT_PORT = 13000  # Optuna's
# How long a stopping proxy lets the calls under way, and those it has taken in and not
# begun, finish: a worker's call is answered, or refused before it began and retried.
STOP_GRACE_S = 30.0


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
                fn,
                request_deserializer=json.loads,
                response_serializer=lambda value: json.dumps(value).encode(),
            )
            for name, fn in methods.items()
        },
    )


class ProxyBindError(UsageError):
    """The proxy cannot listen where it was asked to (a setting to fix: exit 2)."""


@dataclass
class Serving:
    """A proxy that serves: its gRPC server, its port, and the threads of its calls."""

    server: grpc.Server
    port: int
    calls: ThreadPoolExecutor

    def stop(self, grace: float = STOP_GRACE_S) -> None:
        """Take no new call; answer those under way and those waiting for a thread (for up
        to ``grace`` seconds), and let every call that began end before returning: the
        storage may be closed then."""
        self.server.stop(grace).wait()
        # Past the grace, the calls still waiting for a thread are dropped, not run: their
        # workers, told CANCELLED, try them again on the next proxy, once.
        self.calls.shutdown(wait=True, cancel_futures=True)


def serve(storage: BaseStorage, *, host: str, port: int, threads: int) -> Serving:
    """Start Optuna's gRPC storage proxy on ``storage`` at ``host:port``, with the queue
    service beside it, listening on ``port`` (0: a free one, the one in the answer).
    ``threads`` calls are served at once (one database connection each)."""
    calls = ThreadPoolExecutor(max_workers=threads)
    server = proxy_server(storage, calls=calls)
    server.add_generic_rpc_handlers((_queue_handler(storage),))
    try:
        bound = server.add_insecure_port(f"{host}:{port}")
    except RuntimeError as exc:  # grpc: "Failed to bind to address ..."
        raise ProxyBindError(_bind_message(host, port)) from exc
    if not bound:
        raise ProxyBindError(_bind_message(host, port))
    server.start()
    return Serving(server, bound, calls)


def _bind_message(host: str, port: int) -> str:
    return (
        f"cannot listen on {host}:{port}: the port is taken (another c2f proxy?) or {host!r} "
        "is not an address of this machine; give another --port or --host"
    )
