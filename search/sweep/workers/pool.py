"""Starting N workers and owning their lives: the one place that starts worker processes.

The command's process supervises; every worker is a child process running
:func:`search.sweep.workers.loop.run_queue`. The lifecycle is owned here:

- A stop signal (SIGINT, SIGTERM, SIGHUP) to the command alone or to its
  process group reaches every worker: each re-queues its running trial and
  exits. Workers that have not exited ``stop_timeout`` seconds later, or at a
  second signal, are killed, and their trials re-queued by the command.
- A worker never outlives the command: on Linux the kernel sends it SIGTERM
  when the command dies (``PR_SET_PDEATHSIG``), and a watch thread does the same
  wherever the parent changes, so an orphan re-queues its trial and stops
  before it takes another one.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

from search.sweep.workers.loop import Sweep, run_queue
from search.sweep.workers.signals import STOP_SIGNALS, Interrupted, StopFlag, current
from search.sweep.workers.storage import (
    ResilientStorage,
    StorageError,
    StorageUnavailable,
    release,
    release_all,
)

PR_SET_PDEATHSIG = 1
STOP_TIMEOUT_S = 5.0  # then a worker that has not stopped is killed, its trial re-queued here
# Each worker trains on one core: past a few per core they only wait for each other, and a
# mistyped count (1000) would start processes without bound.
MAX_WORKERS_PER_CORE = 4


class WorkerJob(Protocol):
    """What a worker process needs; picklable (it crosses to the worker process)."""

    @property
    def threads(self) -> int:
        """BLAS threads for the worker."""
        ...

    def open(self, worker: int) -> Sweep:
        """In the worker process: connect, open the study and the data, build the objective."""
        ...


class WorkersFailed(RuntimeError):
    """Worker processes exited with an error (each printed its own line)."""


@dataclass
class PoolResult:
    """How the workers ended: the stop signal if any, and the workers that failed.

    ``started`` counts the workers that opened the study and its data; ``not_started``
    holds the line of each one that could not (a database at its connection limit).
    """

    signum: int | None = None
    errors: list[str] = field(default_factory=list)
    killed: int = 0
    started: int = 0
    not_started: list[str] = field(default_factory=list)


# What a worker tells the command through the pipe: (pid, index, what, line).
STARTED, NOT_STARTED, FAILED = "started", "not started", "failed"


def say_on_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def cores() -> int:
    """The cores this process may run on."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def check_workers(workers: int, *, where: str = "--workers") -> None:
    """Refuse more than MAX_WORKERS_PER_CORE workers per core (ValueError naming ``where``,
    the flag or the study file's field); warn on stderr when there are more than cores."""
    n = cores()
    if workers > MAX_WORKERS_PER_CORE * n:
        raise ValueError(
            f"{where} {workers}: at most {MAX_WORKERS_PER_CORE * n} worker processes on the "
            f"{n} core(s) here ({MAX_WORKERS_PER_CORE} per core); each trains on one core, "
            f"so past {n} they share them. On many machines, start search.worker on each"
        )
    if workers > n:
        print(
            f"warning: {workers} workers on {n} core(s): they share the cores, so the sweep "
            f"will not finish sooner than with {n}",
            file=sys.stderr,
        )


def threads_per(workers: int) -> int:
    """BLAS threads for each of ``workers`` workers by default: one.

    Measured on 2 cores (README, "The optimiser step and BLAS threads"): a second
    thread gains at most 1.3x on an idle machine and loses 4-80x as soon as another
    process wants a core, as other workers do. ``search.worker --threads`` asks for more.
    """
    return 1


def run_pool(
    job: WorkerJob,
    *,
    workers: int,
    stop: StopFlag,
    progress: Callable[[], None] | None = None,
    reap: Callable[[], object] | None = None,
    release_first: Sequence[object] = (),
    stop_timeout: float = STOP_TIMEOUT_S,
    say: Callable[[str], None] = say_on_stderr,
) -> PoolResult:
    """Run ``workers`` worker processes on ``job`` until its queue is empty or a stop signal.

    ``stop`` is the command's flag (its handlers installed); it is only looked
    at here, never raised. ``progress`` is called every half second. ``reap``
    re-queues the trials of workers that had to be killed. The storages in
    ``release_first`` drop their connections before the workers are forked
    (a forked connection would be shared by two processes), and again after each
    call of ``progress``: the command holds no connection while it only waits.
    A worker that cannot start is said at once through ``say``, with how many of
    the workers run; the others go on.
    """
    for storage in release_first:
        release(storage)
    # No SQLite connection may cross the fork. A storage the command dropped without
    # releasing it waits in a reference cycle for the garbage collector; a worker whose
    # collector frees the copy closes the file and so drops the worker's own locks on it.
    # The next process to close a connection then took itself for the last one, folded the
    # -wal file in and deleted it while the worker went on writing to it: every later
    # trial of that worker was lost (45 of 200 in a one-worker run).
    gc.collect()
    release_all()
    # Fork where it exists: a worker starts in milliseconds, not the seconds of a new
    # interpreter importing NumPy and Optuna. The storages were released above.
    ctx: Any = multiprocessing.get_context("fork" if sys.platform == "linux" else "spawn")
    was_interruptible, stop.interruptible = stop.interruptible, False
    # Blocked while forking: a signal must reach a worker after it installed its handlers.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    procs = []
    # Each worker sends the one line of the error that stopped it, if one did.
    reader, writer = ctx.Pipe(duplex=False)
    try:
        for i in range(workers):
            p = ctx.Process(
                target=_worker, args=(job, i, os.getpid(), writer), name=f"c2f-worker-{i}"
            )
            p.start()
            procs.append(p)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        writer.close()
    result = PoolResult()
    # A signal from now on reaches every worker at once (idempotent in a worker that
    # has it already from the process group). A signal that came during the forks is
    # forwarded by the first look of _supervise.
    stop.forward_to = [p.pid for p in procs]
    said: dict[int, str] = {}
    not_started: set[int] = set()

    told: list[bool] = []

    def hear() -> None:
        """The workers' messages so far: who started, who could not, who failed."""
        with contextlib.suppress(EOFError, OSError):
            while reader.poll():
                pid, index, what, line = reader.recv()
                if what == STARTED:
                    result.started += 1
                    continue
                said[pid] = line
                if what == NOT_STARTED:
                    not_started.add(pid)
                    again = line in result.not_started
                    result.not_started.append(line)
                    say(f"worker {index} could not start: {'the same' if again else line}")
        heard = result.started + len(not_started)
        if not_started and heard == workers and result.started and not told:
            say(f"{result.started} of the {workers} workers run")
            told.append(True)

    def look() -> None:
        hear()
        if progress is not None:
            _draw(progress, release_first)

    try:
        _supervise(procs, stop, look, reap, stop_timeout, result)
    finally:
        stop.forward_to = []
        stop.interruptible = was_interruptible
    hear()
    reader.close()
    for i, p in enumerate(procs):
        code = p.exitcode
        if p.pid in not_started and result.started:
            continue  # said when it happened; the others did the work
        if code not in (0, None) and code != -signal.SIGKILL and code - 128 not in STOP_SIGNALS:
            result.errors.append(
                said.get(p.pid) or f"worker {i} (pid {p.pid}) exited with code {code}"
            )
    if not_started and not result.started:
        result.errors = [f"none of the {workers} workers could start: {e}" for e in result.errors]
    result.signum = stop.signum
    return result


def _draw(progress: Callable[[], None], storages: Sequence[object]) -> None:
    """One draw of the progress line, then the storages' connections closed.

    A draw that cannot reach the storage at once (every connection the server allows
    taken by the workers) is skipped, not waited for: the workers are what matters,
    and the supervisor must go on watching them.
    """
    patient = [(s, s.patience) for s in storages if isinstance(s, ResilientStorage)]
    for storage, _ in patient:
        storage.patience = 0.0
    try:
        progress()
    except (StorageUnavailable, StorageError):
        pass
    finally:
        for resilient, patience in patient:
            resilient.patience = patience
        for each in storages:
            release(each)


def run_workers(
    job: WorkerJob,
    *,
    workers: int,
    progress: Callable[[], None] | None = None,
    reap: Callable[[], object] | None = None,
    release_first: Sequence[object] = (),
) -> None:
    """:func:`run_pool` with the command's stop flag; raises what ended it early
    (:class:`Interrupted`, :class:`WorkersFailed`)."""
    try:
        result = run_pool(
            job,
            workers=workers,
            stop=current(),
            progress=progress,
            reap=reap,
            release_first=release_first,
        )
    finally:
        close = getattr(progress, "close", None)
        if close is not None:
            close()
    if result.signum:
        raise Interrupted(result.signum)
    if result.errors:
        # Workers stopped by one cause (a full disk) say the same line: say it once.
        errors = list(dict.fromkeys(result.errors))
        raise WorkersFailed("; ".join(errors))


def _supervise(
    procs: list,
    stop: StopFlag,
    look: Callable[[], None] | None,
    reap: Callable[[], object] | None,
    stop_timeout: float,
    result: PoolResult,
) -> None:
    deadline: float | None = None
    while True:
        alive = [p for p in procs if p.exitcode is None]
        if not alive:
            return
        if stop and deadline is None:
            stop.acted = True  # a second signal now means "kill the workers", handled here
            deadline = time.monotonic() + stop_timeout
            for p in alive:
                # Idempotent in a worker: it may have the signal already from the group.
                with contextlib.suppress(ProcessLookupError):
                    os.kill(p.pid, stop.signum or signal.SIGTERM)
        if deadline is not None and (stop.presses > 1 or time.monotonic() > deadline):
            for p in alive:
                p.kill()
            for p in alive:
                p.join()
            result.killed = len(alive)
            if reap is not None:
                reap()  # their PIDs are gone now: their trials count as lost
            return
        if look is not None and deadline is None:
            look()
        multiprocessing.connection.wait([p.sentinel for p in alive], timeout=0.5)


def _die_with_parent(parent: int) -> None:
    """SIGTERM to this process when ``parent`` is gone: by the kernel where it can, else a
    watch thread that looks once a second."""
    if sys.platform == "linux":
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM)

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os.kill(os.getpid(), signal.SIGTERM)

    if os.getppid() != parent:  # died before prctl took effect
        os.kill(os.getpid(), signal.SIGTERM)
    threading.Thread(target=watch, name="parent-watch", daemon=True).start()


def _worker(job: WorkerJob, index: int, parent: int, errors: Any = None) -> None:
    """A worker process: handlers first, then the data and the study, then the queue.

    An error that stops it is one line, sent to the command through ``errors`` (the
    write end of a pipe), which says it once for all the workers it stopped.
    """
    import optuna
    from threadpoolctl import threadpool_limits

    # The worker's own lines say what happened (dropped trials, storage outages);
    # Optuna's warnings about the same events would say it again, with SQL.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    stop = StopFlag(hard_exit=False)
    stop.install()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    _die_with_parent(parent)
    started = False

    def tell(what: str, line: str) -> None:
        try:
            errors.send((os.getpid(), index, what, line))
        except Exception:  # noqa: BLE001 - no command listening (or no pipe): say it here
            if line:
                print(f"worker {os.getpid()}: error: {line}", file=sys.stderr)

    try:
        with threadpool_limits(limits=job.threads):
            sweep = job.open(index)
            started = True
            tell(STARTED, "")
            if not stop:
                run_queue(sweep, stop)
    except Exception as exc:  # noqa: BLE001 - one line, not a traceback, then exit 1
        if isinstance(exc, StorageError):
            line = str(exc)
        else:
            line = f"worker {index} failed: {type(exc).__name__}: {exc}".splitlines()[0]
        tell(FAILED if started else NOT_STARTED, line)
        sys.stderr.flush()
        os._exit(1)
    sys.stdout.flush()
    sys.stderr.flush()
    # _exit: no interpreter shutdown, whose clean-up callbacks could print or hang.
    os._exit(stop.exit_code if stop else 0)
