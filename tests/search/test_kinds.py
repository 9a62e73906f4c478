"""Every kind of range, end to end: log float, float, integer, choice and list choice,
for the built-in network and for a user's function, through coarse, fine, final and
experiment grids; and the mistakes refused before any trial."""

from __future__ import annotations

import json
import textwrap

import optuna
import pytest
from optuna.trial import TrialState

from search import coarse, experiment, final, fine, report
from search.config import space as sp
from search.config.study import load_spec
from search.sweep import grid
from search.sweep import studies as st
from tests.search.conftest import dump_toml

STAGES = {
    "coarse": {"trials": 6, "replicates": 2, "replicate_top": 2},
    "fine": {"trials": 3, "top_k": 2, "replicates": 1},
    "final": {"seeds": 1, "holdout": 50},
    "optuna": {"workers": 1, "pruner": "none", "seed": 3},
}

BUILT_IN = {
    "name": "kinds",
    "data": {"name": "digits", "n_val": 300},
    "network": {"init": "he"},
    "training": {"n_s": 12, "evals_per_cycle": 2},
    "search": {
        "l2_lambda": [1e-5, 1e-2],  # log float
        "rho": {"low": 0.0, "high": 0.5},  # float
        "n_cycles": {"int": [1, 2]},  # integer
        "batch_size": {"choice": [50, 100]},  # choice
        "hidden": {"choice": [[20], [30, 20]]},  # list choice
    },
    **STAGES,
}

OWN_CODE = """
def train(hp, data, report):
    assert isinstance(hp["width"], int) and 8 <= hp["width"] <= 64, hp["width"]
    assert hp["act"] in ("relu", "tanh"), hp["act"]
    assert hp["layers"] in ([16], [16, 8]), hp["layers"]
    assert 0.0 <= hp["dropout"] <= 0.5 and 1e-5 <= hp["l2_lambda"] <= 1e-2
    value = 0.5 + 0.1 * (hp["act"] == "relu") - abs(hp["dropout"] - 0.2) + hp["width"] / 1000
    for step in range(1, hp["total_steps"] + 1, hp["eval_every"]):
        report(step, value)
    result = {"val_acc": value}
    if data.test is not None:
        result["test_acc"] = value - 0.01
    return result
"""

OWN = {
    "name": "ownkinds",
    "data": {"name": "digits", "n_val": 300},
    "model": {
        "train": "own.py:train",
        "params": {"width": 16, "act": "relu", "layers": [16], "dropout": 0.0},
    },
    "training": {"batch_size": 100, "n_s": 12},
    "search": {
        "l2_lambda": [1e-5, 1e-2],
        "dropout": {"low": 0.0, "high": 0.5},
        "width": {"int": [8, 64], "log": True},
        "act": {"choice": ["relu", "tanh"]},
        "layers": {"choice": [[16], [16, 8]]},
    },
    **STAGES,
}


def _write(tmp_path, doc: dict, code: str | None = None):
    if code is not None:
        (tmp_path / "own.py").write_text(textwrap.dedent(code))
    path = tmp_path / f"{doc['name']}.toml"
    path.write_text(dump_toml(doc))
    return path


def _trials(path, stage: str) -> list[optuna.trial.FrozenTrial]:
    spec = load_spec(path)
    return st.load_existing(spec, stage).get_trials(deepcopy=False)


@pytest.mark.parametrize(
    "doc, code",
    [
        (BUILT_IN, None),
        # The grids of every kind run the user's code below (the suite's time budget).
        pytest.param(OWN, OWN_CODE, marks=pytest.mark.slow),
    ],
    ids=["built-in", "own"],
)
def test_every_kind_runs_coarse_fine_and_final(tmp_path, doc, code, capsys):
    path = _write(tmp_path, doc, code)
    args = ["--study", str(path)]
    assert coarse.main(args) == 0
    coarse_trials = _trials(path, "coarse")
    assert not [t for t in coarse_trials if t.state == TrialState.FAIL], [
        t.user_attrs.get("reason") for t in coarse_trials
    ]
    space = {k: sp.parse_range(k, v) for k, v in doc["search"].items()}
    for t in coarse_trials:
        values = sp.decode(space, t.params)
        assert all(space[k].contains(v) for k, v in values.items()), values
    assert fine.main(args) == 0
    out = capsys.readouterr().out
    assert "fine ranges:" in out
    fine_study = st.load_existing(load_spec(path), "fine")
    recorded = sp.from_record(fine_study.user_attrs["ranges"])
    assert {k: r.kind for k, r in recorded.items()} == {k: r.kind for k, r in space.items()}
    int_name = next(k for k, r in space.items() if r.kind == "int")
    assert isinstance(recorded[int_name].low, int) and isinstance(recorded[int_name].high, int)
    for name in space:  # the top table prints every searched parameter
        assert name in out
    assert fine_study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    assert final.main(args) == 0
    result = json.loads((tmp_path / "out" / doc["name"] / "final" / "result.json").read_text())
    assert set(result["params"]) == set(space)
    assert report.main(args) == 0
    figures = {p.name for p in (tmp_path / "out" / doc["name"] / "report").glob("*.png")}
    for name in space:  # one figure per searched parameter
        assert f"{doc['name']}_val_acc_vs_{name}.png" in figures


EXPERIMENT_BUILT_IN = {
    "name": "gridkinds",
    "experiment": {"kind": "curves"},
    "grid": {"l2_lambda": [1e-4, 1e-2], "n_cycles": [1, 2], "hidden": [[20], [30, 20]]},
    "data": {"name": "digits", "n_val": 300},
    "training": {"n_s": 12, "batch_size": 100, "evals_per_cycle": 2},
    "optuna": {"workers": 1},
}

EXPERIMENT_OWN = {
    "name": "gridown",
    "experiment": {"kind": "curves"},
    "grid": {"dropout": [0.0, 0.3], "width": [8, 32], "act": ["relu", "tanh"]},
    "data": {"name": "digits", "n_val": 300},
    "model": OWN["model"],
    "training": {"n_s": 12, "batch_size": 100, "l2_lambda": 1e-3},
    "optuna": {"workers": 1},
}


@pytest.mark.parametrize(
    "doc, code, table",
    [(EXPERIMENT_BUILT_IN, None, "network"), (EXPERIMENT_OWN, OWN_CODE, "model")],
    ids=["built-in", "own"],
)
def test_an_experiment_grid_runs_every_kind_with_the_network_it_names(tmp_path, doc, code, table):
    path = _write(tmp_path, doc, code)
    assert experiment.main([str(path)]) == 0
    exp, study, rows = grid.results(path)
    assert len(rows) == 8 and all(r.trial is not None for r in rows)
    for row in rows:
        assert row.trial.state == TrialState.COMPLETE
        assert "test_acc" in row.trial.user_attrs
    if table == "model":  # the user's function ran with the point's keys: its value, exactly
        for row in rows:
            p = row.point
            want = 0.5 + 0.1 * (p["act"] == "relu") - abs(p["dropout"] - 0.2) + p["width"] / 1000
            assert row.trial.value == pytest.approx(want)
            assert row.trial.user_attrs["test_acc"] == pytest.approx(want - 0.01)
    else:  # the built-in network trained each point's layers
        assert {tuple(r.point["hidden"]) for r in rows} == {(20,), (30, 20)}
        assert all(r.trial.value > 0.2 for r in rows)  # trained: chance is 0.1


def test_an_experiment_naming_a_missing_function_is_refused_before_any_trial(tmp_path, capsys):
    doc = {**EXPERIMENT_OWN, "model": {**OWN["model"], "train": "does_not_exist.py:train"}}
    path = _write(tmp_path, doc)
    assert experiment.main([str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "does_not_exist.py" in err[0] and "[model.train]" in err[0]
    assert not list(tmp_path.glob("*.db"))


@pytest.mark.parametrize(
    "change, words",
    [
        ({"training": {"batch_sise": 20, "n_s": 12}}, "[training.batch_sise] unknown key"),
        ({"training": {"n_cycels": 3, "n_s": 12}}, "did you mean 'n_cycles'"),
        ({"search": {"depth": {"int": [1, 3]}}}, "[search.depth] is not a parameter"),
        ({"training": {"depth": 3, "n_s": 12}}, "declared with its default in [model.params]"),
        (
            {"search": {"rho": {"low": 0.5, "high": 1.5}}},
            "[search.rho] rho = 1 cannot run: rho must be in [0, 1)",
        ),
    ],
)
def test_mistakes_get_one_line_and_exit_2_with_no_trial_run(tmp_path, capsys, change, words):
    doc = {**OWN, **change} if "depth" in str(change) else {**BUILT_IN, **change}
    if "training" in change and "depth" in str(change):
        doc["training"] = {**OWN["training"], **change["training"]}
    path = _write(tmp_path, doc, OWN_CODE)
    assert coarse.main(["--study", str(path)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and words in err[0], err
    assert not list(tmp_path.glob("*.db"))
