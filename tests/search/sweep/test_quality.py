"""Better answers at the same compute: the model of the landscape, the race, the fine stage
carrying the coarse runs over, pruning at a cycle's end. Each on a small synthetic landscape
whose right answer is known."""

from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import math

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from model.train import TrainConfig
from search import coarse, final, fine
from search.config import space as sp
from search.config.study import load_spec
from search.sweep import narrowing, surrogate
from search.sweep import replicates as rep
from search.sweep import studies as st
from search.sweep.objective import CURVES, pruning_window
from search.sweep.retrain import chosen_configuration, kept_off_the_edge

ETA = {"eta_max": sp.parse_range("eta_max", [1e-3, 1.0])}


def _study(points, space=ETA):
    """An in-memory study holding runs ``(params, value, replicate)`` (value None: diverged)."""
    study = optuna.create_study(direction="maximize")
    for params, value, replicate in points:
        attrs = {"diverged": value is None, rep.REPLICATE: replicate}
        study.add_trial(
            optuna.trial.create_trial(
                state=TrialState.COMPLETE if value is not None else TrialState.PRUNED,
                value=value,
                params=params,
                distributions=sp.distributions(space),
                user_attrs=attrs,
            )
        )
    return study


def _bowl(eta: float) -> float:
    """Accuracy with its best at eta_max = 0.1, falling by 5 points a decade squared."""
    return 0.9 - 0.05 * (math.log10(eta) + 1.0) ** 2


def test_the_model_prefers_a_good_neighbourhood_to_the_luckiest_run():
    rng = np.random.default_rng(0)
    etas = np.geomspace(1e-3, 1.0, 16)
    points = [({"eta_max": float(e)}, _bowl(e) + rng.normal(0, 0.01), 0) for e in etas]
    # One lucky run far from the optimum: the best single run, by 3 points.
    points.append(({"eta_max": 0.004}, 0.93, 0))
    study = _study(points)
    configs = rep.study_configurations(study)
    assert configs[0].params["eta_max"] == 0.004  # the best mean is the lucky one
    ranked, model = surrogate.rank(configs, study.get_trials(), ETA, n_val=300)
    assert model is not None and model.n_runs == len(points)
    best = ranked[0].config.params["eta_max"]
    assert abs(math.log10(best) - math.log10(0.1)) <= 0.3, best
    # The lucky run is predicted well below what it scored.
    lucky = next(r for r in ranked if r.config.params["eta_max"] == 0.004)
    assert lucky.mean < 0.93 - 0.02


def test_diverged_neighbours_lower_a_point_near_the_cliff():
    # Two configurations as good on their runs; beyond the first one, training diverges.
    points = [
        ({"eta_max": 0.3}, 0.90, 0),
        ({"eta_max": 0.35}, None, 0),
        ({"eta_max": 0.4}, None, 0),
        ({"eta_max": 0.5}, None, 0),
        ({"eta_max": 0.03}, 0.90, 0),
        ({"eta_max": 0.02}, 0.89, 0),
        ({"eta_max": 0.045}, 0.89, 0),
        ({"eta_max": 0.003}, 0.80, 0),
        ({"eta_max": 0.001}, 0.70, 0),
    ]
    study = _study(points)
    ranked, _ = surrogate.rank(rep.study_configurations(study), study.get_trials(), ETA)
    assert ranked[0].config.params["eta_max"] == 0.03
    # A diverged run counts as the worst value reached, not as chance.
    params, values = surrogate.observations(study.get_trials())
    assert min(values) == 0.70 and len(values) == len(points)


def test_the_robust_choice_keeps_away_from_the_edge_of_a_cliff():
    # A plateau from 0.05 to 0.3, rising a little towards its edge; from 0.4 on, training
    # diverges, and at 0.35 it falls off. The robust choice sits further from the edge
    # than the model's best mean, and within one run's seed noise of it.
    etas = [0.001, 0.003, 0.01, 0.03, 0.05, 0.08, 0.12, 0.18, 0.25, 0.3, 0.35, 0.4, 0.6, 1.0]
    acc = {0.001: 0.70, 0.003: 0.78, 0.01: 0.84, 0.03: 0.88, 0.35: 0.80}

    def value(e: float) -> float | None:
        if e >= 0.4:
            return None
        return acc.get(e, 0.895 + 0.01 * math.log10(e / 0.05))  # 0.895 .. 0.903 on the plateau

    study = _study([({"eta_max": e}, value(e), 0) for e in etas])
    configs = rep.study_configurations(study)
    trials = study.get_trials()
    by_mean, model = surrogate.rank(configs, trials, ETA, n_val=5000)
    by_worst, _ = surrogate.rank(configs, trials, ETA, n_val=5000, robust=True)
    assert model is not None
    edge, safe = by_mean[0].config.params["eta_max"], by_worst[0].config.params["eta_max"]
    assert safe < edge, (edge, safe)
    assert by_worst[0].mean >= by_mean[0].mean - model.noise_sd
    # Each keeps its own posterior mean: the estimate of the choice is not the worst case.
    assert by_worst[0].mean == next(r.mean for r in by_mean if r.config is by_worst[0].config)
    # No run diverged: no cliff to keep away from, and the choice is the model's.
    slope = _study([({"eta_max": e}, value(e) or 0.75, 0) for e in etas])
    configs = rep.study_configurations(slope)
    by_mean, _ = surrogate.rank(configs, slope.get_trials(), ETA, n_val=5000)
    robust, _ = surrogate.rank(configs, slope.get_trials(), ETA, n_val=5000, robust=True)
    assert [r.config.number for r in robust] == [r.config.number for r in by_mean]


def test_the_robust_choice_keeps_a_peak_the_model_can_tell_from_the_rest():
    """Only configurations within one run's seed noise of the best are judged by their
    distance from the cliff: a clear peak next to it is still chosen, not a plateau 10
    points lower that is further from the edge."""
    etas = [0.001, 0.003, 0.01, 0.03, 0.05, 0.08, 0.12, 0.18, 0.25, 0.5, 0.6, 1.0]
    acc = {0.001: 0.70, 0.25: 0.86, 0.5: 0.85}  # the plateau 0.85; from 0.6 on, it diverges
    points = [({"eta_max": e}, None if e >= 0.6 else acc.get(e, 0.85), 0) for e in etas]
    points += [({"eta_max": 0.35}, v, i) for i, v in enumerate((0.95, 0.951, 0.949))]
    study = _study(points)
    configs, trials = rep.study_configurations(study), study.get_trials()
    by_mean, model = surrogate.rank(configs, trials, ETA, n_val=5000)
    robust, _ = surrogate.rank(configs, trials, ETA, n_val=5000, robust=True)
    assert model is not None and by_mean[0].config.params["eta_max"] == 0.35
    assert by_mean[1].mean < by_mean[0].mean - model.noise_sd  # no other is alike
    assert robust[0].config.params["eta_max"] == 0.35


def test_the_robust_choice_measures_from_diverged_runs_of_the_coarse_stage_too():
    """A fine stage's runs all trained (its ranges stop short of the cliff), but the
    coarse stage's diverged above: of the fine configurations alike within the seed
    noise, the one furthest from those is chosen, the distances in the coarse ranges."""
    fine_eta = {"eta_max": sp.parse_range("eta_max", [0.1, 0.5])}
    values = {0.1: 0.868, 0.15: 0.870, 0.2: 0.871, 0.3: 0.871, 0.4: 0.872, 0.45: 0.872}
    study = _study([({"eta_max": e}, v, 0) for e, v in values.items()], space=fine_eta)
    configs, trials = rep.study_configurations(study), study.get_trials()
    by_mean, model = surrogate.rank(configs, trials, fine_eta, n_val=5000)
    assert model is not None and by_mean[0].config.params["eta_max"] >= 0.4
    robust, _ = surrogate.rank(configs, trials, fine_eta, n_val=5000, robust=True)
    assert [r.config.number for r in robust] == [r.config.number for r in by_mean]  # none
    coarse_failures = [{"eta_max": 0.6}, {"eta_max": 0.9}]
    robust, _ = surrogate.rank(
        configs,
        trials,
        fine_eta,
        n_val=5000,
        robust=True,
        failures=coarse_failures,
        failure_space=ETA,
    )
    chosen = robust[0]
    assert chosen.config.params["eta_max"] < by_mean[0].config.params["eta_max"]
    assert chosen.mean >= by_mean[0].mean - model.noise_sd


def test_the_encoder_puts_a_choice_in_one_hot_columns_and_numbers_in_the_unit_range():
    space = {
        "act": sp.parse_range("act", {"choice": ["relu", "tanh", "elu"]}),
        "eta_max": sp.parse_range("eta_max", [1e-3, 1.0]),
        "width": sp.parse_range("width", {"int": [8, 64]}),
    }
    point = {"act": "tanh", "eta_max": 0.01, "width": 20}
    x = surrogate.encoder(space)(point)
    assert len(x) == 5 and x[:3] == [0.0, 1.0, 0.0]  # the choice's one-hot columns
    assert x[3] == pytest.approx(1 / 3) and x[4] == pytest.approx(12 / 56)  # log; linear


def test_the_noise_floor_is_the_binomial_variance_of_the_best_accuracy():
    assert surrogate.noise_floor([0.5, 0.9], 100) == pytest.approx(0.9 * 0.1 / 100)
    assert surrogate.noise_floor([0.5, 0.9], None) == 0.0
    assert surrogate.noise_floor([0.5, 3.0], 100) == 0.0  # not accuracies: no floor


def test_too_few_runs_fall_back_to_the_means():
    study = _study([({"eta_max": 0.1}, 0.9, 0), ({"eta_max": 0.2}, 0.8, 0)])
    ranked, model = surrogate.rank(rep.study_configurations(study), study.get_trials(), ETA)
    assert model is None and [r.mean for r in ranked] == [0.9, 0.8]


# ----------------------------------------------------------------------------- the race

MEANS = {0.01: 0.90, 0.1: 0.86, 0.5: 0.80}  # eta_max -> true accuracy
SEED_EFFECT = [0.0, -0.02, 0.015, 0.01, -0.01, 0.02, -0.015, 0.005]  # shared by every config


def _run_queue(study, means, rng, noise):
    """Run every queued trial on the synthetic landscape: the seed's effect is the same for
    every configuration (shared seeds), plus noise of its own."""
    while any(t.state == TrialState.WAITING for t in study.get_trials()):
        trial = study.ask()
        eta = trial.suggest_float("eta_max", 1e-3, 1.0, log=True)
        k = rep.replicate_index(trial)
        study.tell(trial, means[eta] + SEED_EFFECT[k] + rng.normal(0, noise))


def _race(runs, rng, means=MEANS, noise=0.003):
    study = _study([({"eta_max": e}, m + SEED_EFFECT[0], 0) for e, m in means.items()])
    contenders = rep.study_configurations(study)
    rounds = []
    while True:
        queued, race = rep.race_round(study, contenders, runs=runs)
        if not queued:
            return study, race, rounds
        rounds.append(queued)
        _run_queue(study, means, rng, noise)


def test_the_race_puts_out_the_contenders_the_paired_seeds_separate():
    study, race, rounds = _race(runs=12, rng=np.random.default_rng(1))
    assert race.ended == "one contender left"
    (winner,) = race.alive(rep.study_configurations(study))
    assert winner.params == {"eta_max": 0.01}
    assert {p["eta_max"] for p in race.out} == {0.1, 0.5}
    # Three contenders in the first two rounds (none is out before 3 shared seeds); the
    # spent runs are all on the study.
    assert rounds[:2] == [3, 3] and race.spent == sum(rounds) <= 12
    assert sum(rep.is_replicate(t) for t in study.get_trials()) == race.spent
    # Recorded on the study: called again, it stays ended and queues nothing.
    assert rep.race_round(study, [], runs=12)[0] == 0
    assert study.user_attrs[rep.RACE]["ended"] == "one contender left"


def test_the_race_stops_before_passing_its_runs():
    close = {0.01: 0.90, 0.1: 0.899, 0.5: 0.898}  # within the noise: nobody is put out
    study, race, rounds = _race(runs=4, rng=np.random.default_rng(2), means=close, noise=0.01)
    # said as it is: 3 of the 4 runs spent, not "spent"
    assert race.ended == "another round of 3 would pass its 4 runs" and race.out == []
    assert rounds == [3] and race.spent == 3  # a second round of 3 would pass the 4 runs
    study, race, rounds = _race(runs=6, rng=np.random.default_rng(2), means=close, noise=0.01)
    assert race.ended == "its 6 runs are spent" and rounds == [3, 3] and race.spent == 6


def test_a_command_that_read_the_race_before_another_queued_its_round_passes_no_runs():
    close = {0.01: 0.90, 0.1: 0.899, 0.5: 0.898}
    study = _study([({"eta_max": e}, m, 0) for e, m in close.items()])
    contenders = rep.study_configurations(study)
    before = study.user_attrs.get(rep.RACE)  # what a second command read: no race yet
    assert rep.race_round(study, contenders, runs=4)[0] == 3  # the first command's round
    study.set_user_attr(rep.RACE, before or rep.Race([c.params for c in contenders]).as_dict())
    queued, race = rep.race_round(study, contenders, runs=4)  # the second: trials as now
    assert queued == 0 and race.spent == 3  # the round it sees queued counts: no second
    assert race.ended == "another round of 3 would pass its 4 runs"
    assert sum(rep.is_replicate(t) for t in study.get_trials()) == 3


def test_a_race_that_has_not_ended_keeps_final_waiting(quick_study):
    path = quick_study(coarse={"trials": 4}, fine={"race_runs": 2})
    spec = load_spec(path)
    assert _quiet(coarse.main, ["--study", str(path)])[0] == 0
    study = st.open_study(spec, "coarse")
    study.set_user_attr(rep.RACE, rep.Race([{"l2_lambda": 1e-3}]).as_dict())
    spec = spec.__class__(**{**spec.__dict__, "coarse": spec.fine})  # coarse now races
    with pytest.raises(ValueError, match="race between the best configurations has not ended"):
        chosen_configuration(spec)


# ----------------------------------------------------------------------------- narrowing


def test_model_narrowing_keeps_an_optimum_next_to_the_cliff():
    # Accuracy rises with eta_max up to 0.25; from 0.3 on, training diverges.
    etas = [0.001, 0.003, 0.01, 0.03, 0.07, 0.12, 0.18, 0.25, 0.3, 0.4, 0.6, 1.0]
    points = [
        ({"eta_max": e}, (0.8 + 0.04 * math.log10(e / 0.001) if e < 0.3 else None), 0)
        for e in etas
    ]
    study = _study(points)
    configs = rep.study_configurations(study)
    n = narrowing.narrow(
        configs, ETA, margin=0.1, top_k=2, mode="model", trials=study.get_trials(), n_val=1000
    )
    r = n.ranges["eta_max"]
    assert r.low <= 0.25 <= r.high  # the optimum is inside
    assert r.high < 1.0  # and most of the diverging region is cut off
    assert n.sigma is not None and n.within[0].params["eta_max"] >= 0.12


def test_the_fine_stage_carries_over_the_coarse_runs_inside_its_ranges_only():
    points = [({"eta_max": e}, 0.8, 0) for e in (0.002, 0.05, 0.08)] + [
        ({"eta_max": 0.06}, None, 0),
        ({"eta_max": 0.07}, 0.81, 1),
    ]
    trials = _study(points).get_trials()
    curves = {"step": [10, 20], "val_acc": [0.7, 0.8], "wall_time": 1.0}
    trials[1]._system_attrs[CURVES] = curves  # as the objective records them
    ranges = {"eta_max": ETA["eta_max"].narrowed(0.04, 0.1)}
    copies = narrowing.carried_over(trials, ranges)
    # their curves come with them: the fine stage's figures draw them
    assert next(t for t in copies if t.params["eta_max"] == 0.05).system_attrs[CURVES] == curves
    assert sorted(t.params["eta_max"] for t in copies) == [0.05, 0.06, 0.07, 0.08]
    assert {t.user_attrs[narrowing.FROM_COARSE] for t in copies} == {1, 2, 3, 4}
    diverged = next(t for t in copies if t.params["eta_max"] == 0.06)
    assert diverged.state == TrialState.PRUNED and diverged.user_attrs["diverged"]
    assert rep.is_replicate(next(t for t in copies if t.params["eta_max"] == 0.07))
    assert all("epochs_run" not in t.user_attrs for t in copies)  # no training of their own


# ----------------------------------------------------------------------------- pruning


def test_pruning_is_asked_only_at_the_end_of_a_cycle(quick_study):
    spec = load_spec(quick_study(optuna={"warmup_cycles": 0.5}))
    three = TrainConfig(schedule="cyclical", n_s=100, n_cycles=3, evals_per_cycle=4)
    assert pruning_window(spec, three, 1000) == (200, 250)  # the end of cycle 1 only
    one = TrainConfig(schedule="cyclical", n_s=100, n_cycles=1, evals_per_cycle=4)
    assert pruning_window(spec, one, 1000) == (math.inf, 0)  # the end is the result
    later = load_spec(quick_study("later", optuna={"warmup_cycles": 1.5}))
    assert pruning_window(later, three, 1000) == (400, 450)
    step = TrainConfig(schedule="step", eta=0.01, n_epochs=4, batch_size=100)
    assert pruning_window(spec, step, 1000) == (5.0, 40)  # half an epoch on, as before


# ----------------------------------------------------------------------------- end to end


def _quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        code = fn(*args)
    return code, out.getvalue()


def test_coarse_fine_final_carry_race_and_choose_by_the_model_by_default(quick_study):
    path = quick_study(
        training={"n_cycles": 1, "evals_per_cycle": 2},
        coarse={"trials": 6},
        fine={"trials": 2, "top_k": 2, "race_top": 2, "race_runs": 2, "training": {}},
        final={"training": {"n_cycles": 1}},
        optuna={"pruner": "none"},
    )
    spec = load_spec(path)
    assert _quiet(coarse.main, ["--study", str(path)])[0] == 0
    code, out = _quiet(fine.main, ["--study", str(path)])
    assert code == 0, out
    f = st.open_study(spec, "fine")
    trials = f.get_trials()
    carried = [t for t in trials if narrowing.FROM_COARSE in t.user_attrs]
    assert carried and "carried over" in out
    new = [t for t in trials if narrowing.FROM_COARSE not in t.user_attrs]
    assert sum(not rep.is_replicate(t) for t in new) == 2  # the fine trials, on top of them
    race = f.user_attrs[rep.RACE]
    assert race["ended"] and f"race: ended ({race['ended']})" in out
    assert race["spent"] == sum(rep.is_replicate(t) for t in trials) <= 2
    code, out = _quiet(final.main, ["--study", str(path)])
    assert code == 0 and "predicted by the model of the landscape" in out
    result = json.loads((spec.out_dir() / "final" / "result.json").read_text())
    assert result["choose"] == "robust"  # the default, recorded
    # what final printed and recorded is what the robust rule did
    choice = chosen_configuration(spec)
    assert result["kept_off_the_edge"] == kept_off_the_edge(spec, choice)
    assert ("note: chose" in out) == bool(result["kept_off_the_edge"])
    alive = rep.Race.from_dict(race).alive(rep.study_configurations(f))
    assert result["params"] in [c.params for c in alive]


def test_final_keeps_off_a_cliff_edge_by_default_and_says_which_it_passed_over(quick_study):
    """A study file's default choice is "robust": of the configurations alike within the
    seed noise, the one furthest from the search's diverged runs, with a note naming the
    model's best it passed over; ``choose = "model"`` takes that best."""
    path = quick_study(search={"eta_max": [1e-3, 1.0]}, coarse={"trials": 8})
    spec = load_spec(path)
    assert spec.final.choose == "robust"
    study = st.open_study(spec, "coarse")
    study.set_user_attr("ranges", sp.to_record(ETA))
    study.set_user_attr("data_sizes", {"val": 5000})
    values = {0.1: 0.868, 0.15: 0.870, 0.2: 0.871, 0.3: 0.871, 0.4: 0.872, 0.45: 0.872}
    for params, value, _ in [({"eta_max": e}, v, 0) for e, v in values.items()] + [
        ({"eta_max": 0.7}, None, 0),
        ({"eta_max": 0.9}, None, 0),
    ]:
        study.add_trial(_study([(params, value, 0)]).trials[0])
    choice = chosen_configuration(spec)
    chosen = choice.config
    model = dataclasses.replace(spec, final=dataclasses.replace(spec.final, choose="model"))
    by_model = chosen_configuration(model)
    best = by_model.config
    # the model's best is nearer the cliff than the choice, and alike within the noise
    assert chosen.params["eta_max"] < best.params["eta_max"]
    # the robust rule names the model's best it passed over, from the same fit
    assert choice.passed_over is not None
    assert choice.passed_over[0].number == best.number
    assert choice.passed_over[1] == by_model.value
    note = kept_off_the_edge(spec, choice)
    assert note is not None
    assert f"chose configuration {chosen.number} over {best.number}" in note
    assert "2 diverged run(s)" in note and 'choose = "model"' in note
    assert by_model.passed_over is None and kept_off_the_edge(model, by_model) is None
