"""Every pruner the study files offer prunes, and pruned trials keep their curves."""

import contextlib
import io
import json

import numpy as np
import pytest
from optuna.trial import TrialState

from model.network import Network
from search import coarse, final
from search.config.study import load_spec
from search.sweep import studies as st
from search.sweep.objective import curves_of


@pytest.mark.parametrize(
    "pruner",
    [
        "median",
        "percentile",
        # Optuna's rung pruners take the path of the two above (the suite's time budget).
        pytest.param("successive_halving", marks=pytest.mark.slow),
        pytest.param("hyperband", marks=pytest.mark.slow),
        "none",
    ],
)
def test_each_pruner_prunes_and_pruned_trials_keep_their_curves(quick_study, pruner):
    path = quick_study(
        coarse={"trials": 12},
        # Wide eta range: some trials are clearly worse, so every pruner has work.
        search={"l2_lambda": [1e-5, 1e-1], "eta_max": [1e-4, 0.5]},
        optuna={"pruner": pruner, "n_startup_trials": 2},
    )
    with contextlib.redirect_stdout(io.StringIO()):
        assert coarse.main(["--study", str(path)]) == 0
    study = st.open_study(load_spec(path), "coarse")
    trials = study.get_trials()
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert len(pruned) + len(complete) == 12
    if pruner == "none":
        assert not pruned
        return
    assert pruned, f"{pruner} pruned nothing"
    full = max(len(t.intermediate_values) for t in complete)
    for t in pruned:
        curves = curves_of(t)
        # The curves up to where it stopped, as the dashboard shows them.
        assert len(curves["val_acc"]) == len(t.intermediate_values) < full
        assert curves["val_acc"] == [t.intermediate_values[s] for s in curves["step"]]
        assert t.user_attrs["reason"].startswith("pruned at step")
        assert t.user_attrs["diverged"] is False
        assert 0 < t.user_attrs["epochs_run"] < max(c.user_attrs["epochs_run"] for c in complete)


def test_final_trains_on_train_and_val_and_saves_a_network(quick_study):
    path = quick_study(coarse={"trials": 3}, optuna={"pruner": "none"})
    spec = load_spec(path)
    with contextlib.redirect_stdout(io.StringIO()):
        assert coarse.main(["--study", str(path)]) == 0
        assert final.main(["--study", str(path)]) == 0
    out = spec.out_dir() / "final"
    result = json.loads((out / "result.json").read_text())
    splits = st.prepare_for(spec).open()
    holdout = spec.final.holdout
    assert result["split"] == {
        "train": splits.train.n + splits.val.n - holdout,
        "train_from_val": splits.val.n - holdout,
        "holdout": holdout,
        "test": splits.test.n,
    }
    best = st.top_trials(st.open_study(spec, "coarse"), 1)[0]
    assert result["params"] == best.params and result["configuration"] == best.number
    net, config = Network.load(out / "network.npz")
    assert config["l2_lambda"] == best.params["l2_lambda"]
    test = net.evaluate(splits.test.X, splits.test.y, l2_lambda=config["l2_lambda"])
    assert test["accuracy"] == pytest.approx(result["test_acc"])
    assert np.isfinite(result["runs"]["0"]["test_loss"]) and result["test_acc"] > 0.85
    history = json.loads((out / "history.json").read_text())
    assert len(history["val_acc"]) == len(history["step"]) > 1
