"""Helpers for tests against the PostgreSQL server on 127.0.0.1:5432 (trust auth).

Each test gets a database of its own (``c2f_<random>``), created from the ``test``
(or ``postgres``) database with autocommit and dropped afterwards, so tests never
see each other's studies. The server is found through PGHOST / PGPORT / PGUSER
when set; the user defaults to ``postgres``, then ``root``.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

from tests.conftest import missing

REPO = Path(__file__).resolve().parents[2]
HOST = os.environ.get("PGHOST", "127.0.0.1")
PORT = int(os.environ.get("PGPORT", "5432"))
USERS = [os.environ["PGUSER"]] if os.environ.get("PGUSER") else ["postgres", "root"]
ADMIN_DBS = ("test", "postgres")


def _admin_connection():
    """An autocommit connection to an existing database, or None if the server doesn't answer."""
    try:
        import psycopg2
    except ImportError:
        return None
    for user in USERS:
        for db in ADMIN_DBS:
            try:
                con = psycopg2.connect(
                    host=HOST, port=PORT, user=user, dbname=db, connect_timeout=3
                )
            except psycopg2.OperationalError:
                continue
            con.autocommit = True
            return con
    return None


def url_for(database: str, user: str) -> str:
    return f"postgresql+psycopg2://{user}@{HOST}:{PORT}/{database}"


@contextlib.contextmanager
def temporary_database(prefix: str = "c2f") -> Iterator[str]:
    """Create ``<prefix>_<random>``, yield its SQLAlchemy URL, drop it afterwards.

    Skips the test when the server is unreachable (fails it in CI, via ``missing``).
    """
    admin = _admin_connection()
    if admin is None:
        missing(f"PostgreSQL does not answer on {HOST}:{PORT} (users {USERS}, trust auth)")
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    user = admin.get_dsn_parameters()["user"]
    try:
        with admin.cursor() as cur:
            cur.execute(f'CREATE DATABASE "{name}"')
        yield url_for(name, user)
    finally:
        drop_database(admin, name)
        admin.close()


def drop_database(admin, name: str) -> None:
    """Terminate the database's connections (killed workers leave some), then drop it."""
    with admin.cursor() as cur:
        cur.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            "WHERE datname = %s AND pid <> pg_backend_pid()",
            (name,),
        )
        cur.execute(f'DROP DATABASE IF EXISTS "{name}"')


def start_worker(*args: str, env: dict[str, str] | None = None) -> subprocess.Popen:
    """``python -m search.worker ARGS`` as another machine would run it: a separate
    process in its own process group (a signal to the group reaches its workers too)."""
    return subprocess.Popen(
        [sys.executable, "-m", "search.worker", *args],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO), **(env or {})},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )


def finish(procs: list[subprocess.Popen], *, timeout: float = 90.0) -> list[str]:
    """Wait for the workers; return their output. Kills them all if time runs out."""
    deadline = time.monotonic() + timeout
    outputs = []
    try:
        for p in procs:
            out, _ = p.communicate(timeout=max(1.0, deadline - time.monotonic()))
            outputs.append(out)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return outputs


class CuttableProxy:
    """A TCP proxy on 127.0.0.1 to the PostgreSQL server whose network can be cut.

    ``cut(seconds)`` resets every open connection and, for that long, drops every
    new one at once (as a network partition or a restarting server would look to
    a client). Bounded: it serves this machine's loopback only and stops with ``close``.
    """

    def __init__(self, host: str = HOST, port: int = PORT) -> None:
        import socket
        import threading

        self.target = (host, port)
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.down = threading.Event()
        self.closed = threading.Event()
        self.lock = threading.Lock()
        self.sockets: list = []
        threading.Thread(target=self._accept, daemon=True).start()

    def url(self, database_url: str) -> str:
        return database_url.replace(f"{HOST}:{PORT}", f"127.0.0.1:{self.port}")

    def _accept(self) -> None:
        import socket
        import threading

        while not self.closed.is_set():
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            if self.down.is_set():
                _reset(client)
                continue
            try:
                upstream = socket.create_connection(self.target, timeout=5)
            except OSError:
                _reset(client)
                continue
            upstream.settimeout(None)
            with self.lock:
                self.sockets += [client, upstream]
            for a, b in ((client, upstream), (upstream, client)):
                threading.Thread(target=_pump, args=(a, b), daemon=True).start()

    def cut(self, seconds: float) -> None:
        """Reset every connection now and refuse new ones for ``seconds`` (blocks)."""
        import socket

        self.down.set()
        with self.lock:
            for s in self.sockets:
                # shutdown, not close: a thread blocked in recv on a closed socket would
                # stay blocked, then read the next connection that gets the same fd.
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)
            self.sockets.clear()
        time.sleep(seconds)
        self.down.clear()

    def close(self) -> None:
        import socket

        self.closed.set()
        self.listener.close()
        with self.lock:
            for s in self.sockets:
                with contextlib.suppress(OSError):
                    s.shutdown(socket.SHUT_RDWR)


def _reset(sock) -> None:
    import socket
    import struct

    with contextlib.suppress(OSError):
        # SO_LINGER 0: close sends RST, as a dropped connection looks to the peer.
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        sock.close()


def _pump(src, dst) -> None:
    """Copy src to dst until either end goes; then wake the other direction's thread
    (shutdown) and close only src, the socket this thread reads: a socket closed under
    a thread blocked in recv keeps it blocked, and it would read the next connection
    that gets the same file descriptor."""
    import socket

    with contextlib.suppress(OSError):
        while data := src.recv(65536):
            dst.sendall(data)
    for sock in (src, dst):
        with contextlib.suppress(OSError):
            sock.shutdown(socket.SHUT_RDWR)
    _reset(src)
