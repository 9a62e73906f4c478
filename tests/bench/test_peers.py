import json
import math

import pytest

from bench import peers


@pytest.mark.slow  # over the suite's time budget (tens of seconds of training); run with -m slow
def test_quick_mode_scores_every_method_with_finite_regrets_at_one_budget_and_stores_them(
    cache, capsys
):
    assert peers.main(["--quick", "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    tiny = out["landscapes"]["tiny"]
    expected = set(peers.DEFAULT_METHODS) - set(tiny["skipped"])
    # gp is the only method that may be skipped, and only without torch.
    assert set(tiny["skipped"]) <= {"gp"}
    assert set(tiny["methods"]) == expected
    full = tiny["settings"]["trial_steps"]
    budget = tiny["settings"]["budget_steps"]
    assert budget == peers.LANDSCAPES["tiny"].budget_trials * full
    for method, m in tiny["methods"].items():
        (run,) = m["runs"]
        assert math.isfinite(run["regret"]) and run["regret"] >= 0, method
        assert math.isfinite(run["optimism"]), method
        assert run["net_optimism"] == pytest.approx(run["optimism"] - run["shift"]), method
        assert not run["over_budget"] and run["steps"] <= budget, method
        if method in peers.PEERS:
            # the budget, spent until one more full trial would not fit
            assert run["budget"] == budget
            assert budget - full < run["steps"] <= budget, method
    assert set(tiny["paired"]) == expected - {"c2f"}
    # A second call reuses the stored runs and the cached truth: nothing trains again.
    assert peers.main(["--quick"]) == 0
    assert capsys.readouterr().out.count("[stored]") == len(expected)
    assert len(list(cache.glob("peers-tiny-*-runs.jsonl"))) == 1


def test_a_landscape_the_service_refuses_is_pending_and_the_peers_still_run(
    cache, capsys, monkeypatch
):
    tiny = peers.LANDSCAPES["tiny"]
    # A setting the service does not search (it refuses the study file): the peers still run.
    choice = peers.Param("evals_per_cycle", "int", 2, 4)
    monkeypatch.setitem(
        peers.LANDSCAPES, "tiny", peers.dataclasses.replace(tiny, space=(*tiny.space, choice))
    )
    assert peers.main(["--quick", "--methods", "c2f", "tpe", "--json"]) == 0
    res = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["landscapes"]["tiny"]
    assert res["skipped"]["c2f"].startswith("pending")
    assert list(res["methods"]) == ["tpe"]
    # the peers' budget does not depend on the service's run
    assert res["methods"]["tpe"]["runs"][0]["budget"] == tiny.budget_trials * 40


def test_the_grid_covers_every_value_of_a_choice_and_distinct_integers():
    space = (
        peers.Param("batch_size", "int", 16, 128, log=True, grid=5),
        peers.Param("batch_norm", "choice", choices=(False, True)),
    )
    land = peers.dataclasses.replace(peers.LANDSCAPES["digits"], space=space)
    points = land.grid()
    assert {p["batch_norm"] for p in points} == {False, True}
    sizes = sorted({p["batch_size"] for p in points})
    assert sizes[0] == 16 and sizes[-1] == 128 and len(sizes) == len(points) // 2


def test_paired_differences_take_the_run_out_of_regret_and_optimism():
    # Run 1's validation set flatters every method by 2 points: the paired optimism
    # difference does not see it, and a run only one method has is left out.
    rows = {
        "c2f": [
            {"run": 0, "regret": 0.2, "optimism": 0.1},
            {"run": 1, "regret": 0.4, "optimism": 2.3},
            {"run": 2, "regret": 0.0, "optimism": 0.0},
        ],
        "tpe": [
            {"run": 0, "regret": 0.5, "optimism": 0.6},
            {"run": 1, "regret": 0.3, "optimism": 2.8},
        ],
    }
    d = peers.paired(rows, "c2f")["tpe"]
    assert d["n"] == 2 and d["base_wins"] == 1 and d["base_losses"] == 1
    assert d["mean"] == pytest.approx((-0.3 + 0.1) / 2)
    assert d["optimism"]["mean"] == pytest.approx(-0.5)
    assert d["optimism"]["low"] == pytest.approx(-0.5) == d["optimism"]["high"]


def test_the_validation_shift_is_measured_once_and_kept_beside_the_scores(cache):
    tiny = peers.LANDSCAPES["tiny"]
    calls = []

    def mapper(fn, jobs):
        jobs = list(jobs)
        calls.append((fn, len(jobs)))
        return [0.02 if fn is peers.val_minus_test else 0.9 for _ in jobs]

    params = {"l2_lambda": 0.01, "eta_max": 0.1}
    truth = peers.Truth(tiny, cache_dir=cache, mapper=mapper)
    assert truth.score([params]) == [0.9]
    assert truth.shift(params) == pytest.approx(0.02)
    assert truth.shift(params) == pytest.approx(0.02)  # read back, not trained again
    assert calls == [
        (peers.test_accuracy, tiny.score_seeds),
        (peers.val_minus_test, tiny.score_seeds),
    ]
    again = peers.Truth(tiny, cache_dir=cache, mapper=mapper)
    assert again.scores == truth.scores and again.shifts == truth.shifts


def test_validation_means_are_trained_once_on_seeds_of_their_own_and_kept(cache):
    tiny = peers.LANDSCAPES["tiny"]
    calls = []

    def mapper(fn, jobs):
        jobs = list(jobs)
        calls.append((fn, [seed for _, _, seed, _ in jobs]))
        return [0.8 if json.loads(k)["eta_max"] == 0.1 else 0.7 for _, k, _, _ in jobs]

    a, b = {"l2_lambda": 0.01, "eta_max": 0.1}, {"l2_lambda": 0.01, "eta_max": 0.2}
    truth = peers.Truth(tiny, cache_dir=cache, mapper=mapper)
    assert truth.validation([a, b]) == [pytest.approx(0.8), pytest.approx(0.7)]
    assert truth.validation([b, a]) == [pytest.approx(0.7), pytest.approx(0.8)]  # kept
    ((fn, seeds),) = calls
    assert fn is peers.val_accuracy
    assert sorted(set(seeds)) == [peers.VAL_SEED + k for k in range(tiny.score_seeds)]
    assert not set(seeds) & {*truth.seeds(), peers.SHIFT_SEED}
    assert len(seeds) == 2 * tiny.score_seeds
    again = peers.Truth(tiny, cache_dir=cache, mapper=mapper)
    assert again.vals == truth.vals and len(again.vals) == 2


def test_val_accuracy_is_the_validation_accuracy_of_one_run():
    tiny = peers.LANDSCAPES["tiny"]
    params = {"l2_lambda": 0.01, "eta_max": 0.1}
    splits = peers.splits_of(tiny, 0)
    net, _ = peers.train(tiny, params, 3, split=0)
    val = net.evaluate(splits.val.X, splits.val.y, l2_lambda=0.01)["accuracy"]
    assert peers.val_accuracy(("tiny", peers.params_key(params), 3, 0)) == pytest.approx(val)


def test_val_minus_test_is_validation_minus_test_accuracy_of_one_run():
    tiny = peers.LANDSCAPES["tiny"]
    params = {"l2_lambda": 0.01, "eta_max": 0.1}
    key = peers.params_key(params)
    gap = peers.val_minus_test(("tiny", key, 3, 0))
    splits = peers.splits_of(tiny, 0)
    net, _ = peers.train(tiny, params, 3, split=0)
    val = net.evaluate(splits.val.X, splits.val.y, l2_lambda=0.01)["accuracy"]
    test = net.evaluate(splits.test.X, splits.test.y, l2_lambda=0.01)["accuracy"]
    assert gap == pytest.approx(val - test) and gap != 0


def test_service_steps_count_what_ran_and_leave_out_retired_and_carried_trials(tmp_path):
    import optuna
    from optuna.trial import TrialState

    from search.sweep.workers import bookkeeping
    from search.sweep.workers.storage import storage_of, trial_id

    land = peers.LANDSCAPES["tiny"]
    db = tmp_path / "s.db"
    study = optuna.create_study(storage=f"sqlite:///{db}", study_name="s-fine")
    dist = {"l2_lambda": optuna.distributions.FloatDistribution(1e-4, 1e-1, log=True)}

    def add(epochs, state=TrialState.COMPLETE, **attrs):
        study.add_trial(
            optuna.trial.create_trial(
                state=state,
                value=0.9 if state == TrialState.COMPLETE else None,
                params={"l2_lambda": 1e-3},
                distributions=dist,
                user_attrs={"epochs_run": epochs, **attrs},
            )
        )

    add(2.0)
    add(1.0, state=TrialState.PRUNED)
    add(2.0, from_coarse=3)  # counted in the coarse study
    study.enqueue_trial({})  # queued, then retired by the stop rule: it never ran
    (waiting,) = study.get_trials(states=(TrialState.WAITING,))
    assert bookkeeping.retire(storage_of(study), trial_id(waiting), "not needed: test")
    per_epoch = peers.splits_of(land).train.n // land.training["batch_size"]
    assert peers.service_steps(db, land) == (3 * per_epoch, 2, 1, 0)
