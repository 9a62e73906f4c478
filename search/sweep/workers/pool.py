"""Starting N workers and owning their lives: the one place that starts worker processes.

The command's process supervises; every worker is a child process running
:func:`search.sweep.workers.loop.run_queue`. ``joblib.Parallel`` launches them, one
task per worker, through the service's own joblib backend, :class:`ForkBackend`
(registered as ``"c2f-fork"``): each task is the main of a process forked for it, and
its result is that process's exit code. A Dask backend made active with
``joblib.parallel_config`` (``search.worker --backend dask``) runs the same workers on
a cluster instead (:mod:`search.sweep.workers.cluster`). The lifecycle is owned here:

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

import concurrent.futures
import contextlib
import ctypes
import functools
import gc
import multiprocessing
import multiprocessing.connection
import os
import signal
import sys
import threading
import time
from collections.abc import Callable, Collection, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import joblib
from joblib.parallel import ParallelBackendBase, get_active_backend

from model.errors import UsageError
from search.sweep.workers.loop import Sweep, run_queue
from search.sweep.workers.signals import (
    STOP_SIGNALS,
    Interrupted,
    StopFlag,
    current,
    process_main,
)
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
    killed_pids: set[int] = field(default_factory=set)  # the workers the pool itself killed
    started: int = 0
    not_started: list[str] = field(default_factory=list)
    codes: dict[int, int | None] = field(default_factory=dict)  # exit code by worker index


# What a worker tells the command through the pipe: (index, what, line).
STARTED, NOT_STARTED, FAILED = "started", "not started", "failed"


class Roll:
    """The workers' messages as they come, kept in a :class:`PoolResult`: who started, who
    could not (said at once through ``say``, and how many run once all were heard from),
    and the line of each one that stopped on an error."""

    def __init__(self, workers: int, result: PoolResult, say: Callable[[str], None]) -> None:
        self.workers, self.result, self.say = workers, result, say
        self.lines: dict[int, str] = {}
        self.not_started: set[int] = set()
        self._told = False

    def hear(self, index: int, what: str, line: str) -> None:
        result = self.result
        if what == STARTED:
            result.started += 1
        else:
            self.lines[index] = line
            if what == NOT_STARTED:
                self.not_started.add(index)
                again = line in result.not_started
                result.not_started.append(line)
                self.say(f"worker {index} could not start: {'the same' if again else line}")
        heard = result.started + len(self.not_started)
        if self.not_started and heard == self.workers and result.started and not self._told:
            self.say(f"{result.started} of the {self.workers} workers run")
            self._told = True

    def errors(
        self,
        codes: dict[int, int | None],
        name: Callable[[int], str],
        killed: Collection[int] = (),
    ) -> list[str]:
        """The line of each worker whose exit code says it failed (not a stop, not a kill
        by its pool: the indices in ``killed``); ``name(index)`` names one that said no
        line."""
        errors = []
        for index, code in codes.items():
            if index in self.not_started and self.result.started:
                continue  # said when it happened; the others did the work
            if code is None or code == 0 or code - 128 in STOP_SIGNALS:
                continue
            if code == -signal.SIGKILL and index in killed:
                continue
            errors.append(self.lines.get(index) or _died(name(index), code))
        if self.not_started and not self.result.started:
            errors = [f"none of the {self.workers} workers could start: {e}" for e in errors]
        return errors


def _died(who: str, code: int, *, others: bool = False) -> str:
    """The line of a worker that exited with ``code`` and said nothing (``others``: the
    other workers went on)."""
    if code == -signal.SIGKILL:
        then = (
            "its trial is re-queued, and the other workers went on"
            if others
            else "its trial is re-queued: run the command again to go on"
        )
        why = "SIGKILL: out of memory, or killed from outside the command"
        return f"{who} was killed ({why}); {then}"
    if code < 0:
        return f"{who} was killed by signal {signal.Signals(-code).name}"
    return f"{who} exited with code {code}"


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
        raise UsageError(
            f"{where} {workers}: at most {MAX_WORKERS_PER_CORE * n} worker processes on the "
            f"{n} core(s) here ({MAX_WORKERS_PER_CORE} per core); each trains on one core, "
            f"so past {n} they share them. On many machines, start c2f worker "
            "(python -m search.worker) on each"
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


class ForkBackend(ParallelBackendBase):
    """The service's joblib backend: each task is the main of a process forked for it.

    ``joblib.Parallel(n_jobs=N, backend="c2f-fork", pre_dispatch="all")`` starts one
    child a task at once, from the calling thread and with its signal mask (spawned
    where fork is not safe); a task returns its process's exit code, and that is its
    result. No process is reused: a worker's process is its life (its signals, its
    parent's death, its exit code), which loky's reused workers did not give (orphans
    after ``kill -9``, hangs at Ctrl-C). A child dies with the process that started it
    (:func:`_die_with_parent`).
    """

    supports_retrieve_callback = True
    supports_timeout = False
    uses_threads = False
    supports_sharedmem = False

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        # Fork where it exists: a worker starts in milliseconds, not the seconds of a new
        # interpreter importing NumPy and Optuna.
        self.context: Any = multiprocessing.get_context(
            "fork" if sys.platform == "linux" else "spawn"
        )
        self.processes: list[Any] = []  # every child started, in the order of the tasks
        self.killed_pids: set[int] = set()  # the children it killed (terminate's last resort)
        self._running: dict[Any, tuple[Any, concurrent.futures.Future, Any]] = {}
        self._lock = threading.Lock()
        self._watch: threading.Thread | None = None
        self._watching = False

    def effective_n_jobs(self, n_jobs: int | None) -> int:
        if n_jobs == 0:
            raise UsageError("n_jobs == 0 in Parallel has no meaning")
        n = 1 if n_jobs is None else n_jobs if n_jobs > 0 else max(cores() + 1 + n_jobs, 1)
        # Never 1: joblib runs a lone job in the calling process, and a worker must not run
        # in the command's.
        return max(n, 2)

    def submit(self, func: Callable[[], list[int]], callback: Any = None) -> Any:
        future: concurrent.futures.Future = concurrent.futures.Future()
        process = self.context.Process(
            target=_task_main, args=(func, os.getpid()), name=f"c2f-worker-{len(self.processes)}"
        )
        process.start()
        self.processes.append(process)
        with self._lock:
            self._running[process.sentinel] = (process, future, callback)
        if self._watching:  # a task dispatched late, from a completion: watched at once
            self._watch_exits()
        return future

    @contextlib.contextmanager
    def retrieval_context(self) -> Iterator[None]:
        # Exits are watched once joblib retrieves (after the dispatch of every task with
        # pre_dispatch "all"): no thread of this process runs while the children fork.
        self._watching = True
        self._watch_exits()
        yield

    def _watch_exits(self) -> None:
        with self._lock:
            if self._watch is None and self._running:
                self._watch = threading.Thread(target=self._settle, name="c2f-fork", daemon=True)
                self._watch.start()

    def _settle(self) -> None:
        """Complete a task's future, and tell joblib, as its process exits."""
        while True:
            with self._lock:
                if not self._running:
                    self._watch = None
                    return
                running = dict(self._running)
            for sentinel in multiprocessing.connection.wait(list(running), timeout=0.5):
                process, future, callback = running[sentinel]
                code = process.exitcode
                if code is None:  # the supervisor reaps it this instant: the next look sees it
                    continue
                with self._lock:
                    del self._running[sentinel]
                future.set_result(code)
                if callback is not None:
                    callback(future)

    def retrieve_result_callback(self, out: concurrent.futures.Future) -> list[int]:
        return [out.result()]

    def abort_everything(self, ensure_ready: bool = True) -> None:
        self.terminate()

    def terminate(self) -> None:
        """Stop the children still running (none after a complete call): SIGTERM, so a
        worker re-queues its trial, then SIGKILL after STOP_TIMEOUT_S."""
        alive = [p for p in self.processes if p.exitcode is None]
        for p in alive:
            p.terminate()
        deadline = time.monotonic() + STOP_TIMEOUT_S
        for p in alive:
            p.join(max(0.0, deadline - time.monotonic()))
            if p.exitcode is None:
                self.killed_pids.add(p.pid)
                p.kill()
                p.join()


@functools.cache
def register_backends() -> None:
    """Name the service's joblib backends: ``"c2f-fork"`` (:class:`ForkBackend`) and
    ``"c2f-dask"`` (a Dask cluster: :class:`search.sweep.workers.cluster.ClusterBackend`,
    whose arguments are those of joblib's ``"dask"``)."""
    joblib.register_parallel_backend("c2f-fork", ForkBackend)
    joblib.register_parallel_backend("c2f-dask", _cluster_backend)


def _cluster_backend(**kwargs: Any) -> Any:
    from search.sweep.workers import cluster  # imports Dask: only when it is asked for

    return cluster.ClusterBackend(**kwargs)


def cluster_client() -> Any | None:
    """The Dask client of the active joblib backend (``joblib.parallel_config``), if it
    has one: the workers then run on that cluster."""
    backend, _ = get_active_backend()
    return getattr(backend, "client", None)


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

    The workers are forked here (:func:`run_forked`), or run on a Dask cluster when the
    active joblib backend is a Dask one (``joblib.parallel_config(backend="c2f-dask",
    client=...)``, as ``search.worker --backend dask`` sets it).
    """
    register_backends()
    run: Callable[..., PoolResult] = run_forked
    client = cluster_client()
    if client is not None:
        from search.sweep.workers import cluster  # imports Dask: only when it is used

        run = functools.partial(cluster.run_on_cluster, client=client)
    return run(
        job,
        workers=workers,
        stop=stop,
        progress=progress,
        reap=reap,
        release_first=release_first,
        stop_timeout=stop_timeout,
        say=say,
    )


def run_forked(
    job: WorkerJob,
    *,
    workers: int,
    stop: StopFlag,
    progress: Callable[[], None] | None = None,
    reap: Callable[[], object] | None = None,
    release_first: Sequence[object] = (),
    stop_timeout: float = STOP_TIMEOUT_S,
    say: Callable[[str], None] = say_on_stderr,
    first: int = 0,
    forward: Callable[[tuple[int, str, str]], object] | None = None,
) -> PoolResult:
    """:func:`run_pool` with worker processes forked from this one, by ``joblib.Parallel``
    and :class:`ForkBackend`; the workers are numbered from ``first``.

    Each message of a worker (started, could not start, failed) is also passed to
    ``forward``: a cluster's task sends them on to its command.
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
    backend = ForkBackend()
    was_interruptible, stop.interruptible = stop.interruptible, False
    # Each worker says whether it started, and the one line of the error that stopped it.
    reader, writer = backend.context.Pipe(duplex=False)
    tasks = [joblib.delayed(_worker)(job, first + i, writer) for i in range(workers)]
    # Blocked while forking: a signal must reach a worker after it installed its handlers.
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        # Every worker at once (pre_dispatch "all"), one a process (batch_size 1); the
        # exit codes come back in the workers' order once they have all exited.
        codes = joblib.Parallel(
            n_jobs=workers,
            backend=backend,
            pre_dispatch="all",
            batch_size=1,
            return_as="generator",
        )(tasks)
    except BaseException:
        stop.interruptible = was_interruptible
        raise
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)
        writer.close()
    procs = backend.processes
    result = PoolResult()
    roll = Roll(workers, result, say)
    # A signal from now on reaches every worker at once (idempotent in a worker that
    # has it already from the process group). A signal that came during the forks is
    # forwarded by the first look of _supervise.
    stop.forward_to = [p.pid for p in procs]

    def hear() -> None:
        """The workers' messages so far: who started, who could not, who failed."""
        with contextlib.suppress(EOFError, OSError):
            while reader.poll():
                message = reader.recv()
                roll.hear(*message)
                if forward is not None:
                    forward(message)

    def look() -> None:
        hear()
        if progress is not None:
            draw_progress(progress, release_first)

    try:
        _supervise(procs, stop, look, reap, stop_timeout, result)
    finally:
        stop.forward_to = []
        stop.interruptible = was_interruptible
    hear()
    reader.close()
    result.codes = dict(zip(range(first, first + workers), codes, strict=True))
    pids = {first + i: p.pid for i, p in enumerate(procs)}
    by_pool = result.killed_pids | backend.killed_pids
    killed = {i for i, pid in pids.items() if pid in by_pool}
    outside = [
        i for i, code in result.codes.items() if code == -signal.SIGKILL and i not in killed
    ]
    if outside and reap is not None:
        reap()  # a worker killed from outside: its trial is lost, its PID gone
    if len(outside) < workers:
        # The others went on with the queue, the killed one's trial re-queued for them
        # (their own look for lost trials, or the reap above): said, not a failure.
        for i in outside:
            say(_died(f"worker {i} (pid {pids[i]})", -signal.SIGKILL, others=True))
        killed |= set(outside)
    result.errors = roll.errors(result.codes, lambda i: f"worker {i} (pid {pids[i]})", killed)
    result.signum = stop.signum
    return result


def draw_progress(progress: Callable[[], None], storages: Sequence[object]) -> None:
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
    result: PoolResult | None = None
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
            close(dry=result is not None and not result.signum and not result.errors)
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
                result.killed_pids.add(p.pid)
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


@process_main
def _task_main(func: Callable[[], list[int]], parent: int) -> None:
    """A child of :class:`ForkBackend`: it dies with ``parent``, runs its task and exits
    with the code the task returns.

    ``_exit``: no interpreter shutdown, whose clean-up callbacks could print or hang.
    """
    _die_with_parent(parent)
    code = 1
    try:
        code = next((c for c in func() if c), 0)
    except SystemExit as exc:  # a user's training function may call sys.exit
        code = exc.code if isinstance(exc.code, int) else int(exc.code is not None)
    finally:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def _worker(job: WorkerJob, index: int, messages: Any = None) -> int:
    """A worker process's main (a task of :class:`ForkBackend`): handlers first, then the
    data and the study, then the queue; its exit code.

    It says through ``messages`` (the write end of a pipe) that it started, or the one
    line of the error that stopped it; the command says it once for all the workers it
    stopped.
    """
    import optuna
    from threadpoolctl import threadpool_limits

    # The worker's own lines say what happened (dropped trials, storage outages);
    # Optuna's warnings about the same events would say it again, with SQL.
    optuna.logging.set_verbosity(optuna.logging.ERROR)
    stop = StopFlag(hard_exit=False)
    stop.install()
    signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    started = False

    def tell(what: str, line: str) -> None:
        try:
            messages.send((index, what, line))
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
        return 1
    return stop.exit_code if stop else 0
