"""``python -m search.proxy`` (``c2f proxy``): a storage proxy in front of a database.

Past a few dozen workers, every worker holding a database connection of its own runs
the server out of connections (PostgreSQL's ``max_connections`` is 100 by default).
Run one proxy, and give the workers and commands its address instead of the
database's::

    c2f proxy --storage postgresql+psycopg2://user@db-host/optuna --host 0.0.0.0
    c2f worker --storage grpc://proxy-host:13000 --study-name quickstart-coarse ...

It is Optuna's gRPC storage proxy (:func:`optuna.storages.run_grpc_proxy_server`) with
``--connections`` connections to the database, plus the queue's own questions
(:mod:`search.sweep.workers.proxy`). It serves until stopped: SIGINT (Ctrl-C),
SIGTERM or SIGHUP let the calls under way finish, close the database connections and
exit 130, 143 or 129. Workers ride out a proxy that restarts: their calls are retried
for up to five minutes. optuna-dashboard reads the database itself (the URL given as
``--storage`` here), not the proxy.
"""

from __future__ import annotations

from model.errors import UsageError

if __name__ == "__main__":  # before the slow imports: a signal now ends it at once
    from search.sweep.workers.signals import exit_at_once_while_starting

    exit_at_once_while_starting()

import argparse
import os
import signal
import sys

from search import cli
from search.sweep.workers.signals import current
from search.sweep.workers.storage import (
    StorageURLError,
    check_storage,
    check_url,
    make_storage,
    proxy_address,
    release,
    safe_url,
)

DEFAULT_HOST = "localhost"
DEFAULT_CONNECTIONS = 8
# A database call that fails in the proxy is retried this long there, then passed on to
# the worker, whose own retries go on for longer and say so in its log.
PATIENCE_S = 30.0


def build_parser() -> argparse.ArgumentParser:
    from search.sweep.workers.proxy import DEFAULT_PORT

    p = cli.parser(
        "python -m search.proxy",
        "Serve an Optuna storage (a database) to many workers through one gRPC proxy, "
        "so that they hold no database connection each. Workers and commands then take "
        "--storage grpc://HOST:PORT. Runs until stopped (Ctrl-C).",
    )
    p.add_argument(
        "--storage",
        default=os.environ.get("C2F_STORAGE"),
        help="the database to serve, e.g. postgresql+psycopg2://user@host/db or "
        "sqlite:///studies/x.db (C2F_STORAGE)",
    )
    p.add_argument(
        "--host",
        default=DEFAULT_HOST,
        help="address to listen on (0.0.0.0: every interface, for other machines)",
    )
    p.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help="port to listen on (0: any free one)"
    )
    p.add_argument(
        "--connections",
        type=int,
        default=DEFAULT_CONNECTIONS,
        help="database connections of the proxy, and calls it serves at once",
    )
    return p


def check_served(url: str) -> None:
    """Refuse a storage the proxy cannot serve (ValueError, exit 2): another proxy, or a
    journal file (Optuna's proxy serves databases only)."""
    if proxy_address(url) is not None:
        raise UsageError(
            f"--storage {url}: that is a proxy; give the database the proxy should serve, "
            "e.g. postgresql+psycopg2://user@host/db"
        )
    check_url(url)
    if url.startswith("journal://") or "://" not in url:
        raise UsageError(
            f"--storage {url}: Optuna's storage proxy serves databases, not journal files; "
            "give a database (sqlite:///x.db, postgresql+psycopg2://user@host/db)"
        )


@cli.guarded
def main(argv: list[str] | None = None) -> int:
    # gRPC's own log lines (a port taken: "E1206 ... add_port.cc:83] Failed to add port")
    # would come before this command's one-line errors; read when gRPC starts, so set
    # before it is imported. GRPC_VERBOSITY=ERROR (or lower) in the environment shows them.
    os.environ.setdefault("GRPC_VERBOSITY", "NONE")
    args = build_parser().parse_args(argv)
    if not args.storage:
        raise UsageError(
            "--storage is required: the database to serve, e.g. "
            "postgresql+psycopg2://user@host/db (or set C2F_STORAGE)"
        )
    if not 0 <= args.port <= 65535:
        raise UsageError(f"--port must be 0 to 65535, got {args.port}")
    if args.connections < 1:
        raise UsageError(f"--connections must be >= 1, got {args.connections}")
    try:
        check_served(args.storage)
    except StorageURLError as exc:
        raise UsageError(str(exc)) from None
    check_storage(args.storage)  # a database that cannot be used: one line, before serving

    from search.sweep.workers.proxy import STOP_GRACE_S, serve

    def log(line: str) -> None:
        print(f"proxy: {line}", file=sys.stderr, flush=True)

    storage = make_storage(
        args.storage, patience=PATIENCE_S, log=log, connections=args.connections
    )
    stop = current()
    stop.interruptible = False  # from here the loop below looks at the flag
    serving = serve(storage, host=args.host, port=args.port, threads=args.connections)
    port = serving.port
    address = f"{args.host}:{port}"
    print(
        f"proxy: serving {safe_url(args.storage)} at grpc://{address} with "
        f"{args.connections} database connection(s); workers and commands: --storage "
        f"grpc://{'HOST' if args.host in ('0.0.0.0', '::') else args.host}:{port}. "
        "Ctrl-C stops it.",
        flush=True,
    )
    try:
        while not stop:
            stop.wait(1.0)
    finally:
        stop.acted = True  # the signal is handled here: no "interrupted after work" line
        serving.stop(STOP_GRACE_S)
        release(storage)
    name = signal.Signals(stop.signum or signal.SIGINT).name
    print(f"proxy: stopped ({name}); the calls under way were answered", file=sys.stderr)
    return stop.exit_code


if __name__ == "__main__":
    raise SystemExit(main())
