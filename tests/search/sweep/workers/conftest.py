"""Fixtures for the workers' tests: a ``c2f proxy`` started by the test."""

from __future__ import annotations

import contextlib
import os
import re
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[4]
PROXY_START_S = 60.0


@dataclass
class Proxy:
    """A running ``python -m search.proxy``: its process and the URL workers give."""

    proc: subprocess.Popen
    url: str  # grpc://127.0.0.1:PORT
    port: int

    def stop(self, sig: int = signal.SIGTERM) -> tuple[int, str]:
        """Stop it with ``sig``; its exit code and what it wrote on stderr."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            _, err = self.proc.communicate(timeout=30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            _, err = self.proc.communicate()
        return self.proc.returncode, err


def start_proxy(database_url: str, port: int = 0) -> Proxy:
    """``python -m search.proxy --storage URL --port PORT`` on 127.0.0.1 (``port`` 0: a
    free one), once it says where it listens."""
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "search.proxy",
            "--storage",
            database_url,
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--connections",
            "4",
        ],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + PROXY_START_S
    while time.monotonic() < deadline:
        ready, _, _ = select.select([proc.stdout], [], [], 0.5)
        if ready:
            line = proc.stdout.readline()
            found = re.search(r"at grpc://127\.0\.0\.1:(\d+)", line)
            if found:
                bound = int(found.group(1))
                return Proxy(proc, f"grpc://127.0.0.1:{bound}", bound)
        if proc.poll() is not None:
            raise RuntimeError(f"the proxy exited {proc.returncode}: {proc.stderr.read()}")
    proc.kill()
    raise TimeoutError(f"the proxy did not start within {PROXY_START_S:g} s")


@contextlib.contextmanager
def running_proxy(database_url: str) -> Iterator[Proxy]:
    """A proxy in front of ``database_url`` for the duration; always stopped."""
    proxy = start_proxy(database_url)
    try:
        yield proxy
    finally:
        proxy.stop()
