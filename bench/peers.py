"""Search quality against peers: coarse2fine side by side with Optuna at the same compute.

For each landscape (a dataset, a network, a schedule and a search space) and each run
seed r, every method searches the same space, trains the same network
(:class:`model.network.Network`, :func:`model.train.fit`, :mod:`model.data`) with the
same schedule, and is held to the same budget in training steps:

- ``c2f``: the service as shipped, through its own commands on a generated study file
  (``python -m search.coarse --study F``, then ``search.fine``, then ``search.final``);
  its choice and its own estimate (the search mean) come from final's ``result.json``,
  its steps from every trial in its database (``epochs_run`` x steps per epoch). Its
  search steps are the budget of run r; final's retraining is counted apart.
- ``c2f-off``: the same with its mechanisms off (a seed per trial, no replicates, no
  race, no warm start, fine ranges around the top-k single runs, the best mean chosen);
  its own compute. One at a time (:data:`ABLATIONS`): ``--methods c2f
  c2f-per-trial-seeds c2f-no-race c2f-mean-choice c2f-no-warm-start
  c2f-noise-narrowing c2f-pruning c2f-model-choice``. ``--keep DIR`` keeps the service's
  searches for ``python -m bench.rechoose DIR``.
- ``tpe``, ``tpe-median``, ``gp``, ``random``: Optuna samplers seeded with r, the best
  single trial chosen; trials until the next one would pass the budget (a pruned or
  diverged trial costs the steps it ran). ``tpe-median`` prunes with Optuna's
  MedianPruner (its defaults) at every evaluation point; ``gp`` needs torch.
- ``tpe-wilcoxon``: WilcoxonPruner compares trials instance by instance, so it applies
  to an objective that is a mean over instances: here a trial is the mean final
  validation accuracy over WILCOXON_SEEDS training seeds (the same seeds in every trial,
  so they pair), reported seed by seed. Over the evaluation points of one run it does
  not apply: they are not exchangeable instances (a cyclical schedule puts them at
  different learning rates).

The truth: every choice (and every point of a grid over the space, cached under
``bench/cache/``) is trained again with the search's settings on seeds no search used
(from SCORE_SEED) and scored by its mean TEST accuracy. Regret = the best known test mean
(the best grid point, or a chosen configuration if one beat it) minus the choice's, in
points. Optimism = the method's own estimate of its choice minus that truth.

    python -m bench.peers [--landscape fashion] [--runs 10] [--json] [--figure F.png]
    python -m bench.peers --quick          # a tiny digits landscape, one run: a smoke test

Asserts nothing; prints a table per landscape and the paired differences with 95% CIs.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import hashlib
import importlib.util
import json
import math
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna

from model import data as data_mod
from model.network import Network
from model.train import TrainConfig, TrainingDiverged, fit
from search.config.study import FinalSpec
from search.sweep.workers import bookkeeping

REPO = Path(__file__).resolve().parents[1]
CACHE = REPO / "bench" / "cache"
CIFAR_DIR = REPO.parent / "shared" / "data" / "cifar-10-batches-py"
NETWORK_FIELDS = ("hidden", "batch_norm", "init", "sigma", "bn_alpha")
SCORE_SEED = 1_000_000  # truth seeds: SCORE_SEED + k; every search seed stays below it
SHIFT_SEED = 2_000_000  # the validation shift's seeds (Truth.shift): none of the above
VAL_SEED = 3_000_000  # seeds of Truth.validation: none of the above
PEER_SEED_STRIDE = 1000  # a peer's trial n of run r trains with seed r * 1000 + n
WILCOXON_SEEDS = 5  # instances per trial: with 4 paired losses Wilcoxon's p can reach 0.0625
# Bumped when a method's code changes: runs stored by an earlier version are not reused.
PEERS_VERSION = 2
SERVICE_VERSION = 3  # the service's search code (search/): bump when it changes
# One mechanism off at a time (opt-in with --methods: each costs a service run).
ABLATIONS: dict[str, dict[str, dict[str, Any]]] = {
    "c2f-per-trial-seeds": {"optuna": {"seed_mode": "per_trial"}},
    "c2f-no-race": {"fine": {"race_runs": 0}},
    "c2f-mean-choice": {"final": {"choose": "best"}},
    # the model's best, diverged runs or not (the default keeps off a cliff's edge)
    "c2f-model-choice": {"final": {"choose": "model"}},
    "c2f-no-warm-start": {"fine": {"warm_start": False}},
    "c2f-noise-narrowing": {"fine": {"narrow": "noise"}},
    "c2f-pruning": {"optuna": {"pruner": "percentile"}},
    # Not an ablation: the percentile pruner with the steps it saves spent on more trials
    # (17 coarse, 11 fine: about the peers' budget when a sixth of the steps are pruned).
    "c2f-pruning-more": {
        "optuna": {"pruner": "percentile"},
        "coarse": {"trials": 17},
        "fine": {"trials": 11},
    },
    # Not an ablation: the budget in steps (a diverged trial's unspent steps buy more trials),
    # without and with the percentile pruner (whose saved steps then buy more trials too).
    "c2f-steps": {"optuna": {"budget": "steps"}},
    "c2f-pruning-steps": {"optuna": {"pruner": "percentile", "budget": "steps"}},
    # Not an ablation: a longer race (6 runs on shared seeds, not 4), within the peers' steps.
    "c2f-race-6": {"fine": {"race_runs": 6}},
    # Not an ablation: a wider race at the same budget, 6 contenders on one extra seed each
    # (the shipped race is 3 on one extra seed: race_runs = 4 stops before a second round),
    # paid for by 2 fewer fine trials.
    "c2f-race-wide": {"fine": {"trials": 6, "race_top": 6, "race_runs": 6}},
    # Not an ablation: the stop rule on in the fine stage (off by default).
    "c2f-stop": {"fine": {"stop_below_noise": True}},
    # Fine ranges kept inside the coarse ones (the default goes past an edge the best sits
    # on by up to a decade).
    "c2f-no-extend": {"fine": {"extend": 0.0}},
    # Past the peers' budget: a fine stage of 20 trials (as the quick start's), with and
    # without the stop rule: what it saves where there is more to save.
    "c2f-fine-20": {"fine": {"trials": 20}},
    "c2f-fine-20-stop": {"fine": {"trials": 20, "stop_below_noise": True}},
}
SERVICE = ("c2f", "c2f-off", *ABLATIONS)
PEERS = ("tpe", "tpe-median", "tpe-wilcoxon", "gp", "random")
METHODS = SERVICE + PEERS
DEFAULT_METHODS = ("c2f", "c2f-off", *PEERS)
LABELS = {
    "c2f": "coarse2fine as shipped",
    "c2f-off": "coarse2fine, mechanisms off",
    "c2f-per-trial-seeds": "coarse2fine, a seed per trial",
    "c2f-no-race": "coarse2fine, no race",
    "c2f-mean-choice": "coarse2fine, best mean chosen (no model)",
    "c2f-model-choice": "coarse2fine, the model's best chosen (choose = model)",
    "c2f-no-warm-start": "coarse2fine, fine not warm-started",
    "c2f-noise-narrowing": "coarse2fine, narrowing by means",
    "c2f-pruning": "coarse2fine + percentile pruner",
    "c2f-pruning-more": "coarse2fine + percentile pruner, 17 + 11 trials",
    "c2f-steps": "coarse2fine, budget in steps",
    "c2f-pruning-steps": "coarse2fine + percentile pruner, budget in steps",
    "c2f-race-6": "coarse2fine, a race of 6 runs (race_runs = 6)",
    "c2f-race-wide": "coarse2fine, 6 fine trials, race of 6 contenders",
    "c2f-stop": "coarse2fine, fine stops below the noise",
    "c2f-no-extend": "coarse2fine, fine ranges inside coarse",
    "c2f-fine-20": "coarse2fine, 20 fine trials (over budget)",
    "c2f-fine-20-stop": "coarse2fine, 20 fine trials, stop rule",
    "tpe": "Optuna TPE, no pruning",
    "tpe-median": "Optuna TPE + MedianPruner",
    "tpe-wilcoxon": f"Optuna TPE + WilcoxonPruner ({WILCOXON_SEEDS} seeds/trial)",
    "gp": "Optuna GPSampler",
    "random": "random search",
}
# The ablation: each of the service's mechanisms off at once.
MECHANISMS_OFF: dict[str, dict[str, Any]] = {
    "optuna": {"seed_mode": "per_trial", "pruner": "none"},
    "coarse": {"replicates": 1},
    "fine": {"replicates": 1, "narrow": "top_k", "race_runs": 0, "warm_start": False},
    "final": {"choose": "best"},
}


# ----------------------------------------------------------------------------- the space


@dataclass(frozen=True)
class Param:
    """One searched parameter, in the study files' [search] grammar.

    ``kind``: "log" (``name = [low, high]``), "float" (``{low, high, log, step}``),
    "int" (``{int = [low, high], log = ...}``) or "choice" (``{choice = [...]}``).
    ``grid``: points per axis on the ground-truth grid (a choice uses all its values).
    """

    name: str
    kind: str
    low: float = 0.0
    high: float = 1.0
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()
    grid: int = 5

    def __post_init__(self) -> None:
        if self.kind not in ("log", "float", "int", "choice"):
            raise ValueError(f"kind must be log, float, int or choice, got kind={self.kind!r}")
        if self.kind == "choice" and not self.choices:
            raise ValueError(
                f"a choice needs choices, got choices={self.choices!r} for {self.name}"
            )
        if self.kind != "choice" and not self.low < self.high:
            raise ValueError(f"{self.name}: low must be < high, got {self.low!r}, {self.high!r}")

    def suggest(self, trial: optuna.Trial) -> Any:
        if self.kind == "log":
            return trial.suggest_float(self.name, self.low, self.high, log=True)
        if self.kind == "float":
            return trial.suggest_float(
                self.name, self.low, self.high, log=self.log, step=self.step
            )
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_categorical(self.name, list(self.choices))

    def toml(self) -> Any:
        """The [search] entry of a study file."""
        if self.kind == "log":
            return [self.low, self.high]
        if self.kind == "float":
            entry: dict[str, Any] = {"low": self.low, "high": self.high}
            if self.log:
                entry["log"] = True
            if self.step is not None:
                entry["step"] = self.step
            return entry
        if self.kind == "int":
            return {"int": [int(self.low), int(self.high)], "log": self.log}
        return {"choice": list(self.choices)}

    def axis(self) -> list[Any]:
        """The grid's values along this parameter."""
        if self.kind == "choice":
            return list(self.choices)
        log = self.kind == "log" or self.log
        values = (
            np.geomspace(self.low, self.high, self.grid)
            if log
            else np.linspace(self.low, self.high, self.grid)
        )
        if self.kind == "int":
            return sorted({int(round(v)) for v in values})
        return [float(v) for v in values]


@dataclass(frozen=True)
class Landscape:
    """A dataset, a network, a schedule and a search space; how the truth is measured
    (grid and score seeds) and how the service is set up on it (its study-file tables)."""

    name: str
    description: str
    data: dict[str, Any]
    network: dict[str, Any]
    training: dict[str, Any]
    space: tuple[Param, ...]
    score_seeds: int = 3
    coarse: dict[str, Any] = field(default_factory=dict)
    fine: dict[str, Any] = field(default_factory=dict)
    final: dict[str, Any] = field(default_factory=dict)
    optuna: dict[str, Any] = field(default_factory=dict)
    # The budget of every method, in full trials' steps: the peers spend it, the service
    # must not pass it.
    budget_trials: int = 26
    # digits are shuffled with the study's seed, so the service's run r searches split r:
    # then run r is split r for every method and for the truth.
    split_follows_seed: bool = False

    def split(self, run: int) -> int:
        """The data split of run ``run``."""
        return run if self.split_follows_seed else 0

    def key(self) -> str:
        """A digest of everything the truth depends on: names the grid's cache file."""
        doc = {
            "data": self.data,
            "network": self.network,
            "training": self.training,
            "space": [dataclasses.asdict(p) for p in self.space],
            "score_seeds": self.score_seeds,
            "version": 1,
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True, default=str).encode()).hexdigest()

    def config(self, params: dict[str, Any], seed: int) -> TrainConfig:
        values = {**self.training, **{k: v for k, v in params.items() if k not in NETWORK_FIELDS}}
        return TrainConfig.from_dict({**values, "seed": seed})

    def net_args(self, params: dict[str, Any]) -> dict[str, Any]:
        args = {**self.network, **{k: v for k, v in params.items() if k in NETWORK_FIELDS}}
        args["hidden"] = tuple(args.get("hidden", (50,)))
        return args

    def runs_key(self) -> str:
        """A digest of what a peer's record depends on: names the file of stored runs."""
        doc = {
            "truth": self.key(),
            "peers": [WILCOXON_SEEDS, PEER_SEED_STRIDE, PEERS_VERSION],
            "budget": self.budget_trials,
            "splits": self.split_follows_seed,
        }
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()

    def service_key(self, variant: str) -> str:
        """A digest of what a service run's record depends on: its study file (run 0's, the
        name and seed aside), the truth and :data:`SERVICE_VERSION`."""
        doc = study_doc(self, variant, 0)
        doc.pop("name")
        doc["optuna"].pop("seed")
        doc["truth"] = self.key()
        doc["version"] = SERVICE_VERSION
        if doc.get("final", {}).get("choose") == "robust":
            # 4: of those within the seed noise, the furthest from a diverged run (3: the
            # worst neighbour among the model's ties; 2: of all, when one diverged)
            doc["robust"] = 4
        return hashlib.sha256(json.dumps(doc, sort_keys=True).encode()).hexdigest()[:12]

    def grid(self) -> list[dict[str, Any]]:
        points: list[dict[str, Any]] = [{}]
        for p in self.space:
            points = [{**pt, p.name: v} for pt in points for v in p.axis()]
        return points


LOG_LAMBDA = Param("l2_lambda", "log", 1e-5, 1e-1, grid=6)
LOG_ETA_MAX = Param("eta_max", "log", 1e-3, 1.0, grid=6)
# The service's stages at the budget of 26 trials: the shipped defaults but for the trials.
SERVICE_STAGES: dict[str, dict[str, Any]] = {
    "coarse": {"trials": 14},
    "fine": {"trials": 8, "race_runs": 4},
    "final": {},
    "optuna": {},
}

LANDSCAPES = {
    "fashion": Landscape(
        name="fashion",
        description="Fashion-MNIST 55,000 / 5,000 / 10,000, [50], lambda x eta_max",
        data={"name": "fashion_mnist", "dir": data_mod.FASHION_MNIST_DIR},
        network={"hidden": [50], "batch_norm": False, "init": "he"},
        training={
            "batch_size": 100,
            "schedule": "cyclical",
            "eta_min": 1e-5,
            "n_s": 250,
            "n_cycles": 2,
            "evals_per_cycle": 4,
            "train_eval_size": 1000,
        },
        space=(LOG_LAMBDA, LOG_ETA_MAX),
        score_seeds=3,
        **SERVICE_STAGES,
    ),
    "cifar3": Landscape(
        name="cifar3",
        description=(
            "CIFAR-10 subset 4,068 / 1,017 / 1,017, [50, 50] batch norm, lambda x eta_max x rho"
        ),
        data={"name": "cifar10", "dir": str(CIFAR_DIR), "split": "all", "n_val": 1017},
        network={"hidden": [50, 50], "batch_norm": True, "init": "he"},
        training={
            "batch_size": 100,
            "schedule": "cyclical",
            "eta_min": 1e-5,
            "n_s": 200,
            "n_cycles": 1,
            "evals_per_cycle": 4,
            "train_eval_size": 1000,
        },
        space=(
            Param("l2_lambda", "log", 1e-5, 1e-1, grid=4),
            Param("eta_max", "log", 1e-3, 1.0, grid=4),
            Param("rho", "float", 0.0, 0.99, grid=3),
        ),
        score_seeds=5,
        **SERVICE_STAGES,
    ),
    "digits": Landscape(
        name="digits",
        description=(
            "digits 1,197 / 300 / 300, [50], lambda x eta_max x batch_size (int) x batch_norm"
        ),
        data={"name": "digits"},
        network={"hidden": [50], "batch_norm": False, "init": "he"},
        training={
            "schedule": "cyclical",
            "eta_min": 1e-5,
            "n_s": 100,
            "n_cycles": 2,
            "evals_per_cycle": 4,
        },
        space=(
            Param("l2_lambda", "log", 1e-5, 1e-1, grid=3),
            Param("eta_max", "log", 1e-3, 1.0, grid=4),
            Param("batch_size", "int", 16, 128, log=True, grid=2),
            Param("batch_norm", "choice", choices=(False, True)),
        ),
        score_seeds=5,
        split_follows_seed=True,
        **SERVICE_STAGES,
    ),
    # --quick: seconds, for a smoke test of the whole pipeline.
    "tiny": Landscape(
        name="tiny",
        description="digits, [20], 40 steps a trial, lambda x eta_max (smoke test)",
        data={"name": "digits"},
        network={"hidden": [20], "batch_norm": False, "init": "he"},
        training={
            "batch_size": 50,
            "schedule": "cyclical",
            "eta_min": 1e-4,
            "n_s": 20,
            "n_cycles": 1,
            "evals_per_cycle": 2,
        },
        space=(
            Param("l2_lambda", "log", 1e-4, 1e-1, grid=3),
            Param("eta_max", "log", 1e-2, 0.5, grid=3),
        ),
        score_seeds=2,
        coarse={"trials": 4},
        fine={"trials": 2, "top_k": 2, "race_top": 2, "race_runs": 2},
        optuna={"n_startup_trials": 2},
        budget_trials=8,
        split_follows_seed=True,
    ),
}
DEFAULT_LANDSCAPES = ("fashion", "digits", "cifar3")


# ----------------------------------------------------------------------------- training


_SPLITS: dict[tuple[str, int], data_mod.Splits] = {}


def splits_of(land: Landscape, split: int = 0) -> data_mod.Splits:
    """The landscape's data, loaded and normalised as the service prepares it with
    [optuna] seed ``split`` (the seed shuffles digits only)."""
    if (land.name, split) not in _SPLITS:
        d = land.data
        _SPLITS[land.name, split] = data_mod.load(
            d["name"],
            d.get("dir"),
            split=d.get("split", "batch1"),
            n_val=d.get("n_val"),
            seed=split,
        )
    return _SPLITS[land.name, split]


def trial_steps(land: Landscape) -> int:
    """Training steps of one full trial (n_s in steps: the same for every batch size)."""
    return land.config({}, 0).total_steps(splits_of(land).train.n)


def train(
    land: Landscape,
    params: dict[str, Any],
    seed: int,
    *,
    split: int = 0,
    on_evaluate: Callable[[int, dict[str, float]], None] | None = None,
) -> tuple[Network, float]:
    """Train the landscape's network with ``params`` and ``seed`` on data split ``split``:
    (network, final val acc).

    Raises TrainingDiverged as :func:`model.train.fit` does.
    """
    splits = splits_of(land, split)
    config = land.config(params, seed)
    net = Network(
        splits.train.d, n_classes=splits.train.n_classes, seed=seed, **_net(land, params)
    )
    history = fit(net, splits, config, on_evaluate=on_evaluate)
    value = history.final["val_acc"]
    return net, value if math.isfinite(value) else 0.0


def _net(land: Landscape, params: dict[str, Any]) -> dict[str, Any]:
    args = land.net_args(params)
    return {"hidden": args.pop("hidden"), **args}


def truth_run(job: tuple[str, str, int, int]) -> tuple[Network | None, data_mod.Splits, float]:
    """One truth run, ``(landscape, params JSON, seed, split)``: the trained network (None
    when training diverged), the split and the run's lambda."""
    name, params_json, seed, split = job
    land = LANDSCAPES[name]
    params = json.loads(params_json)
    lam = float(params.get("l2_lambda", land.training.get("l2_lambda", 0.0)))
    try:
        net, _ = train(land, params, seed, split=split)
    except TrainingDiverged:
        net = None
    return net, splits_of(land, split), lam


def _accuracy(job: tuple[str, str, int, int], part: str) -> float:
    """Accuracy on ``part`` ("test" or "val") of one truth run; chance when it diverged."""
    net, splits, lam = truth_run(job)
    chance = 1.0 / splits.train.n_classes
    if net is None:
        return chance
    data = getattr(splits, part)
    acc = net.evaluate(data.X, data.y, l2_lambda=lam)["accuracy"]
    return acc if math.isfinite(acc) else chance


def test_accuracy(job: tuple[str, str, int, int]) -> float:
    """Test accuracy of one truth run (:func:`truth_run`, for a pool); a diverged run
    scores chance."""
    return _accuracy(job, "test")


def val_minus_test(job: tuple[str, str, int, int]) -> float:
    """Validation minus test accuracy of one truth run (:func:`truth_run`, for a pool);
    0 for a run that diverged."""
    net, splits, lam = truth_run(job)
    if net is None:
        return 0.0
    val = net.evaluate(splits.val.X, splits.val.y, l2_lambda=lam)["accuracy"]
    test = net.evaluate(splits.test.X, splits.test.y, l2_lambda=lam)["accuracy"]
    gap = val - test
    return gap if math.isfinite(gap) else 0.0


def val_accuracy(job: tuple[str, str, int, int]) -> float:
    """Validation accuracy of one truth run (:func:`truth_run`, for a pool); a diverged
    run scores chance."""
    return _accuracy(job, "val")


# ----------------------------------------------------------------------------- the truth


def params_key(params: dict[str, Any]) -> str:
    return json.dumps(params, sort_keys=True)


class Truth:
    """Multi-seed test means of configurations on one data split, cached in ``bench/cache/``."""

    def __init__(
        self, land: Landscape, *, cache_dir: Path, mapper: Callable, split: int = 0
    ) -> None:
        self.land = land
        self.split = split
        where = f"-split{split}" if split else ""
        self.path = cache_dir / f"peers-{land.name}-{land.key()[:12]}{where}.json"
        self.map = mapper
        self.scores: dict[str, float] = {}
        self.shifts: dict[str, float] = {}
        self.vals: dict[str, float] = {}
        if self.path.is_file():
            doc = json.loads(self.path.read_text())
            self.scores, self.shifts = doc["scores"], doc.get("shifts", {})
            self.vals = doc.get("vals", {})

    def seeds(self) -> list[int]:
        return [SCORE_SEED + k for k in range(self.land.score_seeds)]

    def score(self, configs: Iterable[dict[str, Any]]) -> list[float]:
        """Each configuration's mean test accuracy over the score seeds (trained once)."""
        return self._means(test_accuracy, SCORE_SEED, self.scores, configs)

    def shift(self, params: dict[str, Any]) -> float:
        """How much easier the split's validation set is than its test set: validation
        minus test accuracy of ``params`` (the grid's best), mean over as many seeds as
        the truth's but others: the grid's best is the best of many on the score seeds'
        test accuracy, which would lower it by that luck. Every method's estimate is a
        validation accuracy and its truth a test accuracy, so this part of their
        optimism is the data's, the same for every method."""
        return self._means(val_minus_test, SHIFT_SEED, self.shifts, [params])[0]

    def validation(self, configs: Iterable[dict[str, Any]]) -> list[float]:
        """Each configuration's mean validation accuracy over as many seeds as the
        truth's but others (:data:`VAL_SEED`): what a choice by validation accuracy
        would see with the seed noise averaged out (``bench.rechoose --visited``)."""
        return self._means(val_accuracy, VAL_SEED, self.vals, configs)

    def _means(
        self,
        fn: Callable[[tuple[str, str, int, int]], float],
        first_seed: int,
        cache: dict[str, float],
        configs: Iterable[dict[str, Any]],
    ) -> list[float]:
        """``fn``'s mean over seeds ``first_seed + k`` (as many as the truth's) of each
        configuration, from ``cache`` or trained once and kept there."""
        configs = list(configs)
        todo = sorted({params_key(c) for c in configs} - set(cache))
        if todo:
            seeds = [first_seed + k for k in range(self.land.score_seeds)]
            values = list(
                self.map(fn, [(self.land.name, k, s, self.split) for k in todo for s in seeds])
            )
            for i, k in enumerate(todo):
                cache[k] = statistics.fmean(values[i * len(seeds) : (i + 1) * len(seeds)])
            self._save()
        return [cache[params_key(c)] for c in configs]

    def _save(self) -> None:
        # Another bench process may have scored others since this one read the file.
        if self.path.is_file():
            doc = json.loads(self.path.read_text())
            for mine, part in (
                (self.scores, "scores"),
                (self.shifts, "shifts"),
                (self.vals, "vals"),
            ):
                for k, v in doc.get(part, {}).items():
                    mine.setdefault(k, v)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".{os.getpid()}.tmp")
        doc = {
            "landscape": self.land.name,
            "scores": self.scores,
            "shifts": self.shifts,
            "vals": self.vals,
        }
        tmp.write_text(json.dumps(doc))
        os.replace(tmp, self.path)


# ----------------------------------------------------------------------------- peers


def make_sampler(method: str, seed: int) -> optuna.samplers.BaseSampler:
    if method == "random":
        return optuna.samplers.RandomSampler(seed=seed)
    if method == "gp":
        return optuna.samplers.GPSampler(seed=seed)
    return optuna.samplers.TPESampler(seed=seed)


def make_pruner(method: str) -> optuna.pruners.BasePruner:
    if method == "tpe-median":
        return optuna.pruners.MedianPruner()
    if method == "tpe-wilcoxon":
        with warnings.catch_warnings():  # experimental since Optuna 3.6: known
            warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
            return optuna.pruners.WilcoxonPruner()
    return optuna.pruners.NopPruner()


def run_peer(job: tuple[str, str, int, int]) -> dict[str, Any]:
    """One peer's search: ``(landscape, method, run, budget in steps)`` -> its record."""
    name, method, run, budget = job
    land = LANDSCAPES[name]
    split = land.split(run)
    full = trial_steps(land)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(
        direction="maximize", sampler=make_sampler(method, run), pruner=make_pruner(method)
    )
    spent = 0
    t0 = time.perf_counter()
    seeds = [run * PEER_SEED_STRIDE + PEER_SEED_STRIDE - 1 - k for k in range(WILCOXON_SEEDS)]

    def curve_objective(trial: optuna.Trial) -> float:
        nonlocal spent
        params = {p.name: p.suggest(trial) for p in land.space}
        last = 0

        def on_evaluate(step: int, metrics: dict[str, float]) -> None:
            nonlocal last
            last = step
            trial.report(metrics["val_acc"], step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step}")

        try:
            _, value = train(
                land,
                params,
                run * PEER_SEED_STRIDE + trial.number,
                split=split,
                on_evaluate=on_evaluate,
            )
        except TrainingDiverged as exc:
            # What a plain user's network returns once its loss is NaN: chance. A completed
            # trial, so that every sampler learns the region is bad (GPSampler ignores pruned
            # trials and would sample there again and again).
            spent += exc.step + 1
            trial.set_user_attr("diverged", True)
            return 1.0 / splits_of(land).train.n_classes
        except optuna.TrialPruned:
            spent += last
            raise
        spent += full
        return value

    def wilcoxon_objective(trial: optuna.Trial) -> float:
        # Optuna's recipe: report each instance's value under its id; when pruned, return
        # the mean so far (the sampler learns from it) instead of raising TrialPruned.
        nonlocal spent
        params = {p.name: p.suggest(trial) for p in land.space}
        values: list[float] = []
        for k, seed in enumerate(seeds):
            if spent + full > budget:
                break
            try:
                _, value = train(land, params, seed, split=split)
                spent += full
            except TrainingDiverged as exc:
                spent += exc.step + 1
                value = 1.0 / splits_of(land).train.n_classes
                trial.set_user_attr("diverged", True)
            values.append(value)
            trial.report(value, k)
            if trial.should_prune():
                break
        trial.set_user_attr("instances", len(values))
        return statistics.fmean(values) if values else 0.0

    objective = wilcoxon_objective if method == "tpe-wilcoxon" else curve_objective
    while spent + full <= budget:
        study.optimize(objective, n_trials=1)
    trials = study.get_trials(deepcopy=False)
    done = [t for t in trials if t.state == optuna.trial.TrialState.COMPLETE]
    if method == "tpe-wilcoxon":  # the choice has every instance, as a user would require
        whole = [t for t in done if t.user_attrs.get("instances") == WILCOXON_SEEDS]
        done = whole or done
    if done:
        best = max(done, key=lambda t: t.value)
        params, estimate = best.params, best.value
    else:  # every trial pruned or diverged: the best last reported value
        best = max(trials, key=lambda t: list(t.intermediate_values.values() or [0.0])[-1])
        params, estimate = best.params, max(best.intermediate_values.values() or [0.0])
    pruned = sum(t.state == optuna.trial.TrialState.PRUNED for t in trials)
    diverged = sum(bool(t.user_attrs.get("diverged")) for t in trials)
    if method == "tpe-wilcoxon":  # a pruned trial returns its mean so far: cut short
        pruned = sum(t.user_attrs.get("instances", 0) < WILCOXON_SEEDS for t in trials)
    return {
        "method": method,
        "run": run,
        "params": params,
        "estimate": estimate,
        "budget": budget,
        "steps": spent,
        "trials": len(trials),
        "completed": len(done),
        "pruned": pruned,
        "diverged": diverged,
        "wall": time.perf_counter() - t0,
    }


# ----------------------------------------------------------------------------- the service


class Pending(Exception):
    """The service cannot run this landscape yet (its study file is refused)."""


def study_doc(land: Landscape, variant: str, run: int) -> dict[str, Any]:
    """The study file of the service's run ``run`` (``variant``: "c2f" or "c2f-off")."""
    search = {p.name: p.toml() for p in land.space}
    network = {k: v for k, v in land.network.items() if k not in search}
    doc: dict[str, Any] = {
        "name": f"{variant.replace('-', '_')}_{land.name}_{run}",
        "data": dict(land.data),
        "network": network,
        "training": dict(land.training),
        "search": search,
        "coarse": dict(land.coarse),
        "fine": dict(land.fine),
        # choose written out: a record names the rule it was chosen by, default or not
        "final": {"choose": FinalSpec.choose, **land.final, "seeds": 1, "holdout": 0.2},
        "optuna": {
            **land.optuna,
            "sampler": "tpe",
            "seed": run,
            "seed_mode": "shared",
            "workers": 1,
        },
    }
    changes = MECHANISMS_OFF if variant == "c2f-off" else ABLATIONS.get(variant, {})
    for table, values in changes.items():
        doc[table].update(values)
    return doc


def run_service(land: Landscape, variant: str, run: int, *, root: Path) -> dict[str, Any]:
    """coarse -> fine -> final through the commands; the choice, its estimate and the steps.

    Raises Pending when the study file is refused (a [search] the service cannot read yet).
    """
    from search.config.study import StudyDefinitionError, load_spec
    from tests.search.conftest import dump_toml

    work = root / land.name / f"{variant}_{run}"
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    doc = study_doc(land, variant, run)
    path = work / "study.toml"
    path.write_text(dump_toml(doc))
    try:
        spec = load_spec(path)
    except StudyDefinitionError as exc:
        raise Pending(str(exc).replace(str(path), "study file")) from None
    env = {
        **os.environ,
        "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", ""),
        "C2F_CACHE_DIR": str(CACHE / "prepared"),
    }
    t0 = time.perf_counter()
    with open(work / "log.txt", "w") as log:
        for stage in ("coarse", "fine", "final"):
            command = [sys.executable, "-m", f"search.{stage}", "--study", str(path)]
            code = subprocess.call(command, cwd=work, env=env, stdout=log, stderr=log)
            if code != 0:
                tail = (work / "log.txt").read_text().splitlines()[-15:]
                raise RuntimeError(f"{' '.join(command)} exited {code}:\n" + "\n".join(tail))
    wall = time.perf_counter() - t0
    result = json.loads((work / "out" / doc["name"] / "final" / "result.json").read_text())
    steps, trials, pruned, diverged = service_steps(work / f"{doc['name']}.db", land)
    final_config = TrainConfig.from_dict(result["config"])
    return {
        "method": variant,
        "run": run,
        "params": result["params"],
        # What the service says its choice will score: the model's prediction when the
        # model chose, else the choice's mean over its runs (both are in result.json).
        "estimate": result["search_val_acc"][
            "smoothed" if spec.final.choose in ("model", "robust") else "mean"
        ],
        "estimate_mean": result["search_val_acc"]["mean"],
        "estimate_n": result["search_val_acc"]["n"],
        "chosen_from": result["study"],  # the fine study's name, or the coarse one's
        "steps": steps,
        "final_steps": result["n_seeds"] * final_config.total_steps(result["split"]["train"]),
        "trials": trials,
        "pruned": pruned,
        "diverged": diverged,
        "wall": wall,
    }


def service_steps(db: Path, land: Landscape) -> tuple[int, int, int, int]:
    """(steps, trials, pruned, diverged) over every trial of every study in the service's database:
    ``epochs_run`` x the trial's steps per epoch (diverged and pruned ones included; retired
    ones, which never ran, left out)."""
    storage = f"sqlite:///{db}"
    n_train = splits_of(land).train.n
    steps = trials = pruned = diverged = 0
    for name in optuna.get_all_study_names(storage=storage):
        study = optuna.load_study(study_name=name, storage=storage)
        for t in study.get_trials(deepcopy=False):
            if "from_coarse" in t.user_attrs:  # a coarse run the fine study carries over
                continue
            if bookkeeping.kind(t) is bookkeeping.Kind.RETIRED:  # queued, never run
                continue
            batch = int(t.params.get("batch_size", land.training.get("batch_size", 100)))
            steps += round(float(t.user_attrs.get("epochs_run") or 0.0) * (n_train // batch))
            trials += 1
            diverged += bool(t.user_attrs.get("diverged"))
            pruned += t.state == optuna.trial.TrialState.PRUNED and not t.user_attrs.get(
                "diverged"
            )
    return steps, trials, pruned, diverged


# ----------------------------------------------------------------------------- statistics


def t_interval(diffs: list[float]) -> tuple[float, float, float]:
    """Mean and 95% t confidence interval of paired differences (NaN bounds for n < 2)."""
    from scipy import stats

    mean = statistics.fmean(diffs)
    if len(diffs) < 2:
        return mean, math.nan, math.nan
    half = stats.t.ppf(0.975, len(diffs) - 1) * statistics.stdev(diffs) / math.sqrt(len(diffs))
    return mean, mean - half, mean + half


def summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    regrets = [r["regret"] for r in rows]
    return {
        "runs": len(rows),
        "mean_regret": statistics.fmean(regrets),
        "worst_regret": max(regrets),
        "within_0.5": sum(r <= 0.5 for r in regrets) / len(rows),
        "within_1": sum(r <= 1.0 for r in regrets) / len(rows),
        "compute": statistics.fmean(r["compute"] for r in rows),
        "optimism": statistics.fmean(r["optimism"] for r in rows),
        # net of the validation set's shift from the test set (Truth.shift): the part of
        # the optimism that is the method's own, as in the winner's curse
        "net_optimism": statistics.fmean(r["net_optimism"] for r in rows),
        "trials": statistics.fmean(r["trials"] for r in rows),
        "wall": statistics.fmean(r["wall"] for r in rows),
        "over_budget": sum(bool(r.get("over_budget")) for r in rows),
    }


def paired(records: dict[str, list[dict[str, Any]]], base: str) -> dict[str, dict[str, Any]]:
    """regret(base) - regret(other) per shared run seed: negative means base is better;
    and under ``"optimism"``, optimism(base) - optimism(other) (negative: base's own
    estimate overstates its choice by less). A data split's validation set that is
    easier than its test set makes every method look optimistic on that run; the paired
    difference takes that out."""
    mine = {r["run"]: r for r in records.get(base, [])}
    out = {}
    for method, rows in records.items():
        if method == base:
            continue
        shared = [r for r in rows if r["run"] in mine]
        diffs = [mine[r["run"]]["regret"] - r["regret"] for r in shared]
        if diffs:
            mean, lo, hi = t_interval(diffs)
            opt = [mine[r["run"]]["optimism"] - r["optimism"] for r in shared]
            o_mean, o_lo, o_hi = t_interval(opt)
            out[method] = {
                "n": len(diffs),
                "mean": mean,
                "low": lo,
                "high": hi,
                "base_wins": sum(d < 0 for d in diffs),
                "base_losses": sum(d > 0 for d in diffs),
                "optimism": {"mean": o_mean, "low": o_lo, "high": o_hi},
            }
    return out


# ----------------------------------------------------------------------------- rungs


def rung_job(job: tuple[str, dict[str, Any], int]) -> list[float]:
    """Validation accuracy at every evaluation point of one full run (for a pool); a run
    that diverged scores chance from there on."""
    name, params, seed = job
    land = LANDSCAPES[name]
    curve: list[float] = []
    chance = 1.0 / splits_of(land).train.n_classes
    n_points = trial_steps(land) // land.config(params, seed).eval_interval(
        splits_of(land).train.n
    )
    try:
        train(land, params, seed, on_evaluate=lambda step, m: curve.append(m["val_acc"]))
    except TrainingDiverged:
        pass
    return [v if math.isfinite(v) else chance for v in curve] + [chance] * (n_points - len(curve))


def rungs(land: Landscape, *, trials: int, mapper: Callable) -> dict[str, Any]:
    """Can a trial be judged before its end? ``trials`` random configurations of the space,
    each trained to the end (seed = its index): at every evaluation point, the Spearman
    rank correlation of the value there with the final value, and how often one of the
    3 best finals sits in the bottom third there (where a percentile pruner at 33%
    would cut it)."""
    from scipy import stats

    sampler = optuna.samplers.RandomSampler(seed=0)
    study = optuna.create_study(direction="maximize", sampler=sampler)
    points = []
    for _ in range(trials):
        t = study.ask()
        points.append({p.name: p.suggest(t) for p in land.space})
        study.tell(t, 0.0)
    curves = np.array(list(mapper(rung_job, [(land.name, p, k) for k, p in enumerate(points)])))
    config = land.config({}, 0)
    n_train = splits_of(land).train.n
    every = config.eval_interval(n_train)
    cycle = 2 * config.resolved_n_s(n_train) if config.schedule == "cyclical" else None
    schedule = config.make_schedule(n_train)
    final = curves[:, -1]
    top = set(np.argsort(-final, kind="stable")[:3])
    rows = []
    for j in range(curves.shape[1]):
        step = (j + 1) * every
        rho = float(stats.spearmanr(curves[:, j], final).statistic)
        bottom = set(np.argsort(curves[:, j], kind="stable")[: trials // 3])
        rows.append(
            {
                "step": step,
                "cycle_end": cycle is not None and step % cycle == 0,
                "eta_over_eta_max": schedule.lr_at(step - 1) / config.eta_max
                if config.schedule == "cyclical"
                else None,
                "spearman": rho,
                "top3_in_bottom_third": len(top & bottom) / 3,
            }
        )
    return {"trials": trials, "rows": rows}


def print_rungs(name: str, res: dict[str, Any], log: Callable[[str], None]) -> None:
    log(
        f"\n{name}: can a trial be judged before its end? {res['trials']} random "
        "configurations trained to the end"
    )
    log(f"  {'step':>6} {'where':<22} {'rank corr.':>11} {'top-3 final in bottom 1/3':>26}")
    for r in res["rows"]:
        where = "cycle end" if r["cycle_end"] else "mid-cycle"
        if r["eta_over_eta_max"] is not None:
            where += f" eta {r['eta_over_eta_max']:.2f}x"
        log(
            f"  {r['step']:>6} {where:<22} {r['spearman']:>11.2f} "
            f"{100 * r['top3_in_bottom_third']:>25.0f}%"
        )


# ----------------------------------------------------------------------------- the driver


def serial_map(fn: Callable, items: Iterable) -> list:
    return [fn(x) for x in items]


def bench_landscape(
    land: Landscape,
    *,
    runs: list[int],
    methods: list[str],
    mapper: Callable,
    root: Path,
    log: Callable[[str], None],
    fresh: bool = False,
    kept: bool = False,
) -> dict[str, Any]:
    """Every method on every run seed of one landscape; the truth; the figures. ``kept``:
    the service's runs are kept under ``root``, so each is run, none read from the store."""
    full = trial_steps(land)
    splits = splits_of(land)
    points = land.grid()
    grid_steps = len(points) * land.score_seeds * full
    budget = land.budget_trials * full
    log(
        f"\n== {land.name}: {land.description}\n"
        f"   {splits.train.n} train / {splits.val.n} val / {splits.test.n} test; "
        f"{full} steps a trial ({_training(land)})\n"
        f"   budget: {land.budget_trials} trials' steps ({budget}) for every method, "
        f"{100 * budget / grid_steps:.1f}% of the grid's"
    )
    truths: dict[int, Truth] = {}
    grids: dict[int, list[float]] = {}
    shifts: dict[int, float] = {}
    for split in sorted({land.split(run) for run in runs}):
        t0 = time.perf_counter()
        truths[split] = Truth(land, cache_dir=CACHE, mapper=mapper, split=split)
        grids[split] = truths[split].score(points)
        best_i = int(np.argmax(grids[split]))
        shifts[split] = truths[split].shift(points[best_i])
        log(
            f"   grid{f' of split {split}' if land.split_follows_seed else ''}: "
            f"{len(points)} points x {land.score_seeds} seeds = {grid_steps} steps "
            f"({time.perf_counter() - t0:.0f} s, cached in {truths[split].path.name}); best "
            f"{_fmt(points[best_i])}: test {100 * grids[split][best_i]:.2f}%, validation "
            f"{100 * shifts[split]:+.2f} points from it"
        )
    skipped: dict[str, str] = {}
    if "gp" in methods and importlib.util.find_spec("torch") is None:
        skipped["gp"] = "torch is not installed (pip install torch): GPSampler needs it"
    records: dict[str, list[dict[str, Any]]] = {m: [] for m in methods if m not in skipped}
    # The peers' runs in one file; the service's, each with the key of its study file.
    store = CACHE / f"peers-{land.name}-{land.runs_key()[:12]}-runs.jsonl"
    service_store = CACHE / f"peers-{land.name}-service.jsonl"
    stored = {} if fresh else _stored(store)
    service_stored = {} if fresh else _stored(service_store, keyed=True)
    keys = {m: land.service_key(m) for m in SERVICE if m in records}

    def keep(rec: dict[str, Any], *, new: bool) -> None:
        records[rec["method"]].append(rec)
        log(_run_line(rec, full) + ("" if new else " [stored]"))
        if new:
            path = service_store if rec["method"] in SERVICE else store
            path.parent.mkdir(parents=True, exist_ok=True)
            with open(path, "a") as f:
                f.write(json.dumps(rec) + "\n")

    for run in runs:
        for variant in [m for m in SERVICE if m in records]:
            same = [
                rec
                for (_, r, key), rec in service_stored.items()
                if r == run and key == keys[variant]
            ]
            if same and not kept:
                # the same study file as a stored run's (the default spelt out): the same run
                keep({**same[0], "method": variant}, new=False)
                continue
            try:
                rec = run_service(land, variant, run, root=root)
            except Pending as exc:
                skipped[variant] = f"pending: the service refuses this study file ({exc})"
                records.pop(variant, None)
                continue
            keep({**rec, "key": keys[variant]}, new=True)
        peers = [m for m in PEERS if m in records]
        for m in peers:
            if (m, run) in stored and stored[m, run]["budget"] == budget:
                keep(stored[m, run], new=False)
        todo = [
            (land.name, m, run, budget)
            for m in peers
            if not ((m, run) in stored and stored[m, run]["budget"] == budget)
        ]
        for rec in mapper(run_peer, todo):
            keep(rec, new=True)
        chosen = [rec["params"] for rows in records.values() for rec in rows if rec["run"] == run]
        truths[land.split(run)].score(chosen)
    best_known = {
        split: max(
            [
                *grids[split],
                *(
                    truths[split].scores[params_key(rec["params"])]
                    for rows in records.values()
                    for rec in rows
                    if land.split(rec["run"]) == split
                ),
            ]
        )
        for split in truths
    }
    for rows in records.values():
        for rec in rows:
            split = land.split(rec["run"])
            true = truths[split].scores[params_key(rec["params"])]
            rec["truth"] = true
            rec["regret"] = 100 * (best_known[split] - true)
            rec["optimism"] = 100 * (rec["estimate"] - true)
            rec["shift"] = 100 * shifts[split]
            rec["net_optimism"] = rec["optimism"] - rec["shift"]
            rec["compute"] = rec["steps"] / grid_steps
            rec["over_budget"] = rec["steps"] > budget
    records = {m: rows for m, rows in records.items() if rows}
    base = "c2f" if "c2f" in records else "tpe"
    return {
        "description": land.description,
        "settings": {
            "training": land.training,
            "network": land.network,
            "space": {p.name: p.toml() for p in land.space},
            "trial_steps": full,
            "service": {"coarse": land.coarse, "fine": land.fine, "optuna": land.optuna},
            "budget_steps": budget,
            "score_seeds": truths[min(truths)].seeds(),
            "split_per_run": land.split_follows_seed,
        },
        "grid": {
            "points": len(points),
            "steps": grid_steps,
            "splits": {
                split: {
                    "best": points[int(np.argmax(grids[split]))],
                    "best_test": max(grids[split]),
                    "best_known_test": best_known[split],
                }
                for split in truths
            },
        },
        "skipped": skipped,
        "methods": {m: {"summary": summarise(rows), "runs": rows} for m, rows in records.items()},
        "paired_base": base,
        "paired": paired(records, base),
    }


def _stored(path: Path, *, keyed: bool = False) -> dict[tuple, dict[str, Any]]:
    """Records of earlier invocations, by (method, run), or (method, run, key) when the
    records carry the key of their settings."""
    if not path.is_file():
        return {}
    out = {}
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError, KeyError):  # a line cut by a kill
            rec = json.loads(line)
            out[
                (rec["method"], rec["run"], rec["key"]) if keyed else (rec["method"], rec["run"])
            ] = rec
    return out


def _training(land: Landscape) -> str:
    return ", ".join(f"{k} {v}" for k, v in land.training.items())


def _fmt(params: dict[str, Any]) -> str:
    return ", ".join(
        f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items()
    )


def _run_line(rec: dict[str, Any], full: int) -> str:
    return (
        f"   run {rec['run']:>2} {rec['method']:<12} {rec['trials']:>3} trials "
        f"({rec['pruned']} pruned, {rec['diverged']} diverged), "
        f"{rec['steps'] / full:5.1f} trial-equivalents, "
        f"{rec['wall']:4.0f} s; chose {_fmt(rec['params'])} (estimate "
        f"{100 * rec['estimate']:.2f}%)"
    )


def print_tables(name: str, res: dict[str, Any], log: Callable[[str], None]) -> None:
    log(f"\n{name}: {res['description']}")
    g = res["grid"]["splits"]
    if len(g) == 1:
        (one,) = g.values()
        log(
            f"  best grid point {_fmt(one['best'])}: {100 * one['best_test']:.2f}%; best known "
            f"{100 * one['best_known_test']:.2f}% (regrets are against it)"
        )
    else:
        known = statistics.fmean(s["best_known_test"] for s in g.values())
        log(
            f"  run r searches and is scored on data split r ({len(g)} splits); the best known "
            f"test accuracy of a split, {100 * known:.2f}% on average, is what its regrets "
            "are against"
        )
    log(
        "  regret, optimism (estimate - truth): test accuracy points; <=0.5, <=1: runs within; "
        "compute: training steps, % of the grid's"
    )
    shift = statistics.fmean(r["shift"] for m in res["methods"].values() for r in m["runs"])
    log(
        "  net: the optimism minus the validation set's shift from the test set "
        f"({shift:+.2f} points on average: validation minus test accuracy of the grid's "
        "best on seeds of its own), the part that is the method's own"
    )
    log(
        f"  {'method':<42} {'runs':>4} {'mean regret':>11} {'worst':>6} {'<=0.5':>6} "
        f"{'<=1':>5} {'compute':>8} {'optimism':>8} {'net':>6} {'trials':>6} {'s/run':>6}"
    )
    for method, m in res["methods"].items():
        s = m["summary"]
        log(
            f"  {LABELS[method]:<42} {s['runs']:>4} {s['mean_regret']:>11.2f} "
            f"{s['worst_regret']:>6.2f} {100 * s['within_0.5']:>5.0f}% "
            f"{100 * s['within_1']:>4.0f}% {100 * s['compute']:>7.1f}% "
            f"{s['optimism']:>+8.2f} {s['net_optimism']:>+6.2f} {s['trials']:>6.1f} "
            f"{s['wall']:>6.0f}"
        )
    finals = [r["final_steps"] for r in res["methods"].get("c2f", {}).get("runs", [])]
    if finals:
        log(
            f"  (c2f's final retrains its choice: {statistics.fmean(finals):.0f} more steps a "
            "run, outside the budget; every choice is retrained the same way for the truth)"
        )
    for method, m in res["methods"].items():
        if m["summary"]["over_budget"]:
            log(
                f"  {LABELS[method]:<42} passed the budget in {m['summary']['over_budget']} "
                "run(s): its figures are not at the same compute"
            )
    for method, why in res["skipped"].items():
        log(f"  {LABELS[method]:<42} skipped: {why}")
    base = res["paired_base"]
    if res["paired"]:
        log(f"  paired regret difference, {base} minus peer (negative: {base} better), 95% CI:")
    for method, d in res["paired"].items():
        ci = "n < 2" if math.isnan(d["low"]) else f"[{d['low']:+.2f}, {d['high']:+.2f}]"
        log(
            f"    vs {method:<20} {d['mean']:+.2f} {ci}  ({base} better in {d['base_wins']}, "
            f"worse in {d['base_losses']} of {d['n']})"
        )
    if res["paired"]:
        log(f"  paired optimism difference, {base} minus peer (negative: {base} more honest):")
    for method, d in res["paired"].items():
        o = d["optimism"]
        ci = "n < 2" if math.isnan(o["low"]) else f"[{o['low']:+.2f}, {o['high']:+.2f}]"
        log(f"    vs {method:<20} {o['mean']:+.2f} {ci}")


def draw(results: dict[str, dict[str, Any]], path: Path) -> None:
    """Regret against compute, one panel per landscape: each run, and each method's mean."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(results), figsize=(5.5 * len(results), 4.5), squeeze=False)
    for ax, (name, res) in zip(axes[0], results.items(), strict=True):
        for method, m in res["methods"].items():
            color = plt.get_cmap("tab20")(METHODS.index(method))  # the same in every panel
            xs = [100 * r["compute"] for r in m["runs"]]
            ys = [r["regret"] for r in m["runs"]]
            ax.scatter(xs, ys, s=14, alpha=0.4, color=color)
            s = m["summary"]
            ax.scatter(
                [100 * s["compute"]],
                [s["mean_regret"]],
                s=90,
                color=color,
                edgecolor="black",
                label=method,
            )
        ax.set_title(f"{name}: regret against compute")
        ax.set_xlabel("training steps, % of the grid's")
        ax.set_ylabel("regret (test accuracy points)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.peers", description=__doc__.split("\n")[0])
    p.add_argument("--landscape", nargs="+", choices=list(LANDSCAPES), default=None)
    p.add_argument("--runs", type=int, default=None, help="paired runs (seeds 0..N-1); 10")
    p.add_argument("--first-run", type=int, default=0, help="seed of the first run")
    p.add_argument(
        "--methods",
        nargs="+",
        choices=list(METHODS),
        default=list(DEFAULT_METHODS),
        help=f"default: {' '.join(DEFAULT_METHODS)}; one mechanism off: {' '.join(ABLATIONS)}",
    )
    p.add_argument("--quick", action="store_true", help="the tiny landscape, one run")
    p.add_argument(
        "--rungs",
        type=int,
        default=0,
        metavar="N",
        help="instead: N random configurations trained to the end; how well each "
        "evaluation point ranks them (can pruning judge a trial there?)",
    )
    p.add_argument("--jobs", type=int, default=1, help="processes for peers and the truth")
    p.add_argument(
        "--fresh",
        action="store_true",
        help="ignore the runs stored in bench/cache/ by earlier calls",
    )
    p.add_argument("--json", action="store_true", help="print the figures as JSON, last line")
    p.add_argument("--figure", type=Path, default=None, help="PNG of regret against compute")
    p.add_argument(
        "--keep",
        type=Path,
        default=None,
        metavar="DIR",
        help="keep the service's runs (study files, databases, logs) in DIR/<landscape>/; "
        "each is run again, not read from bench/cache",
    )
    args = p.parse_args(argv)
    if args.runs is not None and args.runs < 1:
        raise SystemExit(f"error: --runs must be >= 1, got {args.runs}")
    if args.jobs < 1:
        raise SystemExit(f"error: --jobs must be >= 1, got {args.jobs}")
    if args.rungs and args.rungs < 6:
        raise SystemExit(f"error: --rungs needs at least 6 configurations, got {args.rungs}")
    names = args.landscape or (["tiny"] if args.quick else list(DEFAULT_LANDSCAPES))
    n_runs = args.runs or (1 if args.quick else 10)
    runs = list(range(args.first_run, args.first_run + n_runs))
    log = print if not args.json else (lambda line: print(line, file=sys.stderr, flush=True))
    results: dict[str, dict[str, Any]] = {}
    with contextlib.ExitStack() as stack:
        if args.jobs > 1:
            from concurrent.futures import ProcessPoolExecutor

            pool = stack.enter_context(ProcessPoolExecutor(args.jobs))
            mapper: Callable = pool.map
        else:
            mapper = serial_map
        if args.keep is not None:
            root = args.keep.resolve()  # the stages run inside each run's folder
            root.mkdir(parents=True, exist_ok=True)
        else:
            root = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="c2f-peers-")))
        for name in names:
            t0 = time.perf_counter()
            land = LANDSCAPES[name]
            if args.rungs:
                results[name] = rungs(land, trials=args.rungs, mapper=mapper)
                print_rungs(name, results[name], log)
                continue
            res = bench_landscape(
                land,
                runs=runs,
                methods=args.methods,
                mapper=mapper,
                root=root,
                log=log,
                fresh=args.fresh,
                kept=args.keep is not None,
            )
            res["wall"] = time.perf_counter() - t0
            results[name] = res
            print_tables(name, res, log)
            log(f"  ({res['wall']:.0f} s)")
    if args.figure is not None and not args.rungs:
        import matplotlib

        matplotlib.use("Agg")
        draw(results, args.figure)
        log(f"wrote {args.figure}")
    if args.json:
        print(json.dumps({"runs": runs, "landscapes": results}, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
