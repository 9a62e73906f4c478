"""Creating, filling and running studies; the worker loop shared by every command.

A sweep's target is a number of trials, not "N more": the command that creates
or resumes a study tops its queue up with WAITING trials until finished +
running + waiting trials reach the target. Workers only ever pop WAITING trials
(an atomic state change in the storage), so any number of workers on any
number of machines run exactly the target between them. A trial whose worker
was killed stops sending heartbeats; it is failed and re-queued with the same
parameters by the storage's retry callback, and the next worker runs it.
"""

from __future__ import annotations

import contextlib
import functools
import os
import socket
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, cast

import optuna
from optuna.storages import RDBStorage, fail_stale_trials
from optuna.storages._heartbeat import get_heartbeat_thread
from optuna.trial import TrialState

from search.objective import Objective
from search.prepared import Prepared, prepare
from search.spec import StudySpec
from search.storage import (
    MAX_RETRIES_OF_LOST_TRIAL,
    OWNER,
    make_storage,
    read_only,
    requeue,
    safe_url,
    sqlite_path,
    with_retries,
)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
LIVE = (TrialState.RUNNING, TrialState.WAITING)
STAGES = ("coarse", "fine")

optuna.logging.set_verbosity(optuna.logging.WARNING)
warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)


class DataMismatchError(RuntimeError):
    """A worker's prepared data differs from the data the study was created with."""


def study_name(spec: StudySpec, stage: str) -> str:
    return f"{spec.name}-{stage}"


def storage_for(spec: StudySpec) -> optuna.storages.BaseStorage:
    return make_storage(
        spec.storage_url(),
        heartbeat_interval=spec.optuna.heartbeat_interval,
        grace_period=spec.optuna.grace_period,
    )


def make_sampler(
    spec: StudySpec, worker: int = 0, *, offset: int = 0
) -> optuna.samplers.BaseSampler:
    # Each worker its own seed: with one seed, parallel workers would draw the same values.
    seed = spec.optuna.seed + 1000 * worker + 7919 * offset
    if spec.optuna.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=10)


def make_pruner(spec: StudySpec) -> optuna.pruners.BasePruner:
    """The pruner named in the spec. Warm-up is handled by the objective (in cycles)."""
    name, startup = spec.optuna.pruner, spec.optuna.n_startup_trials
    if name == "median":
        return optuna.pruners.MedianPruner(n_startup_trials=startup)
    if name == "percentile":
        return optuna.pruners.PercentilePruner(33.0, n_startup_trials=startup)
    if name == "successive_halving":
        return optuna.pruners.SuccessiveHalvingPruner()
    if name == "hyperband":
        return optuna.pruners.HyperbandPruner()
    return optuna.pruners.NopPruner()


def open_study(spec: StudySpec, stage: str, storage=None, *, worker: int = 0) -> optuna.Study:
    """Create the stage's study, or load it if it exists (``load_if_exists``)."""
    storage = storage if storage is not None else storage_for(spec)
    study = with_retries(
        lambda: optuna.create_study(
            storage=storage,
            study_name=study_name(spec, stage),
            direction="maximize",
            sampler=make_sampler(spec, worker),
            pruner=make_pruner(spec),
            load_if_exists=True,
        )
    )
    # A resumed sweep must not replay the random draws of the first run: offset the
    # seed by the trials already sampled (still reproducible for one worker).
    n_sampled = sum(bool(t.params) for t in study.get_trials(deepcopy=False))
    if n_sampled:
        study.sampler = make_sampler(spec, worker, offset=n_sampled)
    return study


def counts(study: optuna.Study) -> Counter:
    """Trials per state name."""
    return Counter(t.state.name for t in study.get_trials(deepcopy=False))


def top_up(study: optuna.Study, target: int, *, enqueue: Sequence[dict[str, float]] = ()) -> int:
    """Queue WAITING trials until finished + live trials reach ``target``; returns how many.

    ``enqueue`` gives parameters for the first queued trials (starting points);
    the rest are blank and get their parameters from the sampler when popped.
    """
    trials = study.get_trials(deepcopy=False)
    have = sum(t.state in FINISHED + LIVE for t in trials)
    missing = max(0, target - have)
    already = {tuple(sorted(t.params.items())) for t in trials}
    starts = [p for p in enqueue if tuple(sorted(p.items())) not in already]
    for i in range(missing):
        params = starts[i] if i < len(starts) else {}
        study.enqueue_trial(params, skip_if_exists=bool(params))
    study.set_user_attr("target", target)
    return missing


def record_data(study: optuna.Study, prepared: Prepared) -> None:
    """Record the data checksum on the study, or refuse if it differs."""
    recorded = study.user_attrs.get("data_checksum")
    if recorded is None:
        study.set_user_attr("data_checksum", prepared.checksum)
    elif recorded != prepared.checksum:
        raise DataMismatchError(
            f"study {study.study_name} was created with data {recorded[:16]} but this "
            f"machine prepared {prepared.checksum[:16]}: the source files or the [data] "
            "settings differ; give every machine the same data and study file"
        )


@functools.cache
def _this_machine() -> str:
    """Names this host, boot and PID namespace: a PID means one process only within it.

    ``C2F_MACHINE``, when set, is added to the name: processes that should count
    as different machines although they share all three.
    """
    parts = [socket.gethostname()]
    with contextlib.suppress(OSError):  # not Linux: the host name must do
        parts.append(Path("/proc/sys/kernel/random/boot_id").read_text().strip())
        parts.append(str(os.stat("/proc/self/ns/pid").st_ino))
    if os.environ.get("C2F_MACHINE"):
        parts.append(os.environ["C2F_MACHINE"])
    return "/".join(parts)


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process: alive
        return True
    return True


def _process_start(pid: int) -> str | None:
    """The start time of a process (clock ticks since boot), or None if it is gone.

    With the PID it identifies one process even when the PID is reused later.
    """
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return None
    except OSError:
        return ""
    return stat.rsplit(")", 1)[1].split()[19]


def _owner() -> dict[str, Any]:
    pid = os.getpid()
    return {"machine": _this_machine(), "pid": pid, "start": _process_start(pid) or ""}


def _owner_gone(owner: dict[str, Any]) -> bool:
    """True if ``owner`` (a trial's worker) ran on this machine and has exited.

    The PID must be gone (``kill(pid, 0)``, which works without /proc), or be
    another process now: a different start time, where /proc tells it.
    """
    if owner.get("machine") != _this_machine():
        return False  # another machine's: only its heartbeat can tell
    pid = int(owner["pid"])
    if not _pid_alive(pid):
        return True
    start = _process_start(pid)
    return bool(owner.get("start")) and bool(start) and start != owner["start"]


def _without_heartbeat(storage: optuna.storages.BaseStorage, trial_ids: list[int]) -> set[int]:
    """The trials among ``trial_ids`` that never recorded a heartbeat (RDB storages only)."""
    if not isinstance(storage, RDBStorage) or storage.get_heartbeat_interval() is None:
        return set()
    import sqlalchemy as sa
    from optuna.storages._rdb import models

    beat = models.TrialHeartbeatModel
    with read_only(), storage.engine.connect() as conn:
        rows = conn.execute(sa.select(beat.trial_id).where(beat.trial_id.in_(trial_ids)))
        beating = {row[0] for row in rows}
    return set(trial_ids) - beating


def reap_lost_trials(study: optuna.Study) -> list[int]:
    """Fail the RUNNING trials whose worker is gone and re-queue their parameters.

    Three ways to tell: Optuna's heartbeat check (a trial whose last heartbeat is
    older than the grace period, any machine); a worker process of this machine
    that has exited (also for storages without heartbeats, such as a journal
    file); a trial that has had no heartbeat at all for a grace period of this
    process's own clock (its worker died between taking it and its first
    heartbeat, which Optuna's check skips; no machine's clock is compared with
    another's). Returns the numbers of the trials failed here; another worker may
    fail the same trial at the same moment, but the state change is atomic, so
    each is re-queued once, at most ``MAX_RETRIES_OF_LOST_TRIAL`` times in a row.
    """
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        fail_stale_trials(study)
    storage = study._storage
    running = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
    if not running:
        return []
    backend = getattr(storage, "_backend", storage)  # under Optuna's cache
    grace = None
    if isinstance(backend, RDBStorage) and backend.heartbeat_interval:
        grace = backend.grace_period or 2 * backend.heartbeat_interval
    silent: set[int] = set()
    if grace is not None:
        now = time.monotonic()
        quiet = _without_heartbeat(backend, [t._trial_id for t in running])
        for trial_id in list(_SILENT_SINCE):
            if trial_id not in quiet:
                del _SILENT_SINCE[trial_id]
        for trial_id in quiet:
            if now - _SILENT_SINCE.setdefault(trial_id, now) > grace:
                silent.add(trial_id)
    reaped = []
    for t in running:
        owner = t.system_attrs.get(OWNER)
        if owner and _owner_gone(owner):
            reason = f"its worker (pid {owner['pid']} on this machine) exited mid-trial"
        elif t._trial_id in silent:
            reason = f"no heartbeat in {grace} s: its worker died before the first one"
        else:
            continue
        try:
            # The reason first: a finished trial takes no more attributes.
            storage.set_trial_user_attr(t._trial_id, "reason", f"worker lost: {reason}")
            if not storage.set_trial_state_values(t._trial_id, state=TrialState.FAIL):
                continue
        except optuna.exceptions.UpdateFinishedTrialError:
            continue  # another worker got there first
        _SILENT_SINCE.pop(t._trial_id, None)
        requeue(study, t, limit=MAX_RETRIES_OF_LOST_TRIAL)
        reaped.append(t.number)
    return reaped


# When this process first saw each RUNNING trial without any heartbeat (monotonic s).
_SILENT_SINCE: dict[int, float] = {}


def _target_reached(study: optuna.Study) -> bool:
    """Finished + running trials already make the study's recorded target.

    The queue may hold more WAITING trials than that when a command ran again
    with a lower ``--trials``; they stay queued for a later, larger target.
    """
    target = study.user_attrs.get("target")
    if target is None:
        return False
    c = counts(study)
    return c["COMPLETE"] + c["PRUNED"] + c["RUNNING"] >= int(target)


def run_trials(
    study: optuna.Study,
    objective: Callable[[optuna.Trial], float],
    *,
    poll: float = 1.0,
    max_trials: int | None = None,
    on_trial_end: Callable[[], None] | None = None,
) -> int:
    """Pop WAITING trials and run them until none is waiting or running; returns how many ran.

    While other workers still run trials and none is waiting, wait: a killed
    worker's trial is re-queued once its heartbeat is stale. Ctrl-C fails the
    current trial and re-queues its parameters, so nothing is lost.
    """
    storage = study._storage
    owner = _owner()
    ran = idle = 0
    while max_trials is None or ran < max_trials:
        reap_lost_trials(study)
        # At the target, take nothing more, but wait for the running trials: one of
        # them may belong to a dead worker and come back to the queue.
        trial_id = None if _target_reached(study) else study._pop_waiting_trial_id()
        if trial_id is None:
            live = study.get_trials(deepcopy=False, states=(TrialState.RUNNING,))
            if not live:
                return ran
            # The others' last trials usually end within a second: look again soon,
            # then every ``poll`` seconds (a killed worker's trial comes back only
            # after its heartbeat's grace period).
            time.sleep(min(poll, 0.05 * 1.5 ** min(idle, 20)))
            idle += 1
            continue
        idle = 0
        # From here on the trial is RUNNING and ours: Ctrl-C anywhere until it is
        # told (not only inside the objective) re-queues it.
        try:
            storage.set_trial_system_attr(trial_id, OWNER, owner)
            trial = optuna.Trial(study, trial_id)
            state, value = None, None
            with get_heartbeat_thread(trial_id, storage):
                try:
                    value = objective(trial)
                except optuna.TrialPruned:
                    state = TrialState.PRUNED
                except Exception as exc:  # noqa: BLE001 - a failed trial must not stop the sweep
                    trial.set_user_attr("reason", f"{type(exc).__name__}: {exc}")
                    state = TrialState.FAIL
            # partial, not a lambda with defaults: mypy cannot infer such a lambda's type.
            with_retries(partial(study.tell, trial, value, state=state, skip_if_finished=True))
        except KeyboardInterrupt:
            _requeue(study, trial_id, "interrupted (Ctrl-C)")
            raise
        ran += 1
        if on_trial_end is not None:
            on_trial_end()
    return ran


def _requeue(study: optuna.Study, trial_id: int, reason: str) -> None:
    """Queue the parameters of a trial this worker was running again, then fail it.

    In that order: a worker that looks between the two steps must not find the
    queue empty and nothing running, and leave. Nothing to do if the trial
    already finished (the interrupt came after ``tell``).
    """
    storage = study._storage
    frozen = storage.get_trial(trial_id)
    if frozen.state.is_finished():
        return
    requeue(study, frozen)
    # Only this worker finishes its own running trial: no one else can have told it.
    with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
        storage.set_trial_user_attr(trial_id, "reason", reason)
        storage.set_trial_state_values(trial_id, state=TrialState.FAIL)


@dataclass(frozen=True)
class WorkerJob:
    """What one worker process needs (picklable: it crosses to joblib processes)."""

    spec: StudySpec
    stage: str
    prepared_path: str
    checksum: str
    ranges: dict[str, tuple[float, float]]
    threads: int
    worker: int = 0


def worker_main(job: WorkerJob) -> int:
    """Entry of a worker process: limit BLAS threads, open the data mmap'd, run trials."""
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=job.threads):
        splits = Prepared(Path(job.prepared_path), job.checksum).open()
        study = open_study(job.spec, job.stage, worker=job.worker)
        record_data(study, Prepared(Path(job.prepared_path), job.checksum))
        objective = Objective(job.spec, job.stage, splits, job.ranges)
        return run_trials(study, objective)


def prepare_for(spec: StudySpec, *, log=print) -> Prepared:
    """The study's prepared data, cached under ``cache/`` beside the study file, or
    under ``$C2F_CACHE_DIR`` (the containers' shared volume) when that is set."""
    root = Path(os.environ["C2F_CACHE_DIR"]) if os.environ.get("C2F_CACHE_DIR") else None
    return prepare(
        spec.data,
        spec.data_dir(),
        root or spec.base_dir / "cache",
        seed=spec.optuna.seed,
        log=log,
    )


def run_workers(
    spec: StudySpec,
    stage: str,
    ranges: dict[str, tuple[float, float]],
    prepared: Prepared,
    *,
    workers: int,
    progress: Callable[[], None] | None = None,
) -> None:
    """Run ``workers`` processes (joblib/loky) on the study until its queue is empty.

    Each worker gets cores // workers BLAS threads (at least one), so workers x
    threads never oversubscribes the machine. One worker runs in this process
    (it starts at once; the others take a moment to start), the rest in processes.
    """
    cores = os.cpu_count() or 1
    threads = max(1, cores // workers)
    jobs = [
        WorkerJob(spec, stage, str(prepared.path), prepared.checksum, ranges, threads, i)
        for i in range(workers)
    ]
    import threading

    from joblib.externals.loky import get_reusable_executor
    from threadpoolctl import threadpool_limits

    done = threading.Event()
    errors: list[BaseException] = []

    def run_others() -> None:
        try:
            # loky's executor, not Parallel: Parallel(n_jobs=1) would run in this process.
            executor = get_reusable_executor(max_workers=workers - 1)
            for future in [executor.submit(worker_main, j) for j in jobs[1:]]:
                future.result()
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)
        finally:
            done.set()

    if workers > 1:
        # The other workers start in processes while this one starts training at once.
        threading.Thread(target=run_others, daemon=True).start()
    with threadpool_limits(limits=threads):
        study = open_study(spec, stage, worker=0)
        objective = Objective(spec, stage, prepared.open(), ranges)
        run_trials(study, objective, on_trial_end=progress)
    if workers > 1:
        # This worker found the queue empty; the others finish their last trials.
        while not done.wait(1.0):
            if progress is not None:
                progress()
        if errors:
            raise errors[0]


class Progress:
    """A one-line progress report: trials finished of the target, best so far."""

    def __init__(self, study: optuna.Study, target: int, *, stream=None) -> None:
        self.study = study
        self.target = target
        self.stream = stream if stream is not None else sys.stdout
        self.last = ""
        self.tty = getattr(self.stream, "isatty", lambda: False)()

    def __call__(self) -> None:
        c = counts(self.study)
        done = c["COMPLETE"] + c["PRUNED"]
        best = "-"
        if c["COMPLETE"]:
            best = f"{self.study.best_value:.4f}"
        width = 30
        filled = int(width * min(done, self.target) / max(self.target, 1))
        line = (
            f"[{'#' * filled}{'.' * (width - filled)}] {done}/{self.target} finished "
            f"({c['COMPLETE']} complete, {c['PRUNED']} pruned, {c['FAIL']} failed, "
            f"{c['RUNNING']} running)  best val acc {best}"
        )
        if line == self.last:
            return
        self.last = line
        if self.tty:
            self.stream.write("\r" + line)
        else:
            self.stream.write(line + "\n")
        self.stream.flush()

    def close(self) -> None:
        if self.tty and self.last:
            self.stream.write("\n")
            self.stream.flush()


def top_trials(study: optuna.Study, k: int) -> list[optuna.trial.FrozenTrial]:
    done = [t for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]
    # A COMPLETE trial of a single-objective study always has a value.
    return sorted(done, key=lambda t: cast(float, t.value), reverse=True)[:k]


def format_table(trials: list[optuna.trial.FrozenTrial], names: list[str]) -> str:
    header = f"{'trial':>5}  {'val acc':>7}  " + "  ".join(f"{n:>10}" for n in names)
    header += f"  {'epochs':>6}  {'time s':>6}"
    lines = [header]
    for t in trials:
        cells = "  ".join(f"{t.params.get(n, float('nan')):10.3e}" for n in names)
        lines.append(
            f"{t.number:>5}  {t.value:7.4f}  {cells}  "
            f"{t.user_attrs.get('epochs_run', 0):6.2f}  {t.user_attrs.get('wall_time', 0):6.1f}"
        )
    return "\n".join(lines)


def dashboard_hint(spec: StudySpec) -> str:
    url = spec.storage_url()
    if url.startswith("journal:///"):
        # optuna-dashboard opens a journal file by its path, not by a URL.
        return f"optuna-dashboard {url[len('journal:///') :]}"
    return f"optuna-dashboard {safe_url(url)}"


def load_existing(spec: StudySpec, stage: str) -> optuna.Study | None:
    """The stage's study if it exists in the storage, else None.

    No study is created (and no SQLite file); a PostgreSQL database gets Optuna's
    empty tables, a journal storage its empty file, as any use of them would.
    """
    db = sqlite_path(spec.storage_url())
    if db is not None and not db.is_file():
        return None
    storage = storage_for(spec)
    names = {s.study_name for s in with_retries(storage.get_all_studies)}
    if study_name(spec, stage) not in names:
        return None
    return open_study(spec, stage, storage)


def describe_ranges(ranges: dict[str, tuple[float, float]]) -> dict[str, Any]:
    return {k: [float(lo), float(hi)] for k, (lo, hi) in ranges.items()}
