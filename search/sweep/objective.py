"""Turn an Optuna trial into a trained network and a validation accuracy.

The trainer knows nothing of Optuna: it calls ``on_evaluate(step, metrics)``,
and here that becomes ``trial.report`` / ``should_prune``. Each trial keeps its
wall time, epochs run and whether (and why) it diverged as user attrs, and its
learning curves as the system attr ``c2f_curves`` (:func:`curves_of`), pruned ones
included: the report draws them, and the dashboard's trial view, which lists every
user attr, stays a short table instead of a page of JSON.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable

import optuna

from model.data import Splits
from model.network import Network
from model.train import History, TrainConfig, TrainingDiverged, fit
from search.config.study import StudySpec
from search.sweep.replicates import replicate_index
from search.sweep.storage import trial_id

CURVES = "c2f_curves"


def suggest(trial: optuna.Trial, ranges: dict[str, tuple[float, float]]) -> dict[str, float]:
    """Log-uniform suggestions for each range (``log=True``: the dashboard draws log axes)."""
    return {name: trial.suggest_float(name, lo, hi, log=True) for name, (lo, hi) in ranges.items()}


def build_network(spec: StudySpec, splits: Splits, seed: int) -> Network:
    n = spec.network
    return Network(
        splits.train.d,
        n.hidden,
        splits.train.n_classes,
        batch_norm=n.batch_norm,
        init=n.init,
        sigma=n.sigma,
        bn_alpha=n.bn_alpha,
        seed=seed,
    )


def record_trial(
    trial: optuna.Trial, history: History, *, diverged: bool, reason: str = ""
) -> None:
    """Store a trial's curves, wall time, epochs run and whether (and why) it stopped early."""
    trial.storage.set_trial_system_attr(trial_id(trial), CURVES, history.to_dict())
    trial.set_user_attr("wall_time", round(history.wall_time, 3))
    trial.set_user_attr("epochs_run", round(history.epochs_run, 4))
    trial.set_user_attr("diverged", diverged)
    if reason:
        trial.set_user_attr("reason", reason)


def curves_of(trial: optuna.trial.FrozenTrial) -> dict:
    """A finished trial's learning curves (:meth:`model.train.History.to_dict`), or {}.

    Studies made before the curves moved to a system attr keep them in user attr ``curves``.
    """
    return trial.system_attrs.get(CURVES) or trial.user_attrs.get("curves") or {}


def fit_and_record(
    trial: optuna.Trial,
    net: Network,
    splits: Splits,
    config: TrainConfig,
    *,
    on_evaluate: Callable[[int, dict[str, float]], None],
    seen: History | None = None,
) -> History:
    """Train, reporting through ``on_evaluate``, and record the curves on the trial.

    A diverged run is recorded and ends the trial as PRUNED with the reason. If
    ``on_evaluate`` prunes, ``seen`` (the curves it collected) is recorded.
    """
    t0 = time.perf_counter()
    try:
        # The worker's BLAS limit (set by the pool) applies, not fit's own default.
        history = fit(net, splits, config, on_evaluate=on_evaluate, blas_threads=None)
    except TrainingDiverged as exc:
        exc.history.wall_time = time.perf_counter() - t0
        record_trial(trial, exc.history, diverged=True, reason=str(exc))
        raise optuna.TrialPruned(f"diverged: {exc}") from None
    except optuna.TrialPruned as exc:
        if seen is not None:
            seen.wall_time = time.perf_counter() - t0
            record_trial(trial, seen, diverged=False, reason=str(exc))
        raise
    record_trial(trial, history, diverged=False)
    return history


SEED_STRIDE = 1000  # between the seeds of a configuration's replicates


def pruning_window(spec: StudySpec, config: TrainConfig, n_train: int) -> tuple[float, int]:
    """(warm-up, last): a trial may be pruned at a step with ``warm-up <= step < last``.

    The warm-up is ``warmup_cycles`` cycles (epochs for the other schedules); the last
    evaluation point is the result: a run that finished is never pruned.
    """
    per_cycle = (
        2 * config.resolved_n_s(n_train)
        if config.schedule == "cyclical"
        else config.steps_per_epoch(n_train)
    )
    return spec.optuna.warmup_cycles * per_cycle, config.total_steps(n_train)


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


class Objective:
    """``Objective(spec, stage, splits, ranges)(trial) -> final validation accuracy``."""

    def __init__(
        self, spec: StudySpec, stage: str, splits: Splits, ranges: dict[str, tuple[float, float]]
    ) -> None:
        self.spec = spec
        self.stage = stage
        self.splits = splits
        self.ranges = ranges

    def __call__(self, trial: optuna.Trial) -> float:
        params = suggest(trial, self.ranges)
        seed = trial_seed(self.spec, trial)
        trial.set_user_attr("seed", seed)
        config = self.spec.train_config(self.stage, {**params, "seed": seed})
        net = build_network(self.spec, self.splits, seed)
        n_train = self.splits.train.n
        per_epoch = config.steps_per_epoch(n_train)
        schedule = config.make_schedule(n_train)
        warmup, last = pruning_window(self.spec, config, n_train)
        prunes = may_prune(self.spec, trial)
        # The curves so far, kept here too: a pruned trial keeps them.
        seen = History()

        def on_evaluate(step: int, metrics: dict[str, float]) -> None:
            seen.append(step, step / per_epoch, schedule.lr_at(step - 1), metrics)
            seen.epochs_run = step / per_epoch
            trial.report(metrics["val_acc"], step)
            if prunes and warmup <= step < last and trial.should_prune():
                raise optuna.TrialPruned(
                    f"pruned at step {step}: val_acc {metrics['val_acc']:.4f}"
                )

        history = fit_and_record(
            trial, net, self.splits, config, on_evaluate=on_evaluate, seen=seen
        )
        value = history.final["val_acc"]
        return value if math.isfinite(value) else 0.0
