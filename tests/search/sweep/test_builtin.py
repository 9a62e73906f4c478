"""The built-in network as ``train(hp, data, report)``: what it reports at each point."""

from __future__ import annotations

import pytest

from model.train import METRICS
from search.config.study import StudyDefinitionError, parse_spec
from search.sweep import builtin
from search.sweep.user_train import hyperparameters, user_data

STUDY = {
    "name": "t",
    "network": {"hidden": [8]},
    "training": {"batch_size": 30, "n_s": 10, "n_cycles": 2, "evals_per_cycle": 4},
    "search": {"l2_lambda": [1e-5, 1e-1]},
}


@pytest.mark.parametrize("train_metrics", ["running", "full"])
def test_every_point_reports_validation_accuracy_and_every_curve(tiny_splits, train_metrics):
    """The pruner reads val_acc at each point; the report draws the other curves."""
    spec = parse_spec({**STUDY, "training": {**STUDY["training"], "train_metrics": train_metrics}})
    hp = hyperparameters(spec, "coarse", {"l2_lambda": 1e-3}, seed=0, n_train=300)
    assert hp["train_metrics"] == train_metrics
    assert builtin.config_of(hp).train_metrics == train_metrics
    reports = []
    result = builtin.train(
        hp,
        user_data(tiny_splits, "n_by_d", test=False),
        lambda step, value, **curves: reports.append((step, value, curves)),
    )
    assert [step for step, _, _ in reports] == [5, 10, 15, 20, 25, 30, 35, 40]
    assert all(set(curves) | {"val_acc"} == set(METRICS) for _, _, curves in reports)
    assert all(0.0 <= value <= 1.0 for _, value, _ in reports)
    assert result["val_acc"] == reports[-1][1]


def test_train_metrics_is_a_setting_checked_by_name():
    with pytest.raises(StudyDefinitionError, match="training.train_metrics") as info:
        parse_spec({**STUDY, "training": {"train_metrics": "exact"}})
    assert "'running', 'full'" in str(info.value)
    with pytest.raises(StudyDefinitionError, match="is a setting, not a hyperparameter"):
        parse_spec({**STUDY, "search": {"train_metrics": {"choice": ["running", "full"]}}})
    assert parse_spec(STUDY).train_config("coarse", {"l2_lambda": 0.1}).train_metrics == "running"
