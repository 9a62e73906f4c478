"""A stop signal after a command's work is done ends it with 128 + the signal and one
line, never with the raw signal (Python's own handlers are back while it tears down)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tests.search.conftest import REPO

LINGERS = """
from search.sweep.workers.signals import exit_at_once_while_starting

exit_at_once_while_starting()
import time
from search import cli

@cli.guarded
def main(argv=None):
    print("next: python -m search.fine", flush=True)
    return 0

code = main()
print("after main", flush=True)
# The process lingers, running code as the interpreter's teardown does: short sleeps, so a
# signal the kernel gives to another thread (numpy's) is acted on within 0.1 s, not at the
# end of one long sleep.
for _ in range(600):
    time.sleep(0.1)
raise SystemExit(code)
"""


def command(*args: str) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, *args],
        cwd=REPO,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def signal_after(proc: subprocess.Popen, line: str, signum: int, delay: float = 0.0) -> str:
    for out in proc.stdout:
        if out.startswith(line):
            time.sleep(delay)
            proc.send_signal(signum)
            break
    return proc.communicate(timeout=60)[1]


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_after_the_work_is_done_ends_the_command_with_128_plus_it(tmp_path, signum):
    script = tmp_path / "lingers.py"
    script.write_text(LINGERS)
    proc = command(str(script))
    err = signal_after(proc, "after main", signum)
    assert proc.returncode == 128 + signum, err
    name = signal.Signals(signum).name
    assert err == f"\ninterrupted ({name}) after the command had finished: it is all stored\n"


@pytest.mark.parametrize(
    "delay",
    # The handler after the work: the in-process test above (the suite's time budget).
    [pytest.param(d, marks=pytest.mark.slow) for d in (0.0, 0.005, 0.05)],
)
def test_a_ctrl_c_after_next_never_kills_the_command_with_the_raw_signal(qs_path, delay):
    proc = command("-m", "search.coarse", "--study", qs_path)
    err = signal_after(proc, "next:", signal.SIGINT, delay)
    # 0 when the command had already exited; never -2 (killed while tearing down).
    assert proc.returncode in (0, 130), (proc.returncode, err)
    assert "Traceback" not in err and "Exception ignored" not in err, err


def test_a_finished_command_exits_0_and_leaves_no_sqlite_side_files(qs_path, tmp_path):
    proc = command("-m", "search.coarse", "--study", qs_path)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert "next: " in out
    assert not list(tmp_path.glob("*.db-wal")) and not list(tmp_path.glob("*.db-shm"))
