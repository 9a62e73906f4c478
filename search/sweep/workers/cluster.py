"""Worker processes on a Dask cluster: the same workers, launched by joblib's Dask backend.

``search.worker --backend dask --scheduler tcp://HOST:8786 --workers 64`` runs 64
tasks on an existing cluster through :class:`ClusterBackend` (joblib's ``"dask"``
backend, registered as ``"c2f-dask"``). Each task forks one worker process on its
cluster machine with :func:`search.sweep.workers.pool.run_forked`, so what the local
pool guarantees holds there too: a stop reaches the worker, which re-queues its trial;
one that has not stopped in time is killed and its trial re-queued by the task; a
worker dies with its task's process.

The command and its tasks talk through the scheduler, under a name of the run's own:

- The command's record, a ``distributed.Variable`` that a thread of the command renews
  every :data:`BEAT_S` seconds: a count, the stop signal and how many came. A task
  passes a stop on to its worker. A record that has not changed for
  :data:`COMMAND_SILENCE_S` seconds (the command was killed, or the scheduler is gone)
  stops the worker as its parent's death would, with SIGTERM: the worker re-queues its
  trial and the task ends.
- The workers' messages (started, could not start, failed) go to the command as the
  task's events on the run's topic; the command says them as the local pool does.

The storage must be one that every cluster machine reaches: PostgreSQL, or a proxy in
front of it (``search.worker`` refuses SQLite). A machine that does not see the
command's prepared data prepares its own copy, checked against the study's checksum.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import multiprocessing
import signal
import threading
import time
import uuid
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import distributed
import joblib

# joblib's Dask backend has no public import path: joblib registers it as "dask" from here.
from joblib._dask import DaskDistributedBackend

from search.sweep.workers.pool import (
    FAILED,
    STOP_TIMEOUT_S,
    PoolResult,
    Roll,
    WorkerJob,
    WorkersFailed,
    draw_progress,
    run_forked,
    say_on_stderr,
)
from search.sweep.workers.signals import StopFlag
from search.sweep.workers.storage import release

BEAT_S = 0.5  # the command renews its record, and each task reads it, this often
# A record unchanged this long means the command is gone: ten beats missed in a row.
COMMAND_SILENCE_S = 5.0
# After a second stop signal, the command waits this long for the tasks to kill their
# workers and re-queue the trials, then leaves them to it.
KILL_WAIT_S = 3.0
WAIT_FOR_WORKERS_S = 10.0  # a cluster with no worker yet: how long to wait for one


class ClusterBackend(DaskDistributedBackend):
    """joblib's Dask backend, for worker processes: it never runs a job in the calling
    process, and it keeps each task's future so the command sees which have ended."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("wait_for_workers_timeout", WAIT_FOR_WORKERS_S)
        super().__init__(*args, **kwargs)
        self.tasks: list[Any] = []  # concurrent.futures.Future, in the order of the tasks

    def effective_n_jobs(self, n_jobs: int) -> int:
        # Never 1: joblib runs a lone job in the calling process, and a worker must run on
        # the cluster.
        return max(int(super().effective_n_jobs(n_jobs)), 2)

    def submit(self, func: Any, callback: Any = None) -> Any:
        future = super().submit(func, callback)
        self.tasks.append(future)
        return future


def connect(scheduler: str, *, timeout: float = 10.0) -> distributed.Client:
    """A client of the Dask scheduler at ``scheduler``; :class:`WorkersFailed` in one line
    naming the address and the fix when none answers."""
    try:
        return distributed.Client(scheduler, timeout=timeout, set_as_default=False)
    except (OSError, TimeoutError, ValueError) as exc:
        raise WorkersFailed(
            f"no Dask scheduler answers at {scheduler} within {timeout:g} s "
            f"({type(exc).__name__}): start one (dask scheduler) or give its address "
            "with --scheduler tcp://HOST:8786"
        ) from None


def run_on_cluster(
    job: WorkerJob,
    *,
    client: distributed.Client,
    workers: int,
    stop: StopFlag,
    progress: Callable[[], None] | None = None,
    reap: Callable[[], object] | None = None,
    release_first: Sequence[object] = (),
    stop_timeout: float = STOP_TIMEOUT_S,
    say: Callable[[str], None] = say_on_stderr,
) -> PoolResult:
    """:func:`search.sweep.workers.pool.run_pool` on the cluster of ``client``: ``workers``
    tasks, each running one worker process of ``job`` on its cluster machine.

    ``reap`` goes with each task (it must pickle): a task whose worker had to be killed
    re-queues its trial there. After a stop the command waits ``stop_timeout`` seconds
    and a little more for the tasks (:data:`KILL_WAIT_S` after a second signal), then
    leaves them: each stops its worker on its own, as the command's record says.
    """
    for storage in release_first:
        release(storage)
    run = f"c2f-{uuid.uuid4().hex}"
    result = PoolResult()
    roll = Roll(workers, result, say)
    record = _Record(distributed.Variable(run, client=client), stop)
    backend = ClusterBackend(client=client)
    tasks = [
        joblib.delayed(cluster_worker)(job, i, run, reap, stop_timeout) for i in range(workers)
    ]
    was_interruptible, stop.interruptible = stop.interruptible, False
    heard = 0

    def hear() -> None:
        nonlocal heard
        with contextlib.suppress(Exception):  # the scheduler away: heard at the next look
            events = client.get_events(run)
            for _, message in events[heard:]:
                roll.hear(*message)
            heard = len(events)

    try:
        record.start()
        try:
            outputs = joblib.Parallel(
                n_jobs=workers,
                backend=backend,
                pre_dispatch="all",
                batch_size=1,
                return_as="generator",
            )(tasks)
        except TimeoutError:
            raise WorkersFailed(
                f"the Dask cluster at {client.scheduler.address} has no worker after "
                f"{WAIT_FOR_WORKERS_S:g} s: start some (dask worker {client.scheduler.address})"
            ) from None
        deadline: float | None = None
        while not (len(backend.tasks) == workers and all(t.done() for t in backend.tasks)):
            now = time.monotonic()
            if stop and deadline is None:
                stop.acted = True  # the tasks handle a second signal: they kill their workers
                deadline = now + stop_timeout + COMMAND_SILENCE_S
            if deadline is not None and stop.presses > 1:
                deadline = min(deadline, now + KILL_WAIT_S)
            if deadline is not None and now > deadline:
                break
            hear()
            if progress is not None and deadline is None:
                draw_progress(progress, release_first)
            running = [t for t in backend.tasks if not t.done()]
            concurrent.futures.wait(running, timeout=BEAT_S, return_when="FIRST_COMPLETED")
        hear()
        result.codes = _codes(outputs, backend.tasks, workers)
    finally:
        record.stop()
        stop.interruptible = was_interruptible
    for index, task in enumerate(backend.tasks):
        lost = task.done() and task.exception()
        if lost:  # the cluster lost the task itself (its machine, every try): no worker said so
            roll.hear(index, FAILED, f"worker {index} on the cluster: {type(lost).__name__}")
            result.codes[index] = 1
    # a task kills its own worker when told to stop; a worker lost otherwise its task says
    result.errors = roll.errors(
        result.codes, lambda i: f"worker {i} on the cluster", killed=set(result.codes)
    )
    result.signum = stop.signum
    return result


def _codes(outputs: Any, tasks: list[Any], workers: int) -> dict[int, int | None]:
    """Each task's exit code: through joblib when every task ended with one; else (the
    command stopped waiting, or the cluster lost a task) from the tasks that ended, and
    None for the others."""
    if len(tasks) == workers and all(t.done() and t.exception() is None for t in tasks):
        return dict(enumerate(outputs))
    # joblib would wait for every task: leave its generator, without its warning that
    # some tasks ended unseen (those stop on their own, as the record says).
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        outputs.close()
    codes: dict[int, int | None] = dict.fromkeys(range(workers))
    for index, task in enumerate(tasks):
        if task.done() and task.exception() is None:
            batch = task.result()  # joblib's list of the batch's results: one exit code
            codes[index] = batch[0] if isinstance(batch, list) and batch else None
    return codes


class _Record:
    """The command's record on the scheduler, renewed by a thread every :data:`BEAT_S`
    seconds for as long as the run lasts, then deleted."""

    def __init__(self, variable: distributed.Variable, stop: StopFlag) -> None:
        self.variable, self.stop_flag = variable, stop
        self.beats = 0
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="c2f-record", daemon=True)

    def value(self) -> dict[str, int]:
        self.beats += 1
        flag = self.stop_flag
        return {"beat": self.beats, "stop": flag.signum or 0, "presses": flag.presses}

    def start(self) -> None:
        self.variable.set(self.value())  # before any task reads it
        self._thread.start()

    def _run(self) -> None:
        while not self._done.wait(BEAT_S):
            with contextlib.suppress(Exception):  # the scheduler away: the tasks see silence
                self.variable.set(self.value())

    def stop(self) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join()
        with contextlib.suppress(Exception):
            self.variable.delete()


class _CommandWatch:
    """In a task: the command's record read every :data:`BEAT_S` seconds by a thread; a
    stop in it, or its silence, becomes the task's stop."""

    def __init__(self, variable: distributed.Variable, stop: StopFlag) -> None:
        self.variable, self.stop_flag = variable, stop
        self._done = threading.Event()
        self._thread = threading.Thread(target=self._run, name="c2f-command", daemon=True)

    def _read(self, timeout: float) -> dict | None:
        try:
            return self.variable.get(timeout=timeout)
        except Exception:  # noqa: BLE001 - deleted, or the scheduler away: nothing heard
            return None

    def _apply(self, value: dict) -> None:
        if value.get("stop"):
            self.stop_flag.presses = max(self.stop_flag.presses, int(value.get("presses", 1)))
            self.stop_flag.request(int(value["stop"]))

    def __enter__(self) -> bool:
        """Whether the command is there and running (else the task does nothing)."""
        value = self._read(COMMAND_SILENCE_S)
        if value is None:
            return False
        self._apply(value)
        self._last = value
        self._thread.start()
        return not self.stop_flag

    def _run(self) -> None:
        heard = time.monotonic()
        while not self._done.wait(BEAT_S):
            value = self._read(BEAT_S)
            if value is not None and value != self._last:
                self._last, heard = value, time.monotonic()
                self._apply(value)
            if time.monotonic() - heard > COMMAND_SILENCE_S:
                self.stop_flag.request(signal.SIGTERM)  # as the death of a worker's parent
                return

    def __exit__(self, *exc: object) -> None:
        self._done.set()
        if self._thread.is_alive():
            self._thread.join()


def cluster_worker(
    job: WorkerJob,
    index: int,
    run: str,
    reap: Callable[[], object] | None,
    stop_timeout: float,
) -> int | None:
    """A task on a cluster worker: worker ``index`` of the command's ``run``, forked here and
    watched on the command's behalf; its exit code (None if the command was gone or
    stopping before it started)."""
    worker = distributed.get_worker()

    def forward(message: tuple[int, str, str]) -> None:
        worker.log_event(run, list(message))

    try:
        stop = StopFlag(hard_exit=False)
        record = distributed.Variable(run, client=distributed.get_client())
        with _CommandWatch(record, stop) as running:
            if not running:
                return None
            # Dask starts its workers as daemonic processes, which multiprocessing lets
            # have no children; this one's own worker dies with it all the same.
            multiprocessing.current_process().daemon = False
            result = run_forked(
                job,
                workers=1,
                stop=stop,
                reap=reap,
                stop_timeout=stop_timeout,
                say=lambda line: None,  # the command says it, from the forwarded message
                first=index,
                forward=forward,
            )
        return result.codes[index]
    except Exception as exc:  # noqa: BLE001 - one line to the command, not a traceback
        line = f"worker {index} on the cluster failed: {type(exc).__name__}: {exc}"
        forward((index, FAILED, line.splitlines()[0]))
        return 1
