"""The built-in network as a training function: ``train(hp, data, report)``.

The service runs every network through the same contract (the one objective,
:class:`search.sweep.objective.Objective`, and :func:`search.sweep.user_train.run_final`);
this is the implementation for the network of a study's ``[network]`` table, as a
user's function is another. ``hp`` holds every TrainConfig field (the schedule
resolved: ``n_s`` and ``eval_every`` in steps) and every ``[network]`` field;
``data`` is in the samples x features layout.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import fields
from pathlib import Path
from typing import Any

from model.network import Network
from model.train import TrainConfig, fit

NETWORK_KEYS = ("hidden", "batch_norm", "init", "sigma", "bn_alpha")
_CONFIG_KEYS = tuple(f.name for f in fields(TrainConfig) if f.name != "n_s_epochs")


def config_of(hp: dict[str, Any]) -> TrainConfig:
    """The TrainConfig an ``hp`` dict describes (``n_s`` already resolved to steps)."""
    return TrainConfig(**{k: hp[k] for k in _CONFIG_KEYS if k in hp})


def network_of(hp: dict[str, Any], d: int, n_classes: int) -> Network:
    return Network(
        d,
        tuple(hp["hidden"]),
        n_classes,
        batch_norm=hp["batch_norm"],
        init=hp["init"],
        sigma=hp["sigma"],
        bn_alpha=hp["bn_alpha"],
        seed=hp["seed"],
    )


def train(hp: dict[str, Any], data: Any, report: Callable[..., None]) -> dict[str, float]:
    """Train the built-in network; report every evaluation point; the final metrics.

    Each point reports the validation accuracy (the pruner's value: the validation set
    evaluated in full) with the other curves (``train_loss``, ``train_cost``,
    ``train_acc``, ``val_loss``, ``val_cost``); the training ones are running or full
    as ``hp["train_metrics"]`` says (:class:`model.train.TrainConfig`).

    With ``data.test`` (the final run, experiment grids) the test set is evaluated
    once at the end; with ``hp["out_dir"]`` the network is saved there
    (``network.npz``, with its config).
    """
    config = config_of(hp)
    net = network_of(hp, data.d, data.n_classes)

    def on_evaluate(step: int, metrics: dict[str, float]) -> None:
        report(step, metrics["val_acc"], **{k: v for k, v in metrics.items() if k != "val_acc"})

    # The worker's BLAS limit (set by the pool or by run_final) applies, not fit's own.
    history = fit(net, data, config, on_evaluate=on_evaluate, blas_threads=None)
    result = {"val_acc": float(history.final["val_acc"])}
    if data.test is not None:
        test = net.evaluate(data.test.X, data.test.y, l2_lambda=config.l2_lambda)
        result |= {"test_acc": float(test["accuracy"]), "test_loss": float(test["loss"])}
    if hp.get("out_dir"):
        from dataclasses import asdict

        net.save(Path(hp["out_dir"]) / "network.npz", config=asdict(config))
    return result
