"""The stage driver: one way to open a stage, fill its queue and run workers on it.

Every command that trains a search goes through here: ``coarse`` and ``fine``
(:func:`run_stage`), ``worker --create`` (:func:`create_stage`), ``worker`` joining a
study (:func:`join_stage`), and experiment grids (:func:`drive`, with their own
queue). A stage is opened and recorded (:func:`open_stage`: data checksum, seed
mode, ranges, study file), lost trials are reaped, the queue is topped up to the
target, :func:`drive` runs the worker processes with the progress line until the
queue is empty, and then the replicate rounds queue more seeds of the best
configurations and run them the same way.
"""

from __future__ import annotations

import functools
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna

from model.errors import UsageError
from search.config import space as sp
from search.config.study import StudySpec
from search.sweep import replicates as rep
from search.sweep import stopping, surrogate, user_train
from search.sweep import studies as st
from search.sweep.narrowing import FROM_COARSE
from search.sweep.objective import Objective
from search.sweep.prepared import Prepared
from search.sweep.progress import Progress
from search.sweep.replicates import is_replicate, queue_replicates
from search.sweep.workers import lost
from search.sweep.workers.loop import Sweep, worker_log
from search.sweep.workers.pool import run_workers, threads_per
from search.sweep.workers.signals import checkpoint, current
from search.sweep.workers.storage import check_storage, make_storage, safe_url, storage_of


def open_stage(
    spec: StudySpec,
    stage: str,
    prepared: Prepared,
    *,
    space: dict[str, sp.Range] | None = None,
    attrs: dict[str, Any] | None = None,
    storage: optuna.storages.BaseStorage | None = None,
    create: bool = True,
) -> optuna.Study:
    """The stage's study, with its data checksum, seed mode, ranges (``space``), study
    file and ``attrs`` recorded (or checked against what it recorded)."""
    if stage == "fine":
        st.check_coarse_data(spec, prepared)
    study = st.open_study(spec, stage, storage, create=create)
    st.record_data(study, prepared, spec)
    st.record_seed_mode(study, spec)
    st.check_settings(study, spec, stage)
    if space is not None:
        study.set_user_attr("ranges", sp.to_record(space))
    st.record_files(study, spec)
    study.set_user_attr("data_sizes", prepared.sizes())  # for the report's settings
    recorded = study.user_attrs.get(st.BUDGET)
    if recorded and recorded != spec.optuna.budget:  # legitimate, but its target now means more
        print(
            f"{study.study_name}: its target counted {recorded}, the study file now says "
            f'budget = "{spec.optuna.budget}": it counts {spec.optuna.budget} from here on',
            flush=True,
        )
    study.set_user_attr(st.BUDGET, spec.optuna.budget)  # what its target counts
    for k, v in (attrs or {}).items():
        study.set_user_attr(k, v)
    return study


def reap(spec: StudySpec, stage: str) -> list[int]:
    """Fail and retry the stage's trials whose workers are gone; their numbers."""
    storage = st.storage_for(spec)
    study_id = storage.get_study_id_from_name(st.study_name(spec, stage))
    return lost.reap(storage, study_id, grace_period=spec.optuna.grace_period)


@dataclass(frozen=True)
class StageJob:
    """A worker of a coarse or fine study (picklable: it may cross to a spawned process)."""

    spec: StudySpec
    stage: str
    prepared_path: str
    checksum: str
    ranges: dict[str, sp.Range]
    threads: int
    seed_offset: int = 0
    poll: float = 1.0

    def open(self, worker: int) -> Sweep:
        storage = make_storage(self.spec.storage_url(), log=worker_log)
        study = st.open_study(
            self.spec, self.stage, storage, worker=worker + self.seed_offset, create=False
        )
        prepared = Prepared(Path(self.prepared_path), self.checksum)
        if not prepared.path.is_dir():  # a cluster's machine, without the command's copy
            prepared = st.prepare_for(self.spec, log=worker_log)
        st.record_data(study, prepared)
        objective = Objective(self.spec, self.stage, prepared.open(), self.ranges)
        return Sweep(
            storage,
            study,
            objective,
            heartbeat_interval=self.spec.optuna.heartbeat_interval,
            grace_period=self.spec.optuna.grace_period,
            poll=self.poll,
        )


def drive(
    study: optuna.Study,
    job: Any,
    *,
    workers: int,
    total: int,
    reap: Callable[[], list[int]],
    stop_in: dict[str, sp.Range] | None = None,
    search: bool = False,
) -> None:
    """Run ``workers`` worker processes of ``job`` on the study's queue until it is empty,
    with the progress line counting to ``total``; ``stop_in``: the stage's ranges, to end
    its search by the stop rule (:class:`search.sweep.stopping.Stopper`); ``search``: the
    stage's search trials (not its replicates or race), whose queue a budget in steps
    keeps topped up (:class:`SpendSaved`)."""
    progress: Any = Progress(study, total)
    stopper = None
    if stop_in is not None:
        progress = stopper = stopping.Stopper(study, stop_in, progress)
    if search and st.in_steps(study):
        progress = SpendSaved(study, progress)
    run_workers(
        job,
        workers=workers,
        progress=progress,
        reap=reap,
        release_first=[storage_of(study)],
    )
    said = stopper.summary() if stopper is not None else None
    if said:
        print(said, flush=True)


def work(
    spec: StudySpec,
    stage: str,
    study: optuna.Study,
    space: dict[str, sp.Range],
    prepared: Prepared,
    *,
    workers: int,
    threads: int | None = None,
    seed_offset: int = 0,
    poll: float = 1.0,
    log: Callable[..., None] = print,
) -> None:
    """Run the stage's queue, then its replicate rounds, with ``workers`` processes."""
    job = StageJob(
        spec,
        stage,
        str(prepared.path),
        prepared.checksum,
        space,
        threads or threads_per(workers),
        seed_offset=seed_offset,
        poll=poll,
    )
    run = functools.partial(
        drive, study, job, workers=workers, reap=functools.partial(reap, spec, stage)
    )
    # The progress line counts every finished trial, replicates of an earlier run too.
    live = study.get_trials(deepcopy=False, states=st.FINISHED + st.LIVE)
    target = int(study.user_attrs.get("target") or 0)
    stage_spec = spec.search_stage(stage)
    stop_in = space if stage_spec.stop_below_noise else None
    run(total=target + sum(is_replicate(t) for t in live), stop_in=stop_in, search=True)
    spend_saved_steps(study, lambda n: run(total=n, stop_in=stop_in, search=True), log=log)
    replicate_rounds(spec, stage, study, lambda total: run(total=total), log=log)
    race_rounds(spec, stage, study, space, lambda total: run(total=total), log=log)


def run_stage(
    spec: StudySpec,
    stage: str,
    *,
    target: int,
    space: dict[str, sp.Range],
    enqueue: Sequence[dict[str, Any]] = (),
    warm: Sequence[optuna.trial.FrozenTrial] = (),
    attrs: dict[str, Any] | None = None,
    log: Callable[..., None] = print,
    prepared: Prepared | None = None,
) -> optuna.Study:
    """Create or resume the stage's study, top it up to ``target``, run the workers and
    the replicate rounds and the race (``coarse`` and ``fine``).

    ``prepared``: the stage's data, when the command prepared them already (their
    checksum reads every source file).

    ``warm``: finished trials to put in a new study first (the coarse runs a fine stage
    carries over); they count towards ``target`` on top of it, being no new runs.
    """
    user_train.check(spec)  # a user's function that cannot run is refused before any trial
    check_storage(spec.storage_url())  # a bad storage: refused before anything is written
    prepared = prepared or st.prepare_for(spec)
    study = open_stage(spec, stage, prepared, space=space, attrs=attrs)
    reap(spec, stage)  # trials left RUNNING by a killed run are failed and re-queued first
    if warm:
        carry_over(study, warm, log=log)
    carried = sum(
        FROM_COARSE in t.user_attrs and not is_replicate(t)
        for t in study.get_trials(deepcopy=False)
    )
    target += carried
    stop = spec.search_stage(stage).stop_below_noise
    target = stopping.resumed_target(study, target, enabled=stop, log=log)
    queued = st.top_up(study, target, enqueue=list(enqueue))
    workers = spec.optuna.workers
    log(
        f"study {study.study_name} in {safe_url(spec.storage_url())}: "
        f"{st.target_text(study, target)}, {st.finished(study)[0]} finished, "
        f"{queued} newly queued, {workers} worker(s)",
        flush=True,
    )
    work(spec, stage, study, space, prepared, workers=workers, log=log)
    return study


CARRIED = "carried"  # study attr: how many coarse runs the fine study was given
CARRY_WAIT_S = 30.0
CARRYING = "carrying"  # study attr: the process adding the carried runs (an owner record)
CARRY_CLAIM_S = 3.0  # a creator records itself within this of creating the study


def carry_over(
    study: optuna.Study,
    warm: Sequence[optuna.trial.FrozenTrial],
    *,
    wait: float = CARRY_WAIT_S,
    log: Callable[..., None] = print,
) -> None:
    """Put the ``warm`` trials in a new study, once, whatever the number of commands that
    open it at the same moment: the one that created it records itself (:data:`CARRYING`),
    adds them and records that it did (:data:`CARRIED`); the others wait for that before
    they count or queue anything.

    They stop waiting, and add the runs themselves if the study has none, when the creator
    is known to be gone: it never recorded itself within :data:`CARRY_CLAIM_S` seconds, or
    its process on this machine has exited (a command stopped while it created the
    study); else after ``wait`` seconds (a creator on another machine that went silent).
    """
    if CARRIED in study.user_attrs:
        return
    # A trial of the stage's own comes after the carried ones are in (a study made by an
    # earlier version of this tool, which did not record them): nothing to wait for.
    own = any(FROM_COARSE not in t.user_attrs for t in study.get_trials(deepcopy=False))
    if st.created_here(study):
        study.set_user_attr(CARRYING, lost.owner_record())
    elif not own:
        t0 = time.monotonic()
        said = False
        while time.monotonic() - t0 < wait:
            attrs = study.user_attrs  # read from the storage each time
            if CARRIED in attrs:
                return
            owner = attrs.get(CARRYING)
            if owner is None and time.monotonic() - t0 > CARRY_CLAIM_S:
                break  # its creator stopped before it could record itself
            if owner is not None and lost.owner_gone(owner):
                break  # its creator's process has exited
            if not said:
                log(f"{study.study_name}: another command is creating it; waiting", flush=True)
                said = True
            checkpoint()
            time.sleep(0.2)
    trials = study.get_trials(deepcopy=False)
    present = {t.user_attrs[FROM_COARSE] for t in trials if FROM_COARSE in t.user_attrs}
    if len(present) == len(trials):
        # none of its own yet: those a stopped creator had not added yet go in now
        missing = [t for t in warm if t.user_attrs.get(FROM_COARSE) not in present]
        study.add_trials(missing)
        present |= {t.user_attrs.get(FROM_COARSE) for t in missing}
    study.set_user_attr(CARRIED, len(present))


def create_stage(spec: StudySpec, *, target: int, prepared: Prepared) -> tuple[optuna.Study, int]:
    """Create (or load) the coarse study and queue its target, running nothing (``worker
    --create``); the study and how many trials were queued."""
    user_train.check(spec)
    study = open_stage(spec, "coarse", prepared, space=spec.search)
    if spec.data.n_val is not None:  # workers that join take it from here, as the study file
        study.set_user_attr("n_val", spec.data.n_val)
    reap(spec, "coarse")
    target = stopping.resumed_target(study, target, enabled=spec.coarse.stop_below_noise)
    return study, st.top_up(study, target)


def join_stage(
    spec: StudySpec,
    stage: str,
    study: optuna.Study,
    prepared: Prepared,
    *,
    workers: int,
    threads: int | None,
    poll: float,
) -> None:
    """Run ``workers`` processes on an existing stage's queue from this machine (``worker``
    joining a study), then its replicate rounds when this machine is the last one.

    First the retries a dying process still owed are queued, as a command that tops the
    queue up does: a study that only joining workers run is not left a trial short.
    """
    user_train.check(spec)
    storage = storage_of(study)
    lost.repair_owed_retries(storage, storage.get_study_id_from_name(study.study_name))
    st.record_data(study, prepared)
    st.record_seed_mode(study, spec)
    work(
        spec,
        stage,
        study,
        space_of(spec, stage, study),
        prepared,
        workers=workers,
        threads=threads,
        seed_offset=st.machine_seed(),
        poll=poll,
    )


def space_of(spec: StudySpec, stage: str, study: optuna.Study) -> dict[str, sp.Range]:
    """The ranges a stage searches: the study file's for coarse, the recorded ones for fine."""
    if stage == "coarse":
        if not spec.search:
            raise UsageError(f"{spec.path}: [search] is empty; nothing to search")
        return dict(spec.search)
    recorded = study.user_attrs.get("ranges")
    if not recorded:
        raise UsageError(
            f"study {study.study_name} records no search ranges (user attr 'ranges'); "
            "it must be set up by python -m search.fine"
        )
    return sp.from_record(recorded)


# A safety net only: each round queues what the last one's pruned trials left, and a trial
# counts at least studies.MIN_SHARE, so the rounds shrink geometrically.
MAX_STEP_ROUNDS = 100


def spend_saved_steps(study: optuna.Study, run: Callable[[int], None], *, log=print) -> None:
    """With a budget in steps (``[optuna] budget = "steps"``): queue the trials that the
    steps left by pruned and diverged ones buy (:func:`search.sweep.studies.top_up`) and
    ``run(total)`` the workers, until no whole trial fits in what is left.

    While the workers run, :class:`SpendSaved` keeps the queue topped up; this finishes
    what is left when the queue ran dry. Search trials still waiting or running (another
    machine's round) are run or waited for here too, so every machine's workers take
    part. Not after the stop rule ended the search (it keeps what it has).
    """
    for _ in range(MAX_STEP_ROUNDS):
        if not st.in_steps(study) or stopping.stopped(study):
            return
        trials = study.get_trials(deepcopy=False)
        if not any(t.state in st.LIVE and not is_replicate(t) for t in trials):
            target = int(study.user_attrs.get("target") or 0)
            before = st.counted_toward(study, trials)
            queued = st.top_up(study, target)
            if not queued:
                return
            st.top_up(study, target)  # another machine queued the same round: retire doubles
            log(
                f"budget in steps: {before:.1f} of {target} trials' steps spent (pruned and "
                f"diverged trials count the share they trained); {queued} more "
                f"{'trial' if queued == 1 else 'trials'} queued",
                flush=True,
            )
        live = study.get_trials(deepcopy=False, states=st.FINISHED + st.LIVE)
        run(len(live))
    log(f"budget in steps: stopped after {MAX_STEP_ROUNDS} rounds", flush=True)


class SpendSaved:
    """The progress callback of a stage with a budget in steps: at most every ``every``
    seconds, when no trial waits and a trial was pruned since the last top-up, top the
    queue up to the target (:func:`search.sweep.studies.top_up`), so the steps a pruned
    trial left buy a trial while the other workers still run, not after them. Then the
    wrapped callback.

    Only a pruned trial leaves part of its steps (:func:`search.sweep.studies.spent`) and a
    failed one all of them (it counts for nothing), so between top-ups it asks the storage
    counts, never for every trial."""

    def __init__(self, study: optuna.Study, inner: Any, *, every: float = 2.0) -> None:
        self.study = study
        self.inner = inner
        self.every = every
        self.next = 0.0
        self.pruned = -1  # pruned and failed trials at the last top-up; -1: none done yet

    def __call__(self) -> None:
        now = time.monotonic()
        if now >= self.next:
            self.next = now + self.every
            # Not once a signal or the stop rule stopped the stage: it ends with what it has.
            if not current() and not stopping.stopped(self.study):
                self._top_up()
        self.inner()

    def _top_up(self) -> None:
        storage = storage_of(self.study)
        study_id = storage.get_study_id_from_name(self.study.study_name)
        pruned = storage.get_n_trials(
            study_id, (optuna.trial.TrialState.PRUNED, optuna.trial.TrialState.FAIL)
        )
        if pruned == self.pruned or storage.get_n_trials(
            study_id, optuna.trial.TrialState.WAITING
        ):
            return
        st.top_up(self.study, int(self.study.user_attrs.get("target") or 0))
        self.pruned = pruned

    def __getattr__(self, name: str) -> Any:  # close, summary: the wrapped callback's
        return getattr(self.inner, name)


# One round: a predictable cost of (replicates - 1) x replicate_top runs per stage. The
# ranking puts replicated configurations first, so a lucky single run cannot win anyway.
MAX_REPLICATE_ROUNDS = 1


def replicate_rounds(
    spec: StudySpec, stage: str, study: optuna.Study, run: Callable[[int], None], *, log=print
) -> None:
    """Queue more seeds of the stage's best configurations and ``run(total)`` the workers,
    until the best ones all have them (at most :data:`MAX_REPLICATE_ROUNDS` rounds).

    Only once the stage's search trials are all finished: a machine whose queue
    ran dry while others still train leaves the replicates to the last one.
    ``total`` is the target plus the replicate runs, for the progress line.
    """
    stage_spec = spec.search_stage(stage)
    for _ in range(MAX_REPLICATE_ROUNDS):  # one round per set of search results
        trials = study.get_trials(deepcopy=False)
        if any(t.state in st.LIVE and not is_replicate(t) for t in trials):
            return
        queued = queue_replicates(study, stage_spec.replicates, stage_spec.replicate_top)
        if not queued:
            return
        log(
            f"replicates: the {stage_spec.replicate_top} best configurations get "
            f"{stage_spec.replicates} seeds each; {queued} runs queued",
            flush=True,
        )
        live = study.get_trials(deepcopy=False, states=st.FINISHED + st.LIVE)
        run(int(study.user_attrs.get("target") or 0) + sum(is_replicate(t) for t in live))


def race_rounds(
    spec: StudySpec,
    stage: str,
    study: optuna.Study,
    space: dict[str, sp.Range],
    run: Callable[[int], None],
    *,
    log=print,
) -> None:
    """Race the stage's best configurations (by the model of the landscape) on shared
    extra seeds until the paired comparison separates them or ``race_runs`` are spent
    (:func:`search.sweep.replicates.race_round`), running the workers after each round.

    Only once the stage's search trials are all finished, as the replicate rounds.
    """
    stage_spec = spec.search_stage(stage)
    if stage_spec.race_runs < 1 or stage_spec.race_top < 2:
        return
    while True:
        trials = study.get_trials(deepcopy=False)
        if any(t.state in st.LIVE for t in trials):
            return
        ranked, _ = surrogate.rank(
            rep.study_configurations(study), trials, space, n_val=surrogate.n_val_of(study)
        )
        queued, race = rep.race_round(
            study, [r.config for r in ranked[: stage_spec.race_top]], runs=stage_spec.race_runs
        )
        if not queued:
            log(
                f"race: ended ({race.ended}); {race.spent} runs spent on "
                f"{len(race.contenders)} contenders, {len(race.out)} put out",
                flush=True,
            )
            return
        alive = len(race.contenders) - len(race.out)
        log(f"race: {alive} contenders still in; {queued} runs on shared seeds queued", flush=True)
        live = study.get_trials(deepcopy=False, states=st.FINISHED + st.LIVE)
        run(int(study.user_attrs.get("target") or 0) + sum(is_replicate(t) for t in live))


def run_stage_workers(
    spec: StudySpec,
    stage: str,
    space: dict[str, sp.Range],
    prepared: Prepared,
    *,
    workers: int,
    threads: int | None = None,
    progress: Callable[[], None] | None = None,
) -> None:
    """Run ``workers`` worker processes on the stage's queue until it is empty, nothing
    else (the benchmarks time this)."""
    job = StageJob(
        spec, stage, str(prepared.path), prepared.checksum, space, threads or threads_per(workers)
    )
    run_workers(job, workers=workers, progress=progress, reap=functools.partial(reap, spec, stage))
