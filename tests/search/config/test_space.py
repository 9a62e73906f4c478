"""The search-space grammar: every kind of range, its checks, Optuna's view and narrowing's."""

from __future__ import annotations

import math

import optuna
import pytest
from optuna.distributions import CategoricalDistribution, FloatDistribution, IntDistribution

from search.config import space as sp
from search.config.study import StudyDefinitionError, parse_spec
from search.sweep import narrowing
from search.sweep.replicates import Configuration

KINDS = {
    "l2_lambda": [1e-5, 1e-1],
    "rho": {"low": 0.0, "high": 0.9},
    "n_cycles": {"int": [1, 3]},
    "batch_size": {"choice": [50, 100]},
    "hidden": {"choice": [[20], [30, 20]]},
}


def test_each_kind_of_entry_becomes_its_optuna_distribution():
    space = {name: sp.parse_range(name, value) for name, value in KINDS.items()}
    dists = sp.distributions(space)
    assert dists["l2_lambda"] == FloatDistribution(1e-5, 1e-1, log=True)
    assert dists["rho"] == FloatDistribution(0.0, 0.9)
    assert dists["n_cycles"] == IntDistribution(1, 3)
    assert dists["batch_size"] == CategoricalDistribution([50, 100])
    assert dists["hidden"] == CategoricalDistribution(["20", "30-20"])
    assert sp.parse_range("w", {"int": [20, 200], "log": True}).distribution() == (
        IntDistribution(20, 200, log=True)
    )
    assert sp.parse_range("d", {"low": 0.5, "high": 1.0, "step": 0.1}).distribution() == (
        FloatDistribution(0.5, 1.0, step=0.1)
    )


def test_a_suggested_list_choice_comes_back_as_the_list_and_records_round_trip():
    space = {name: sp.parse_range(name, value) for name, value in KINDS.items()}
    study = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=1))
    seen = set()
    for _ in range(12):
        trial = study.ask()
        params = sp.suggest(trial, space)
        assert params["hidden"] in ((20,), (30, 20))
        assert isinstance(params["n_cycles"], int) and 1 <= params["n_cycles"] <= 3
        assert 0.0 <= params["rho"] <= 0.9
        assert sp.decode(space, trial.params) == params
        seen.add(params["hidden"])
        study.tell(trial, 0.5)
    assert seen == {(20,), (30, 20)}
    assert sp.from_record(sp.to_record(space)) == space
    assert sp.to_record(space)["l2_lambda"] == [1e-5, 1e-1]  # as studies recorded it before


@pytest.mark.parametrize(
    "value, words",
    [
        ([0.0, 1.0], "a log range needs bounds > 0"),
        ([0.0, 1.0], "or search it uniformly ({low = 0.0, high = 1.0})"),  # the fix
        ([1.0, 0.1], "low must be < high"),
        ([1.0, 0.1], "swap the bounds ([0.1, 1.0])"),  # the fix
        ({"low": 0.5, "high": 0.5}, "to hold x at 0.5, take it out of [search]"),
        ({"int": [3, 1]}, "swap the bounds ([1, 3])"),
        ({"low": 0.0}, "needs low and high"),
        ({"int": [1.5, 3]}, "int must be [low, high] integers"),
        ({"choice": []}, "non-empty list"),
        ({"choice": [1, 1]}, "repeated choices"),
        ({"low": 0.0, "high": 1.0, "step": 0.3}, "whole number of steps"),
        ({"low": 0.1, "high": 1.0, "log": True, "step": 0.1}, "cannot have a step"),
        ({"lo": 0.0, "high": 1.0}, "unknown keys ['lo']"),
        ("wide", "must be [low, high]"),
    ],
)
def test_a_bad_entry_says_what_is_wrong_and_what_is_allowed(value, words):
    with pytest.raises(sp.RangeError, match=None) as exc:
        sp.parse_range("x", value)
    assert words in str(exc.value)


BASE = {"name": "s", "data": {"name": "digits"}, "training": {"batch_size": 50}}


@pytest.mark.parametrize(
    "search, field, words",
    [
        ({"batch_sise": {"choice": [50]}}, "search.batch_sise", "did you mean 'batch_size'"),
        ({"seed": {"int": [0, 9]}}, "search.seed", "is a setting, not a hyperparameter"),
        ({"n_cycles": {"low": 1.0, "high": 3.0}}, "search.n_cycles", "{int = [1, 3]}"),
        ({"init": [0.1, 1.0]}, "search.init", "init = {choice = [...]}"),
        ({"rho": {"low": 0.0, "high": 1.0}}, "search.rho", "rho = 1 cannot run"),
        ({"hidden": {"choice": [[50], [0]]}}, "search.hidden", "hidden = [0] cannot run"),
        ({"init": {"choice": ["he", "lecun"]}}, "search.init", "init = lecun cannot run"),
    ],
)
def test_a_range_that_cannot_run_everywhere_is_refused_naming_the_field_and_value(
    search, field, words
):
    doc = {**BASE, "search": search}
    if "batch_size" in str(search):
        doc["training"] = {}
    with pytest.raises(StudyDefinitionError) as exc:
        parse_spec(doc, "s.toml")
    assert exc.value.field == field, str(exc.value)
    assert words in str(exc.value)


def test_training_typos_are_refused_with_did_you_mean():
    with pytest.raises(StudyDefinitionError) as exc:
        parse_spec({**BASE, "training": {"n_cycels": 3}}, "s.toml")
    assert exc.value.field == "training.n_cycels" and "did you mean 'n_cycles'" in str(exc.value)


def test_every_training_and_network_field_is_searchable_for_the_built_in_network():
    spec = parse_spec({**BASE, "training": {}, "search": dict(KINDS)}, "s.toml")
    assert {r.kind for r in spec.search.values()} == {"float", "int", "choice"}
    net = spec.network_for({"hidden": (30, 20)})
    assert net.hidden == (30, 20)


def _config(number: int, params: dict, values: list[float]) -> Configuration:
    trials = []
    for i, v in enumerate(values):
        trials.append(
            optuna.trial.create_trial(
                params=params,
                distributions={
                    k: CategoricalDistribution([p])
                    if not isinstance(p, float)
                    else FloatDistribution(p / 2, p * 2 + 1)
                    for k, p in params.items()
                },
                value=v,
                user_attrs={"replicate": i} if i else {},
            )
        )
        trials[-1].number = number + i
    return Configuration(params, trials)


def test_a_choice_keeps_the_levels_within_noise_drops_the_others_and_integers_stay_integers():
    coarse = {
        "batch_size": sp.parse_range("batch_size", {"choice": [50, 100, 200, 400]}),
        "n_hidden": sp.parse_range("n_hidden", {"int": [10, 200], "log": True}),
        "rho": sp.parse_range("rho", {"low": 0.0, "high": 0.9}),
    }
    configs = [
        _config(0, {"batch_size": 100, "n_hidden": 50, "rho": 0.5}, [0.90, 0.91, 0.89]),
        _config(10, {"batch_size": 50, "n_hidden": 60, "rho": 0.4}, [0.895, 0.90, 0.89]),
        _config(20, {"batch_size": 200, "n_hidden": 150, "rho": 0.1}, [0.60, 0.61, 0.59]),
    ]
    n = narrowing.narrow(configs, coarse, margin=0.1, top_k=1)
    assert n.ranges["batch_size"].choices == (50, 100, 400)  # 400 never tried: kept
    assert n.dropped == {"batch_size": [200]}
    assert any("dropped 200" in note for note in n.notes)
    r = n.ranges["n_hidden"]
    assert r.kind == "int" and isinstance(r.low, int) and r.low <= 50 and r.high >= 60
    assert r.high < 150
    rho = n.ranges["rho"]
    assert rho.kind == "float" and not rho.log and rho.low < 0.4 and 0.5 < rho.high < 0.9
    assert math.isclose(0.4 - rho.low, 0.1 * sp.LINEAR_DECADE * 0.9)
