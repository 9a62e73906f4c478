"""The studies of a study file: opening them, their queue's target, and the job of a stage.

A sweep's target is a number of trials, not "N more": the command that creates
or resumes a study tops its queue up with WAITING trials until finished +
running + waiting trials make the target (:func:`top_up`), and trims the
queue when the target was lowered. Workers only ever take WAITING trials (an
atomic state change in the storage), so any number of workers on any number
of machines run exactly the target between them.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
import os
import socket
import warnings
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import optuna
from optuna.trial import FrozenTrial, TrialState

from model.errors import UsageError
from search.config import space as sp
from search.config.study import StudyDefinitionError, StudySpec, unread_fields
from search.sweep.prepared import Prepared, prepare
from search.sweep.replicates import is_replicate, missing_replicates, race_pending
from search.sweep.workers import bookkeeping, lost
from search.sweep.workers.signals import checkpoint
from search.sweep.workers.storage import (
    ResilientStorage,
    enqueue_blank,
    make_storage,
    sqlite_path,
    storage_of,
    trial_id,
    with_retries,
)

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
LIVE = (TrialState.RUNNING, TrialState.WAITING)
STAGES = ("coarse", "fine")
# The name of a trial's value in the dashboard (instead of "Objective 0").
METRIC = "val_acc"


class DataMismatchError(RuntimeError):
    """A worker's prepared data differs from the data the study was created with."""


def study_name(spec: StudySpec, stage: str) -> str:
    return f"{spec.name}-{stage}"


def storage_for(spec: StudySpec) -> ResilientStorage:
    return make_storage(spec.storage_url())


def make_sampler(spec: StudySpec, seed_offset: int = 0) -> optuna.samplers.BaseSampler:
    """The spec's sampler, its seed moved by ``seed_offset`` (one per worker and per resume:
    with one seed, parallel workers would draw the same values)."""
    seed = spec.optuna.seed + seed_offset
    if spec.optuna.sampler == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed, n_startup_trials=10)


class SeededDraws(optuna.samplers.BaseSampler):
    """The spec's sampler as one seeded stream while this process takes the study's trials
    one after another, as a lone command does (its draws reproducible); seeded afresh from
    each trial's number once another process took a trial in between.

    Processes that open a study at the same moment (two commands started together, a
    command's workers) see the same trials and so the same seed: one stream each would
    draw the same values for different trials. A trial's number is its own (the storage
    gives it), so draws seeded from it differ from trial to trial, in any process.
    """

    def __init__(self, spec: StudySpec, seed_offset: int, next_number: int) -> None:
        self._spec = spec
        self._inner = make_sampler(spec, seed_offset)
        self._next = next_number  # the number this process takes next when alone
        self._alone = True
        self._number: int | None = None  # the trial the inner sampler draws for

    def _for(self, trial: FrozenTrial, study: optuna.Study) -> optuna.samplers.BaseSampler:
        if trial.number != self._number:
            self._number = trial.number
            self._alone = self._alone and (
                trial.number == self._next or self._skipped(study, self._next, trial.number)
            )
            self._next = trial.number + 1
            if not self._alone:
                self._inner = make_sampler(self._spec, PER_TRIAL_OFFSET + 7919 * trial.number)
        return self._inner

    @staticmethod
    def _skipped(study: optuna.Study, first: int, last: int) -> bool:
        """Whether the trials numbered ``first`` to ``last - 1`` were never run by anyone:
        retired from the queue (a lowered target, a double), not taken by a process."""
        between = [t for t in study.get_trials(deepcopy=False) if first <= t.number < last]
        return len(between) == last - first and all(
            t.state == TrialState.FAIL
            and bookkeeping.kind(t) is bookkeeping.Kind.RETIRED
            and not t.params
            for t in between
        )

    def infer_relative_search_space(
        self, study: optuna.Study, trial: FrozenTrial
    ) -> dict[str, optuna.distributions.BaseDistribution]:
        return self._for(trial, study).infer_relative_search_space(study, trial)

    def sample_relative(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        search_space: dict[str, optuna.distributions.BaseDistribution],
    ) -> dict[str, Any]:
        return self._for(trial, study).sample_relative(study, trial, search_space)

    def sample_independent(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        param_name: str,
        param_distribution: optuna.distributions.BaseDistribution,
    ) -> Any:
        return self._for(trial, study).sample_independent(
            study, trial, param_name, param_distribution
        )

    def before_trial(self, study: optuna.Study, trial: FrozenTrial) -> None:
        self._for(trial, study).before_trial(study, trial)

    def after_trial(
        self,
        study: optuna.Study,
        trial: FrozenTrial,
        state: TrialState,
        values: Sequence[float] | None,
    ) -> None:
        self._for(trial, study).after_trial(study, trial, state, values)

    def reseed_rng(self) -> None:
        self._inner.reseed_rng()


# Apart from the offsets of the streams (1000 a worker, 7919 a trial sampled before).
PER_TRIAL_OFFSET = 500_009


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


def open_study(
    spec: StudySpec,
    stage: str,
    storage: optuna.storages.BaseStorage | None = None,
    *,
    worker: int = 0,
    create: bool = True,
) -> optuna.Study:
    """The stage's study, created if ``create`` and missing (``load_if_exists``).

    The sampler's seed is moved by the worker's number and by the trials already
    sampled, so a resumed sweep does not replay the draws of the first run
    (still reproducible for one worker); processes taking trials at once draw
    from each trial's own number (:class:`SeededDraws`).
    """
    storage = storage if storage is not None else storage_for(spec)
    name = study_name(spec, stage)
    created = create and with_retries(lambda: _create(storage, name))
    study = with_retries(
        lambda: optuna.load_study(study_name=name, storage=storage, pruner=make_pruner(spec))
    )
    setattr(study, _CREATED, created)
    if create and study.metric_names != [METRIC]:
        with warnings.catch_warnings():  # experimental since Optuna 3.2, and in use
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            study.set_metric_names([METRIC])
    n_sampled = sum(bool(t.params) for t in study.get_trials(deepcopy=False))
    # Alone, it takes trial n_sampled next (or the next one after trials retired unrun).
    # Not "the first one waiting": a process that opens after another took that one, but
    # before it drew, would have the same seed and take the next as if alone.
    study.sampler = SeededDraws(spec, 1000 * worker + 7919 * n_sampled, n_sampled)
    return study


_CREATED = "_c2f_created_here"


def _create(storage: optuna.storages.BaseStorage, name: str) -> bool:
    """Create the study ``name``; False when it exists (another process made it first:
    of processes opening a new study at once, exactly one gets True)."""
    try:
        storage.create_new_study([optuna.study.StudyDirection.MAXIMIZE], name)
    except optuna.exceptions.DuplicatedStudyError:
        return False
    return True


def created_here(study: optuna.Study) -> bool:
    """Whether this process created ``study`` when it opened it (:func:`open_study`)."""
    return bool(getattr(study, _CREATED, False))


def counts(study: optuna.Study) -> Counter:
    """Trials per state name; ``FAIL`` counts real failures only.

    The sweep's own FAILs are counted apart (:mod:`search.sweep.workers.bookkeeping`):
    ``REQUEUED`` (stopped by an interrupt or a lost worker, a copy queued) and
    ``RETIRED`` (a duplicate replicate, a trial beyond a lowered target).
    """
    return Counter(bookkeeping.state_name(t) for t in study.get_trials(deepcopy=False))


def finished(study: optuna.Study) -> tuple[int, int]:
    """(search trials finished, replicate runs finished): a target counts the first only."""
    done = study.get_trials(deepcopy=False, states=FINISHED)
    replicates = sum(is_replicate(t) for t in done)
    return len(done) - replicates, replicates


def finished_text(study: optuna.Study, target: int | None) -> str:
    """``"500 finished of target 500 (+ 6 replicate runs; 0 failed, 11 re-queued)"``: the
    search trials a target counts (with a budget in steps, the steps they took too), the
    replicate runs on top, the real failures and the sweep's own FAILs (:func:`counts`)."""
    c = counts(study)
    search, replicates = finished(study)
    more = f"+ {replicates} replicate runs; " if replicates else ""
    states = ", ".join([f"{c['FAIL']} failed", *bookkeeping.shown(c)])
    if in_steps(study):  # "38 finished, 35.2 trials' steps, of target 40"
        steps = steps_finished(study.get_trials(deepcopy=False, states=FINISHED))
        return f"{search} finished, {steps:.1f} trials' steps, of target {target} ({more}{states})"
    return f"{search} finished of target {target} ({more}{states})"


BUDGET = "budget"  # study attr: what the target counts, trials or steps (OptunaSpec.budget)


# The least a trial counts towards a budget in steps: a search whose every trial diverges at
# once runs at most 1 / MIN_SHARE times its target in trials, whose own costs (the sampler,
# the storage) are real even when their training steps are not.
MIN_SHARE = 0.25


def spent(trial: FrozenTrial) -> float:
    """The share of its planned training steps a trial took: the epochs a pruned or
    diverged trial ran of those planned (at least :data:`MIN_SHARE`), 1 for any other (a
    complete, running or waiting one, or one that recorded no epochs)."""
    planned = float(trial.user_attrs.get("epochs_planned") or 0.0)
    if trial.state != TrialState.PRUNED or planned <= 0 or "epochs_run" not in trial.user_attrs:
        return 1.0
    return min(1.0, max(MIN_SHARE, float(trial.user_attrs["epochs_run"]) / planned))


def steps_finished(trials: Sequence[FrozenTrial]) -> float:
    """The steps the finished search trials among ``trials`` took, in whole trials' worth."""
    return sum(spent(t) for t in trials if t.state in FINISHED and not is_replicate(t))


def in_steps(study: optuna.Study) -> bool:
    """Whether the study's target counts training steps (``[optuna] budget = "steps"``)."""
    return study.user_attrs.get(BUDGET) == "steps"


def target_text(study: optuna.Study, target: int) -> str:
    """``"target 40 trials"``, and what it counts when that is steps."""
    steps = " in steps (a pruned or diverged trial counts the share it trained)"
    return f"target {target} trials{steps if in_steps(study) else ''}"


def counted_toward(study: optuna.Study, trials: Sequence[FrozenTrial] | None = None) -> float:
    """What the study's finished, running and waiting search trials count towards its
    target: trials, or with a budget in steps their shares (:func:`spent`)."""
    if trials is None:
        trials = study.get_trials(deepcopy=False)
    counted = [t for t in trials if t.state in FINISHED + LIVE and not is_replicate(t)]
    return sum(map(spent, counted)) if in_steps(study) else float(len(counted))


def top_up(study: optuna.Study, target: int, *, enqueue: Sequence[dict[str, float]] = ()) -> int:
    """Make finished + running + waiting trials equal ``target``; how many were queued.

    With a budget in steps (:func:`in_steps`) a pruned or diverged trial counts the share
    of its steps it took (:func:`spent`), so the steps it left buy new trials, as many
    as fit in whole: the target is never passed. A search the stop rule ended gets none.

    First the retries that a dying process still owed are queued
    (:func:`search.sweep.workers.lost.repair_owed_retries`). ``enqueue`` gives parameters
    for the first new trials (starting points); the rest are blank and get
    their parameters from the sampler when taken. Over the target (a command
    run again with a lower ``--trials``), the newest WAITING trials are failed
    with the reason; a later, larger target queues new ones.
    """
    storage = storage_of(study)
    study_id = storage.get_study_id_from_name(study.study_name)
    lost.repair_owed_retries(storage, study_id)
    trials = study.get_trials(deepcopy=False)
    # Replicates of the best configurations come on top of the target.
    counted = [t for t in trials if t.state in FINISHED + LIVE and not is_replicate(t)]
    short = target - counted_toward(study, trials)
    if short < -1e-9:
        _trim(storage, counted, math.ceil(-short - 1e-9), target)
    missing = math.floor(short + 1e-9)  # whole trials that fit
    if in_steps(study) and study.user_attrs.get("stopped"):
        # The stop rule ended the search (search.sweep.stopping.STOPPED): it keeps what it
        # has, though a trial running when it fired was pruned since and left steps.
        missing = min(missing, 0)
    already = {tuple(sorted(t.params.items())) for t in trials}
    starts = [p for p in enqueue if tuple(sorted(p.items())) not in already][: max(0, missing)]
    for params in starts:
        checkpoint()  # Ctrl-C while a large target is queued: stop here, any prefix will do
        study.enqueue_trial(params, skip_if_exists=True)
    enqueue_blank(storage, study_id, max(0, missing) - len(starts), between=checkpoint)
    if enqueue:  # starting points: another command may have queued the same at once
        _unfix_double_starts(storage, study)
    study.set_user_attr("target", target)
    return max(0, missing)


def _unfix_double_starts(storage: optuna.storages.BaseStorage, study: optuna.Study) -> None:
    """Two commands that top a new study up at once both queue its starting points: the
    later copy of each, while it waits, becomes a blank trial (the sampler draws it), so
    the target's count stays and no configuration runs twice. Any process doing the
    same picks the same copies."""
    seen: set[tuple] = set()
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        params = t.params or t.system_attrs.get("fixed_params") or {}
        if not params or is_replicate(t) or t.state == TrialState.FAIL:
            continue
        key = tuple(sorted(params.items()))
        if key in seen and t.state == TrialState.WAITING and t.system_attrs.get("fixed_params"):
            storage.set_trial_system_attr(trial_id(t), "fixed_params", {})
        seen.add(key)


def _trim(
    storage: optuna.storages.BaseStorage, counted: list[FrozenTrial], excess: int, target: int
) -> None:
    """Fail ``excess`` WAITING trials, the last in trial order (blank ones first), as
    retired (:mod:`search.sweep.workers.bookkeeping`): those beyond ``target``.

    By trial number, so two commands trimming at once fail the same trials.
    """
    waiting = sorted(
        (t for t in counted if t.state == TrialState.WAITING),
        key=lambda t: (not t.system_attrs.get("fixed_params"), t.number),
    )
    for t in reversed(waiting[-excess:] if excess <= len(waiting) else waiting):
        bookkeeping.retire(storage, trial_id(t), bookkeeping.over_target(target))


def record_seed_mode(study: optuna.Study, spec: StudySpec) -> None:
    """Record how the study seeds its trials, or refuse to mix two ways in one study."""
    recorded = study.user_attrs.get("seed_mode")
    mode = spec.optuna.seed_mode
    if recorded is None:
        if any(t.state in FINISHED for t in study.get_trials(deepcopy=False)):
            recorded = "per_trial"  # a study begun before seed modes existed
            study.set_user_attr("seed_mode", recorded)
        else:
            study.set_user_attr("seed_mode", mode)
            return
    if recorded != mode:
        raise UsageError(
            f"{spec.path}: [optuna.seed_mode] study {study.study_name} was run with "
            f'seed_mode = "{recorded}", the study file now says "{mode}"; trials seeded two '
            f'ways cannot be compared: set seed_mode = "{recorded}" to resume it, or use '
            "another --storage for a new study"
        )


def record_data(study: optuna.Study, prepared: Prepared, spec: StudySpec | None = None) -> None:
    """Record the data checksum on the study, or refuse if it differs (naming the
    ``--n-val`` it ran with, when ``spec``'s is another)."""
    recorded = study.user_attrs.get("data_checksum")
    if recorded is None:
        study.set_user_attr("data_checksum", prepared.checksum)
    elif recorded != prepared.checksum:
        n_val = study.user_attrs.get("n_val")
        fix = (
            f"it ran with --n-val {n_val}: give this command the same"
            if spec is not None and n_val is not None and n_val != spec.data.n_val
            else "give every machine the same data and study file"
        )
        raise DataMismatchError(
            f"study {study.study_name} was created with data {recorded[:16]} but this "
            f"machine prepared {prepared.checksum[:16]}: the source files or the [data] "
            f"settings differ; {fix}"
        )


def check_coarse_data(spec: StudySpec, prepared: Prepared) -> None:
    """Refuse (:class:`DataMismatchError`) a fine stage whose data are not the data its
    coarse runs trained on (another ``--n-val`` or ``--data-dir``, an edited [data]): it
    narrows around those runs and carries them over, so they would be ranked beside runs
    scored on another validation set."""
    coarse = load_existing(spec, "coarse")
    recorded = coarse.user_attrs.get("data_checksum") if coarse is not None else None
    if coarse is None or recorded is None or recorded == prepared.checksum:
        return
    sizes, now = coarse.user_attrs.get("data_sizes") or {}, prepared.sizes()
    was = f" ({sizes['train']} train / {sizes['val']} val)" if "val" in sizes else ""
    n_val = coarse.user_attrs.get("n_val")
    flag = f" (--n-val {n_val})" if n_val is not None and n_val != spec.data.n_val else ""
    raise DataMismatchError(
        f"the runs of {coarse.study_name} trained on other data{was} than this command "
        f"prepared ({now['train']} train / {now['val']} val), and the fine stage narrows "
        "around them and carries them over: run it with the coarse stage's [data] and "
        f"flags{flag}, or give the study a new `name` to start another"
    )


def prepare_for(spec: StudySpec, *, log=print, cache_dir: str | None = None) -> Prepared:
    """The study's prepared data, cached under ``cache/`` beside the study file, or
    under ``cache_dir`` / ``$C2F_CACHE_DIR`` (the containers' shared volume).

    Data that cannot be loaded as the study file asks (a missing file, an n_val the
    dataset cannot hold) is a StudyDefinitionError naming the study file.
    """
    root = cache_dir or os.environ.get("C2F_CACHE_DIR") or None
    try:
        prepared = prepare(
            spec.data,
            spec.data_dir(),
            Path(root) if root else spec.base_dir / "cache",
            seed=spec.optuna.seed,
            log=log,
        )
    except ValueError as exc:  # DataError too: a missing or broken data file
        if isinstance(exc, StudyDefinitionError):
            raise
        # The loader knows the size and the files, the study file the field.
        field_name = "data.n_val" if getattr(exc, "field", None) == "n_val" else "data"
        raise StudyDefinitionError(spec.path or "<study>", field_name, str(exc)) from None
    check_fits(spec, prepared.sizes())
    return prepared


def holdout_size(spec: StudySpec, n_val: int) -> int:
    """``[final] holdout`` in images, checked against the validation set's size."""
    h = spec.final.holdout
    n = round(h * n_val) if isinstance(h, float) else h
    if isinstance(h, float) and n < 1:
        n = 1
    if not 0 <= n < n_val:
        raise StudyDefinitionError(
            spec.path,
            "final.holdout",
            f"a holdout of {n} validation images does not fit the {n_val} there are; "
            f"give at most {n_val - 1} (or a fraction such as 0.2)",
        )
    return n


def check_fits(spec: StudySpec, sizes: dict[str, int]) -> None:
    """Refuse, before any trial, settings the data cannot hold (a batch larger than the
    training set, a final holdout larger than the validation set), naming the field."""
    holdout = holdout_size(spec, sizes["val"])
    n_final = sizes["train"] + sizes["val"] - holdout
    where = f" after n_val = {spec.data.n_val!r}" if spec.data.n_val is not None else ""
    for stage, n_train, section in (
        ("coarse", sizes["train"], "training"),
        ("fine", sizes["train"], "fine.training"),
        ("final", n_final, "final.training"),
    ):
        # The largest batch the space can draw is the one that must fit.
        point = {k: r.midpoint() for k, r in spec.search.items()}
        if "batch_size" in spec.search:
            point["batch_size"] = max(spec.search["batch_size"].corners())
        config = spec.train_config(stage, point)
        if config.batch_size > n_train:
            searched = "batch_size" in spec.search and "batch_size" not in _stage_values(
                spec, stage
            )
            field_name = (
                "search"
                if searched
                else section
                if "batch_size" in _stage_values(spec, stage)
                else "training"
            )
            # a smaller n_val helps only where it can make the training set large enough
            room = sizes["train"] + sizes["val"] - 1 if stage != "final" else n_final
            fix = f"use a smaller batch_size{' range' if searched else ''}" + (
                f" or a smaller [data] n_val (at most {room + 1 - config.batch_size} images)"
                if config.batch_size <= room and stage != "final"
                else f" (the data hold {sizes['train'] + sizes['val']} images for "
                "training and validation)"
            )
            raise StudyDefinitionError(
                spec.path,
                f"{field_name}.batch_size",
                f"batch_size = {config.batch_size} is larger than the "
                f"{'final ' if stage == 'final' else ''}training set "
                f"({n_train} images{where if stage != 'final' else ''}); {fix}",
            )


def _stage_values(spec: StudySpec, stage: str) -> dict[str, Any]:
    return {"fine": spec.fine.training, "final": spec.final.training}.get(stage, {})


def record_files(study: optuna.Study, spec: StudySpec) -> None:
    """Record the study file and its data on the study (user attrs ``study_file``, as
    given on the command line, which lets ``search.worker`` join without ``--study``;
    ``data_dir``, relative to the study file, and ``n_val``, which ``status`` puts in
    the command that resumes the study when they are not the study file's own)."""
    if spec.path:
        study.set_user_attr("study_file", spec.path)
    data_dir = spec.data_dir()
    if data_dir:
        study.set_user_attr("data_dir", os.path.relpath(data_dir, spec.base_dir))
    if spec.data.n_val is not None:
        study.set_user_attr("n_val", spec.data.n_val)


SETTINGS = "settings"  # study attr: the fixed settings its trials trained with
# Settings that change what is measured along the way, not what a trial trains to.
MEASURING = ("seed", "train_metrics", "train_eval_size")


def settings_of(
    spec: StudySpec,
    stage: str,
    varied: Sequence[str] = (),
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """What every trial of the stage trains with but its searched parameters (and those
    ``varied`` by an experiment's grid), as JSON text per key: the stage's training
    settings in effect (defaults included, so a default written out or left out is the
    same), the network's, the user's function and its own keys, and ``extra`` (an
    experiment's own). A trial's result means nothing beside another's trained otherwise."""
    left_out = set(spec.search) | set(varied) | set(MEASURING)

    def fixed(values: dict[str, Any]) -> dict[str, str]:
        # JSON text: NaN equals NaN, and a date or a tuple is kept as it prints
        return {
            k: json.dumps(v, sort_keys=True, default=str)
            for k, v in sorted(values.items())
            if k not in left_out
        }

    unread = unread_fields(spec, stage, varied)
    training = {
        k: v for k, v in dataclasses.asdict(spec.train_config(stage)).items() if k not in unread
    }
    network = {
        f.name: getattr(spec.network, f.name)
        for f in dataclasses.fields(spec.network)
        if f.name not in unread
    }
    return {
        # how each searched parameter is drawn, as far as Optuna cannot mix two in a study
        # (its kind, log or not, the choices; the bounds may change)
        "search": {
            name: json.dumps(_drawn_as(r), sort_keys=True, default=str)
            for name, r in sorted(spec.search.items())
        },
        "training": fixed(training),
        "network": {} if spec.model.train else fixed(network),
        "model": fixed({"train": spec.model.train, **spec.own_params(stage)}),
        **({"experiment": fixed(extra)} if extra else {}),
    }


def _drawn_as(r: sp.Range) -> Any:
    """What of a range Optuna keeps alike over a study's trials: the choices of a choice,
    else the kind and whether it is log."""
    if r.kind == "choice":
        return {"choice": [list(c) if isinstance(c, tuple) else c for c in r.choices]}
    return f"{r.kind}{', log' if r.log else ''}"


def check_settings(
    study: optuna.Study,
    spec: StudySpec,
    stage: str,
    *,
    varied: Sequence[str] = (),
    extra: dict[str, Any] | None = None,
) -> None:
    """Record the stage's fixed settings on the study; refuse a study file (or flags) whose
    settings differ from those its trials ran with
    (:class:`~search.config.study.StudyDefinitionError`: their results would be ranked
    together, and the report would give the new settings for every one). A study none of
    whose trials ran yet (a command stopped in its first trial, ``worker --create``) takes
    the new settings."""
    full = settings_of(spec, stage, varied, extra)
    raw = study.user_attrs.get(SETTINGS)
    recorded, now = raw, full
    if raw is not None:
        # recorded by an earlier version with settings the training never read (eta with
        # the cyclical schedule): not a change when they go
        unread = unread_fields(spec, stage, varied)
        recorded = {
            section: {k: v for k, v in values.items() if k not in unread}
            if section in ("training", "network")
            else values
            for section, values in raw.items()
        }
        # how the searched parameters were drawn: compared where both records have one
        # (a parameter put in [search] or taken out is said by its fixed value's change)
        then, drawn = recorded.get("search") or {}, full.get("search", {})
        both = sorted(set(then) & set(drawn))
        recorded = {**recorded, "search": {k: then[k] for k in both}}
        now = {**full, "search": {k: drawn[k] for k in both}}
        if recorded == now:
            if raw != full:  # the same settings, recorded as this version records them
                study.set_user_attr(SETTINGS, full)
            return
    ran = any(
        FROM_COARSE_ATTR in t.user_attrs
        or t.state in FINISHED
        or (t.state == TrialState.FAIL and bookkeeping.kind(t) is None)
        for t in study.get_trials(deepcopy=False)
    )
    if raw is None or not ran:
        study.set_user_attr(SETTINGS, full)
        return
    assert recorded is not None
    overrides = {"fine": spec.fine.training, "final": spec.final.training}.get(stage, {})

    def table(section: str, key: str) -> str:
        # the table the study file sets it in: a stage's own [fine.training] overrides
        return f"{stage}.training" if section == "training" and key in overrides else section

    searched_then = {k for t in study.get_trials(deepcopy=False) for k in t.params}

    def kind(section: str, key: str, old: str | None, new: str | None) -> str:
        if section == "search":
            return "drawn"  # the kind, log or choices of a range changed
        if old is None and key in searched_then:
            return "unsearched"  # taken out of [search]
        if new is None and key in spec.search:
            return "searched"  # put in [search]
        return "value"

    changed = [
        (section, key, old, new, kind(section, key, old, new))
        for section in sorted(set(now) | set(recorded))
        for key in sorted(set(now.get(section, {})) | set(recorded.get(section, {})))
        if (old := recorded.get(section, {}).get(key)) != (new := now.get(section, {}).get(key))
    ]
    # the table each is about: [search] for what it searches, a stage's own overrides
    tables = ["search" if k != "value" else table(sec, key) for sec, key, _, _, k in changed]
    first = tables[0]
    name = study.study_name

    def said(where: str, key: str, old: str | None, new: str | None, how: str) -> str:
        at = "" if where == first else f"[{where}] "
        if how == "unsearched":
            return f"{at}{key} = {new} is fixed now, but the trials of {name} searched it"
        if how == "searched":
            return f"{at}{key} is searched now, but the trials of {name} ran with it at {old}"
        if how == "drawn":
            return f"{at}{key} is drawn as {new} now, but the trials of {name} drew it as {old}"
        now_text = "is unset" if new is None else f"= {new}"
        was = "without it" if old is None else f"with {old}"
        return f"{at}{key} {now_text}, but the trials of {name} ran {was}"

    kinds = {c[4] for c in changed}
    fixes = []
    if "value" in kinds:
        fixes.append("put the old values back (in the study file, or the flag that set them)")
    if "unsearched" in kinds:
        fixes.append("put what they searched back in [search]")
    if "searched" in kinds:
        fixes.append("take what they ran with out of [search] and set it back")
    if "drawn" in kinds:
        # Optuna refuses a parameter drawn two ways in one study: every trial would fail
        fixes.append("give the ranges back their kind, log and choices (bounds may change)")
    raise StudyDefinitionError(
        spec.path,
        first,
        "; ".join(said(t, *c[1:]) for t, c in zip(tables, changed, strict=True))
        + f". To go on with them, {' and '.join(fixes)}; or give the study a new `name` to "
        "start another (the results so far stay under the old name)",
    )


# User attr of a fine trial copied from the coarse study (its number): here, as
# search.sweep.narrowing.FROM_COARSE imports this module.
FROM_COARSE_ATTR = "from_coarse"


def load_existing(spec: StudySpec, stage: str) -> optuna.Study | None:
    """The stage's study if it exists in the storage, else None.

    No study is created (and no SQLite file); a PostgreSQL database gets Optuna's
    empty tables, a journal storage its empty file, as any use of them would.
    """
    db = sqlite_path(spec.storage_url())
    if db is not None and not db.is_file():
        return None
    storage = storage_for(spec)
    names = {s.study_name for s in storage.get_all_studies()}
    if study_name(spec, stage) not in names:
        return None
    return open_study(spec, stage, storage, create=False)


def describe_ranges(space: dict[str, sp.Range]) -> dict[str, Any]:
    """The ranges as recorded on a study (user attr ``ranges``)."""
    return sp.to_record(space)


def top_trials(study: optuna.Study, k: int) -> list[FrozenTrial]:
    done = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    # A COMPLETE trial of a single-objective study always has a value.
    return sorted(done, key=lambda t: cast(float, t.value), reverse=True)[:k]


def machine_seed() -> int:
    """A seed offset of this machine and process, for workers joining from many machines."""
    label = f"{socket.gethostname()}:{os.getpid()}"
    return int(hashlib.sha256(label.encode()).hexdigest()[:4], 16)


def pending(spec: StudySpec, stage: str, study: optuna.Study) -> str | None:
    """What the stage still has to do before its results can be used, or None: trials
    waiting or running, or replicates of its best configurations not yet queued."""
    c = counts(study)
    if c["WAITING"] or c["RUNNING"]:
        return f"{c['WAITING']} trial(s) waiting and {c['RUNNING']} running"
    stage_spec = spec.search_stage(stage)
    missing = missing_replicates(study, stage_spec.replicates, stage_spec.replicate_top)
    if missing:
        return f"{missing} replicate run(s) of its best configurations not yet queued"
    return None


def unfinished(spec: StudySpec, stage: str, study: optuna.Study) -> str | None:
    """What the stage still has to do, its race included (:func:`pending`, then
    :func:`search.sweep.replicates.race_pending`), or None when it is done."""
    return pending(spec, stage, study) or race_pending(study, spec.search_stage(stage).race_runs)


def trials_flag(study: optuna.Study, spec: StudySpec | None, stage: str) -> str:
    """`` --trials N`` when the stage's recorded target is above the study file's (it was
    given with ``--trials``), else "" (also when the file is not known): the command that
    resumes it must keep that target, or the file's lower one would retire the trials
    still waiting. A file edited to a higher target since is the file's to keep. The fine
    stage's recorded target counts the coarse runs it carried over on top; ``--trials``
    does not."""
    target = study.user_attrs.get("target")
    if target is None or spec is None:
        return ""
    carried = sum(
        FROM_COARSE_ATTR in t.user_attrs and not is_replicate(t)
        for t in study.get_trials(deepcopy=False)
    )
    own = int(target) - carried
    if own <= spec.search_stage(stage).trials:
        return ""
    return f" --trials {own}"


def stage_of(study_name: str) -> str:
    """The stage of a search study, by its name (``<name>-coarse``, ``<name>-fine``)."""
    return "fine" if study_name.endswith("-fine") else "coarse"
