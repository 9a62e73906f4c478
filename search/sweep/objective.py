"""The one objective: an Optuna trial -> ``train(hp, data, report)`` -> a validation accuracy.

Whoever wrote the network, a trial runs the same way: the search space suggests
the parameters (:mod:`search.config.space`), :func:`run_trial` builds ``hp``
(:func:`search.sweep.user_train.hyperparameters`) and calls the study's training
function (the built-in network, :mod:`search.sweep.builtin`, or the user's),
whose ``report(step, val_acc, ...)`` calls are ``trial.report`` and the one
pruning rule (:func:`pruning_window`, :func:`may_prune`). Each trial keeps its
wall time, epochs run and whether (and why) it diverged as user attrs, and its
learning curves as the system attr ``c2f_curves`` (:func:`curves_of`), pruned ones
included: the report draws them, and the dashboard's trial view, which lists every
user attr, stays a short table instead of a page of JSON.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any

import optuna

from model.data import Splits
from model.train import TrainConfig, TrainingDiverged
from search.config import space as sp
from search.config.study import StudySpec
from search.sweep.replicates import replicate_index
from search.sweep.user_train import (
    Data,
    Reporter,
    entry_of,
    hyperparameters,
    layout_of,
    parse_result,
    train_function,
    user_data,
    warn_once,
)
from search.sweep.workers.loop import worker_log
from search.sweep.workers.storage import set_trial_attrs, trial_id

CURVES = "c2f_curves"
SEED_STRIDE = 1000  # between the seeds of a configuration's replicates


def curves_of(trial: optuna.trial.FrozenTrial) -> dict:
    """A finished trial's learning curves (:meth:`model.train.History.to_dict`), or {}.

    Studies made before the curves moved to a system attr keep them in user attr ``curves``.
    """
    return trial.system_attrs.get(CURVES) or trial.user_attrs.get("curves") or {}


def record(
    trial: optuna.Trial,
    reporter: Reporter,
    wall_time: float,
    *,
    seed: int,
    diverged: bool = False,
    reason: str = "",
    more: dict[str, Any] | None = None,
    epochs_run: float | None = None,
) -> None:
    """Store what a trial's run reported, in one write: the seed, the curves (system attr
    ``c2f_curves``), wall time, epochs run (``epochs_run``: a diverged run's, to where it
    diverged) of those planned, whether (and why) it stopped early, and the
    user attrs in ``more``."""
    user: dict[str, Any] = {"seed": seed}
    system: dict[str, Any] = {}
    if reporter.calls:
        system[CURVES] = {**reporter.curves, "wall_time": round(wall_time, 3)}
    if reporter.calls or epochs_run is not None:
        user["epochs_run"] = round(max(reporter.epochs_run or 0.0, epochs_run or 0.0), 4)
        # what a budget in steps counts a trial that stopped early by (studies.spent)
        user["epochs_planned"] = round(reporter.epochs_planned, 4)
    user |= {"wall_time": round(wall_time, 3), "diverged": diverged}
    if reason:
        user["reason"] = reason
    user |= more or {}
    set_trial_attrs(trial.storage, trial_id(trial), user=user, system=system)


def pruning_window(spec: StudySpec, config: TrainConfig, n_train: int) -> tuple[float, int]:
    """(from, to): a trial may be pruned at an evaluation step with ``from <= step < to``.

    On a cyclical schedule, only at the end of a cycle: the first evaluation point at
    or after the end of the first whole cycle past ``warmup_cycles``. Mid-cycle, eta is
    near eta_max and a trial's accuracy says more about its eta_max than about its
    quality; at a cycle's end eta is back at eta_min and trials compare on equal terms.
    No window when that cycle is the last (a run that finished is never pruned). On
    the other schedules, from the warm-up (``warmup_cycles`` epochs) to the last
    evaluation point.
    """
    total = config.total_steps(n_train)
    if config.schedule != "cyclical":
        return spec.optuna.warmup_cycles * config.steps_per_epoch(n_train), total
    per_cycle = 2 * config.resolved_n_s(n_train)
    rung = max(1, math.ceil(spec.optuna.warmup_cycles - 1e-9)) * per_cycle
    if rung >= total:
        return math.inf, 0
    return rung, min(total, rung + config.eval_interval(n_train))


def may_prune(spec: StudySpec, trial: optuna.Trial) -> bool:
    """Whether to ask the pruner at all: not with pruner "none" (``should_prune`` reads
    every finished trial from the storage), never for a replicate (it is there to
    measure its configuration's noise)."""
    return spec.optuna.pruner != "none" and replicate_index(trial) == 0


def trial_seed(spec: StudySpec, trial: optuna.Trial) -> int:
    """The seed of a trial's data order and initial weights.

    ``seed_mode = "shared"`` (the default): every search trial of a stage has the
    study's seed, so two trials differ only in their hyperparameters (common
    random numbers); replicate i of a configuration has seed + 1000 i, the same
    for every configuration. ``"per_trial"``: the seed plus the trial's number.
    """
    if spec.optuna.seed_mode == "per_trial":
        return spec.optuna.seed + trial.number
    return spec.optuna.seed + SEED_STRIDE * replicate_index(trial)


def run_trial(
    trial: optuna.Trial,
    spec: StudySpec,
    stage: str,
    params: dict[str, Any],
    data: Data,
    *,
    seed: int,
    prunes: bool,
    train: Callable[..., Any],
    log: Callable[[str], None] = worker_log,
) -> tuple[float, dict[str, float]]:
    """Train once at ``params`` (settings on top of the stage's) and record the run on
    the trial; (validation accuracy, the function's other final metrics).

    A diverged run (:class:`model.train.TrainingDiverged`) is recorded and ends the
    trial as PRUNED with ``diverged`` set; a pruned one keeps the curves so far; an
    exception of the function fails the trial (the worker loop stores it).
    """
    entry = entry_of(spec)
    n_train = data.train.n
    try:
        config = spec.train_config(stage, {**params, "seed": seed})
        hp = hyperparameters(spec, stage, params, seed=seed, n_train=n_train)
    except Exception:
        trial.set_user_attr("seed", seed)
        raise
    reporter = Reporter(
        entry,
        config,
        n_train,
        trial=trial,
        window=pruning_window(spec, config, n_train),
        prunes=prunes,
    )
    t0 = time.perf_counter()
    try:
        result = train(hp, data, reporter)
        if isinstance(reporter.raised, optuna.TrialPruned):
            warn_once(
                "swallowed",
                f"warning: {entry} caught optuna.TrialPruned raised by report() and went "
                "on; let it pass (the trial is pruned all the same)",
                log,
            )
        reporter.check()
        value, metrics = parse_result(entry, result, final=data.test is not None)
    except TrainingDiverged as exc:
        wall = time.perf_counter() - t0
        # the steps it trained: up to the divergence, past the last report
        trained = (exc.step + 1) / reporter.per_epoch
        record(
            trial, reporter, wall, seed=seed, diverged=True, reason=str(exc), epochs_run=trained
        )
        raise optuna.TrialPruned(f"diverged: {exc}") from None
    except optuna.TrialPruned as exc:
        record(trial, reporter, time.perf_counter() - t0, seed=seed, reason=str(exc))
        raise
    except Exception:
        record(trial, reporter, time.perf_counter() - t0, seed=seed)
        raise
    more: dict[str, Any] = {}
    if metrics and spec.model.train:
        more["result"] = metrics
    warnings: dict[str, str] = {}  # key of warn_once -> the warning
    if not reporter.calls:
        warnings["no-report"] = "never called report(): no learning curve and no pruning"
    elif reporter.curves["step"][-1] > (total := config.total_steps(n_train)):
        warnings["past-total"] = (
            f"called report() at step {reporter.curves['step'][-1]}, past the {total} update "
            "steps the study's settings give a run: report(step) takes the update steps "
            "done so far (mini-batches), not samples or another count; pruning and the "
            "curves' epochs are counted in them"
        )
    if math.isfinite(value) and value > 1:
        warnings["percent"] = (
            f"returned val_acc={value:g}, above 1: val_acc is a fraction of correct answers "
            "(0.95, not 95); the seed noise the search estimates from it assumes one"
        )
    for key, warning in warnings.items():
        warn_once(key, f"warning: {entry} {warning}", log)
    if warnings:
        more["warning"] = "; ".join(warnings.values())
    record(trial, reporter, time.perf_counter() - t0, seed=seed, more=more)
    return value, metrics


class Objective:
    """``Objective(spec, stage, splits, space)(trial) -> final validation accuracy``.

    One for every network: the study's training function (built-in or the user's)
    trains at the parameters the space suggests, with the trial's seed and the
    pruning rule.
    """

    def __init__(
        self,
        spec: StudySpec,
        stage: str,
        splits: Splits,
        space: dict[str, sp.Range],
        *,
        log: Callable[[str], None] = worker_log,
    ) -> None:
        self.spec = spec
        self.stage = stage
        self.space = space
        self.train = train_function(spec)
        self.data = user_data(splits, layout_of(spec), test=False)
        self.log = log

    def __call__(self, trial: optuna.Trial) -> float:
        params = sp.suggest(trial, self.space)
        value, _ = run_trial(
            trial,
            self.spec,
            self.stage,
            params,
            self.data,
            seed=trial_seed(self.spec, trial),
            prunes=may_prune(self.spec, trial),
            train=self.train,
            log=self.log,
        )
        return value if math.isfinite(value) else 0.0
