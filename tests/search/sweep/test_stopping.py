"""The stop rule (search.sweep.stopping): on synthetic landscapes whose answer is known,
and through the fine command."""

from __future__ import annotations

import contextlib
import io
import math

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from search import coarse, final, fine
from search.config import space as sp
from search.config.study import StudyDefinitionError, load_spec
from search.reporting import markdown
from search.sweep import narrowing, standing, stopping, surrogate
from search.sweep import replicates as rep
from search.sweep import studies as st
from search.sweep.workers import bookkeeping
from search.sweep.workers.storage import storage_of, trial_id

ETA = {"eta_max": sp.parse_range("eta_max", [1e-3, 1.0])}


def _add(study, eta, value, *, replicate=0, carried=False):
    attrs = {rep.REPLICATE: replicate, "diverged": False}
    if carried:
        attrs[narrowing.FROM_COARSE] = 0
    study.add_trial(
        optuna.trial.create_trial(
            state=TrialState.COMPLETE,
            value=value,
            params={"eta_max": eta},
            distributions=sp.distributions(ETA),
            user_attrs=attrs,
        )
    )


def _flat(tmp_path, n=8, *, carried=0):
    """A study whose runs all sit on a plateau (0.90, seed noise 0.01 sd), with
    ``carried`` of them carried over from coarse, and 4 search trials and a replicate
    waiting."""
    storage = f"sqlite:///{tmp_path / 'stop.db'}"
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    rng = np.random.default_rng(0)
    for i, eta in enumerate(np.geomspace(1e-3, 1.0, n)):
        _add(study, float(eta), 0.90 + rng.normal(0, 0.01), carried=i < carried)
    for _ in range(4):
        study.enqueue_trial({})
    study.enqueue_trial({"eta_max": 0.01}, user_attrs={rep.REPLICATE: 1})
    study.set_user_attr("target", n + 4)
    study.set_user_attr("data_sizes", {"val": 300})  # as a stage records it: the noise floor
    return study


def test_the_bound_is_below_the_noise_on_a_plateau_and_above_it_beside_an_unexplored_slope():
    # A plateau run all over its range: nothing left to find.
    study = optuna.create_study(direction="maximize")
    rng = np.random.default_rng(1)
    for eta in np.geomspace(1e-3, 1.0, 12):
        _add(study, float(eta), 0.90 + rng.normal(0, 0.01))
    gain = stopping.expected_gain(study.get_trials(), ETA, n_val=300)
    assert gain is not None and gain.below_noise, gain
    assert gain.runs == 12 and 0.005 < gain.noise < 0.03
    # Rising by 10 points a decade, and run only over its lower half: the upper half
    # may hold far more than one run's seed noise.
    study = optuna.create_study(direction="maximize")
    for eta in np.geomspace(1e-3, 0.03, 8):
        _add(study, float(eta), 0.6 + 0.1 * (math.log10(eta) + 3) + rng.normal(0, 0.01))
    gain = stopping.expected_gain(study.get_trials(), ETA, n_val=300)
    assert gain is not None and not gain.below_noise, gain
    assert gain.bound > 0.05  # the slope goes on past the runs: 5 points at least


def test_the_regret_bound_looks_past_the_runs_into_the_whole_space(monkeypatch):
    study = optuna.create_study(direction="maximize")
    for eta in np.geomspace(1e-3, 0.03, 8):
        _add(study, float(eta), 0.6 + 0.1 * (math.log10(eta) + 3))
    trials = study.get_trials()
    model = surrogate.fit(trials, ETA, n_val=300)
    visited, _ = surrogate.observations(trials)
    assert model is not None
    points = surrogate.random_points(ETA, 500, np.random.default_rng(0))
    assert points.shape == (500, 1) and 0 <= points.min() and points.max() <= 1
    # The slope rises past the runs: the bound over the whole range is well above the
    # one over the runs alone (no random points).
    whole = surrogate.regret_bound(model, visited, ETA)
    monkeypatch.setattr(surrogate, "STOP_CANDIDATES", 0)
    assert whole > surrogate.regret_bound(model, visited, ETA) + 0.02
    assert surrogate.regret_bound(model, [], ETA) == math.inf


def test_random_points_put_a_choice_in_one_hot_columns():
    space = {
        "eta_max": sp.parse_range("eta_max", [1e-3, 1.0]),
        "batch_norm": sp.parse_range("batch_norm", {"choice": [False, True]}),
    }
    points = surrogate.random_points(space, 200, np.random.default_rng(0))
    assert points.shape == (200, 3)
    assert np.all(points[:, 1:].sum(axis=1) == 1.0)  # one level each
    assert 0 < points[:, 2].mean() < 1  # both levels drawn


def test_the_rule_waits_for_the_stages_own_trials():
    study = optuna.create_study(direction="maximize")
    for eta in (0.01, 0.1, 0.5):
        _add(study, eta, 0.9, carried=True)
    study.enqueue_trial({})
    assert not stopping.due(study.get_trials())  # only runs carried over from coarse
    _add(study, 0.02, 0.9)
    assert not stopping.due(study.get_trials())  # one of its own
    _add(study, 0.03, 0.9)
    assert stopping.due(study.get_trials())  # two, and one still waiting
    study.tell(study.ask(), 0.9)
    assert not stopping.due(study.get_trials())  # nothing waits: nothing to save


def test_the_stopper_retires_the_waiting_search_trials_and_records_why(tmp_path):
    study = _flat(tmp_path, carried=3)
    lines: list[str] = []
    calls: list[int] = []
    stopper = stopping.Stopper(
        study, ETA, lambda: calls.append(1), log=lambda *a, **k: lines.append(a[0])
    )
    stopper()
    assert calls == [1]  # the progress line is drawn as before
    trials = study.get_trials()
    retired = [t for t in trials if t.state == TrialState.FAIL]
    assert len(retired) == 4
    assert all(bookkeeping.kind(t) is bookkeeping.Kind.RETIRED for t in retired)
    assert all(t.user_attrs["reason"] == stopping.REASON for t in retired)
    # The replicate still waits: the replicates and the race come after the search.
    (waiting,) = [t for t in trials if t.state == TrialState.WAITING]
    assert rep.is_replicate(waiting)
    record = study.user_attrs[stopping.STOPPED]
    assert record["asked"] == 12 and record["target"] == 8 and record["saved"] == 4
    assert record["bound"] < record["noise"]
    assert study.user_attrs["target"] == 8
    assert len(lines) == 1 and "the search stopped at 8 of 12 trials" in lines[0]
    assert "4 trial(s) not run" in lines[0]
    assert stopper.summary() is None  # said once, when it stopped
    # Asked again, it does nothing more.
    stopper()
    assert len(lines) == 1


def test_the_stopper_leaves_a_search_that_still_has_something_to_find(tmp_path):
    storage = f"sqlite:///{tmp_path / 'slope.db'}"
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    study.set_user_attr("data_sizes", {"val": 300})
    for eta in np.geomspace(1e-3, 0.03, 6):
        _add(study, float(eta), 0.6 + 0.1 * (math.log10(eta) + 3))
    study.enqueue_trial({})
    stopper = stopping.Stopper(study, ETA, None)
    assert stopper.summary() == (
        "stop rule: not asked (no trial waited once the stage had run two)"
    )
    stopper()
    assert [t.state for t in study.get_trials()].count(TrialState.WAITING) == 1
    assert stopping.stopped(study) is None
    # The command says why the search ran on: the rule's last answer.
    said = stopper.summary()
    assert said is not None and said.startswith("stop rule: the search ran to its target")
    assert "was above the seed noise of one run" in said and "over 6 runs" in said


def test_a_stage_run_again_keeps_its_stop_and_a_larger_target_searches_on(tmp_path):
    study = _flat(tmp_path)
    stopping.Stopper(study, ETA, None, log=lambda *a, **k: None)()
    lines: list[str] = []
    say = lambda *a, **k: lines.append(a[0])  # noqa: E731
    assert stopping.resumed_target(study, 12, enabled=True, log=say) == 8
    assert "a larger --trials searches on" in lines[0]
    assert stopping.resumed_target(study, 10, enabled=True, log=say) == 8
    assert stopping.resumed_target(study, 6, enabled=True, log=say) == 6  # fewer: fewer
    # Off in the study file, or more trials asked for: the search goes on.
    assert stopping.resumed_target(study, 12, enabled=False) == 12
    assert stopping.stopped(study) is None
    assert st.top_up(study, 12) == 4  # the retired ones queued again
    record = stopping.stop(study, stopping.Gain(0.001, 0.01, 8))
    assert record is not None and record["asked"] == 12 and record["saved"] == 4
    assert stopping.resumed_target(study, 20, enabled=True) == 20
    assert stopping.stopped(study) is None


def test_retiring_never_ends_a_trial_a_worker_has_taken(tmp_path):
    study = optuna.create_study(storage=f"sqlite:///{tmp_path / 'r.db'}", study_name="s")
    study.enqueue_trial({})
    study.enqueue_trial({})
    taken = study.ask()  # a worker took the first: RUNNING
    storage = storage_of(study)
    assert not bookkeeping.retire(storage, trial_id(taken), stopping.REASON)
    first, second = study.get_trials()
    assert first.state == TrialState.RUNNING and bookkeeping.kind(first) is None
    assert bookkeeping.retire(storage, trial_id(second), stopping.REASON)
    second = study.get_trials()[1]
    assert second.state == TrialState.FAIL and bookkeeping.kind(second) is bookkeeping.Kind.RETIRED


def test_a_stop_cut_short_before_retiring_is_completed_by_the_rerun(tmp_path, monkeypatch):
    study = _flat(tmp_path)

    def killed(*args):
        raise KeyboardInterrupt

    monkeypatch.setattr(bookkeeping, "retire", killed)
    with pytest.raises(KeyboardInterrupt):
        stopping.stop(study, stopping.Gain(0.001, 0.01, 8))
    monkeypatch.undo()
    # The record and the lowered target were written first; the rerun tops up to that
    # target, which retires what still waits above it.
    assert stopping.stopped(study)["target"] == 8
    target = stopping.resumed_target(study, 12, enabled=True, log=lambda *a, **k: None)
    assert target == 8 and st.top_up(study, target) == 0
    own = stopping.own_search_trials(study.get_trials())
    assert not [t for t in own if t.state == TrialState.WAITING]


def test_stop_below_noise_must_be_a_boolean(quick_study):
    with pytest.raises(StudyDefinitionError, match=r"fine.stop_below_noise.*bool"):
        load_spec(quick_study(fine={"stop_below_noise": "yes"}))
    assert load_spec(quick_study(coarse={"stop_below_noise": True})).coarse.stop_below_noise
    assert not load_spec(quick_study()).fine.stop_below_noise  # off by default


def _quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        code = fn(*args)
    return code, out.getvalue()


def test_fine_stops_by_the_rule_then_races_final_chooses_and_a_rerun_adds_nothing(
    quick_study, monkeypatch
):
    # The rule's answer is forced (a plateau is not guaranteed on real data); the rest is
    # the commands as they run: workers, the queue, the race, final, a rerun.
    path = quick_study(
        # trials of about half a second: the command asks the rule twice a second
        training={"n_cycles": 1, "n_s": 600, "evals_per_cycle": 2},
        coarse={"trials": 5},
        fine={"trials": 8, "race_top": 2, "race_runs": 2, "stop_below_noise": True},
        optuna={"pruner": "none"},
    )
    spec = load_spec(path)
    assert _quiet(coarse.main, ["--study", str(path)])[0] == 0
    monkeypatch.setattr(stopping, "expected_gain", lambda *a, **k: stopping.Gain(0.001, 0.01, 7))
    code, out = _quiet(fine.main, ["--study", str(path)])
    assert code == 0, out
    assert "stop: the search stopped at" in out, out
    study = st.open_study(spec, "fine")
    record = study.user_attrs[stopping.STOPPED]
    own = stopping.own_search_trials(study.get_trials())
    ran = [t for t in own if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    retired = [t for t in own if t.state == TrialState.FAIL]
    assert len(ran) >= stopping.MIN_OWN_TRIALS and retired
    assert len(ran) + len(retired) == 8 and record["saved"] == len(retired)
    assert all(bookkeeping.kind(t) is bookkeeping.Kind.RETIRED for t in retired)
    assert study.user_attrs[rep.RACE]["ended"]  # the race ran after the stop
    code, out = _quiet(final.main, ["--study", str(path)])
    assert code == 0, out
    # The report and status say it; the retired trials are no failures there.
    section = markdown.stage_section("fine", study, {})
    assert "The search stopped at" in section and "(counted as retired)" in section
    header = section.split("Trials per state")[1].splitlines()[2]
    assert "retired" in header  # a column of its own, not FAIL
    status = standing.standing(study, grace_period=30, resume="c2f fine")
    assert status.verdict.startswith("done (the search stopped at")
    assert status.retired == len(retired) and status.counts["FAIL"] == 0
    # Run again with the same target: nothing is queued, the stop is said again.
    n = len(study.get_trials())
    code, out = _quiet(fine.main, ["--study", str(path)])
    assert code == 0, out
    assert "the search stopped at" in out and "0 newly queued" in out
    assert len(st.open_study(spec, "fine").get_trials()) == n


def test_the_closing_line_says_why_a_rule_below_the_noise_did_not_stop(tmp_path, monkeypatch):
    study = _flat(tmp_path)
    monkeypatch.setattr(stopping, "stop", lambda study, gain: None)  # the workers took them
    stopper = stopping.Stopper(study, ETA, None, log=lambda *a, **k: None)
    stopper()
    said = stopper.summary()
    assert said is not None and "was below the seed noise of one run" in said
    assert said.endswith("but no trial was left waiting to stop")


def test_the_closing_line_of_runs_that_all_scored_the_same(tmp_path):
    storage = f"sqlite:///{tmp_path / 'same.db'}"
    study = optuna.create_study(storage=storage, study_name="s", direction="maximize")
    for eta in np.geomspace(1e-3, 1.0, 8):
        _add(study, float(eta), 0.5)
    study.enqueue_trial({})
    stopper = stopping.Stopper(study, ETA, None)
    stopper()
    said = stopper.summary()
    assert said is not None and "could not be fitted" in said and "all scored the same" in said
