"""A stage's budget in training steps (``[optuna] budget = "steps"``): pruned and diverged
trials count the share of their steps they took, and what they left buys more trials."""

from __future__ import annotations

import math

import optuna
import pytest
from optuna.trial import TrialState

from search import coarse
from search.config.study import StudyDefinitionError, load_spec
from search.reporting import markdown
from search.status import format_status
from search.sweep import replicates as rep
from search.sweep import stage, standing, stopping
from search.sweep import studies as st

PLANNED = 8.0  # epochs a trial plans


def _study(tmp_path, budget="steps"):
    study = optuna.create_study(
        storage=f"sqlite:///{tmp_path / 'b.db'}", study_name="s", direction="maximize"
    )
    study.set_user_attr(st.BUDGET, budget)
    return study


def _add(study, epochs_run, *, state=TrialState.PRUNED, replicate=0):
    """A finished trial that trained ``epochs_run`` of PLANNED epochs."""
    study.add_trial(
        optuna.trial.create_trial(
            state=state,
            value=0.9 if state == TrialState.COMPLETE else None,
            user_attrs={
                "epochs_run": epochs_run,
                "epochs_planned": PLANNED,
                rep.REPLICATE: replicate,
            },
        )
    )


def _waiting(study):
    return sum(t.state == TrialState.WAITING for t in study.get_trials())


def test_a_pruned_trial_counts_the_share_it_trained_and_any_other_one_whole(tmp_path):
    study = _study(tmp_path)
    _add(study, 2.0)  # pruned a quarter of the way
    _add(study, 8.0, state=TrialState.COMPLETE)
    _add(study, 100.0)  # more than planned: never more than one trial
    first, second, third = study.get_trials()
    assert (st.spent(first), st.spent(second), st.spent(third)) == (0.25, 1.0, 1.0)
    study.add_trial(optuna.trial.create_trial(state=TrialState.PRUNED))  # no epochs recorded
    assert st.spent(study.get_trials()[-1]) == 1.0
    assert st.counted_toward(study) == pytest.approx(3.25)


def test_the_steps_left_buy_whole_trials_and_never_pass_the_target(tmp_path):
    study = _study(tmp_path)
    for _ in range(4):
        _add(study, 2.0)  # 4 trials pruned at a quarter: one trial's steps
    _add(study, 8.0, state=TrialState.COMPLETE)
    _add(study, 8.0, state=TrialState.COMPLETE, replicate=1)  # on top of the target
    # 2 trials' steps spent of 6: 4 more fit
    assert st.top_up(study, 6) == 4 and _waiting(study) == 4
    assert st.top_up(study, 6) == 0  # the waiting ones count whole


def test_counted_as_trials_the_same_trials_fill_the_target(tmp_path):
    study = _study(tmp_path, budget="trials")
    for _ in range(4):
        _add(study, 2.0)
    _add(study, 8.0, state=TrialState.COMPLETE)
    assert st.counted_toward(study) == 5.0
    assert st.top_up(study, 6) == 1


def test_a_fraction_of_a_trial_left_queues_nothing_and_a_lower_target_trims(tmp_path):
    study = _study(tmp_path)
    _add(study, 4.0)  # half a trial
    _add(study, 8.0, state=TrialState.COMPLETE)
    assert st.top_up(study, 2) == 0  # 1.5 spent: half a trial left does not fit one
    assert st.top_up(study, 5) == 3 and _waiting(study) == 3
    # A lower target: 1.5 + 3 waiting = 4.5 over a target of 3, so 2 waiting are retired.
    assert st.top_up(study, 3) == 0 and _waiting(study) == 1


def test_a_stop_in_steps_keeps_a_target_that_queues_nothing_more(tmp_path):
    study = _study(tmp_path)
    _add(study, 2.0)
    _add(study, 8.0, state=TrialState.COMPLETE)
    st.top_up(study, 6)  # 4 waiting
    record = stopping.stop(study, stopping.Gain(0.001, 0.01, 2))
    # 1.25 trials' steps kept: the target is 2 (rounded up), 4 saved of the 6 asked
    assert record is not None and (record["target"], record["saved"]) == (2, 4)
    assert st.top_up(study, record["target"]) == 0 and _waiting(study) == 0


def test_status_is_done_only_when_no_whole_trial_fits(tmp_path):
    study = _study(tmp_path)
    for _ in range(4):
        _add(study, 2.0)
    _add(study, 8.0, state=TrialState.COMPLETE)
    study.set_user_attr("target", 4)
    # 5 trials finished of a target of 4, but only 2 trials' steps: not done
    s = standing.standing(study, grace_period=30, resume="c2f coarse")
    assert s.verdict.startswith("incomplete") and s.steps == pytest.approx(2.0)
    assert "5 finished, 2.0/4 trials' steps;" in format_status(s)
    _add(study, 8.0, state=TrialState.COMPLETE)
    _add(study, 4.0)  # 3.5 of 4: half a trial left, no whole one fits
    assert standing.standing(study, grace_period=30, resume="c2f coarse").verdict == "done"
    assert "7 finished, 3.5 trials' steps, of target 4" in st.finished_text(study, 4)


def test_budget_must_be_trials_or_steps(quick_study):
    with pytest.raises(StudyDefinitionError, match=r"optuna.budget.*\['trials', 'steps'\]"):
        load_spec(quick_study(optuna={"budget": "epochs"}))
    assert load_spec(quick_study()).optuna.budget == "trials"  # the default


@pytest.mark.parametrize("workers", [1, 2])
def test_coarse_spends_the_steps_of_diverged_trials_on_more_trials(quick_study, capsys, workers):
    # Past eta_max 15 or so the quick start's network diverges before its cycle's peak:
    # those trials take under half their steps, and the rest buys more trials (with 2
    # workers, queued while the other one still trains, by SpendSaved).
    path = quick_study(
        search={"l2_lambda": [1e-5, 1e-1], "eta_max": [10.0, 1e3]},
        coarse={"trials": 6},
        training={"n_cycles": 1},
        optuna={"budget": "steps", "workers": workers},
    )
    assert coarse.main(["--study", str(path)]) == 0
    out = capsys.readouterr().out
    spec = load_spec(path)
    study = optuna.load_study(study_name=f"{spec.name}-coarse", storage=spec.storage_url())
    trials = [t for t in study.get_trials() if t.state in st.FINISHED]
    diverged = [t for t in trials if t.user_attrs.get("diverged")]
    assert diverged and all(st.spent(t) < 1 for t in diverged)
    assert len(trials) > 6  # more trials than the target: the diverged ones' steps bought them
    used = st.counted_toward(study)
    assert 5 < used <= 6 + 1e-9  # the target in steps, never passed
    # The epochs recorded are the steps trained: never more than the budget counted.
    planned = trials[0].user_attrs["epochs_planned"]
    assert sum(t.user_attrs["epochs_run"] for t in trials) <= used * planned + 1e-6
    s = standing.standing(study, grace_period=30, resume="c2f coarse")
    assert s.verdict == "done" and s.steps == pytest.approx(used)
    assert "target 6 trials in steps" in out and "budget in steps:" in out
    if workers == 1:  # with 2, SpendSaved may have queued them all while the other ran
        assert "more trial" in out and "queued" in out
    report = markdown.settings_section(spec, {"coarse": study})
    assert "counted in training steps" in report


def test_counted_as_trials_diverged_trials_buy_nothing(quick_study):
    path = quick_study(
        search={"l2_lambda": [1e-5, 1e-1], "eta_max": [1e-2, 1e3]},
        coarse={"trials": 6},
        training={"n_cycles": 1},
    )
    assert coarse.main(["--study", str(path)]) == 0
    spec = load_spec(path)
    study = optuna.load_study(study_name=f"{spec.name}-coarse", storage=spec.storage_url())
    trials = [t for t in study.get_trials() if t.state in st.FINISHED]
    assert len(trials) == 6 and any(t.user_attrs.get("diverged") for t in trials)
    assert not math.isclose(sum(map(st.spent, trials)), 6)  # they took less, and count 1
    assert st.counted_toward(study) == 6


def test_a_search_that_diverges_at_once_runs_at_most_four_times_its_target(tmp_path):
    study = _study(tmp_path)
    for _ in range(6):
        _add(study, 0.01)  # diverged in its first steps: counts a quarter all the same
    assert st.counted_toward(study) == pytest.approx(6 * st.MIN_SHARE)
    assert st.top_up(study, 6) == 4
    # However many rounds: 6 / MIN_SHARE trials at most fill a target of 6.
    (tmp_path / "more").mkdir()
    study2 = _study(tmp_path / "more")
    for _ in range(int(6 / st.MIN_SHARE)):
        _add(study2, 0.0)
    assert st.top_up(study2, 6) == 0


def test_a_stop_with_a_trial_running_is_done_when_that_one_is_pruned_later(tmp_path):
    study = _study(tmp_path)
    _add(study, 8.0, state=TrialState.COMPLETE)
    _add(study, 2.0)
    st.top_up(study, 6)
    running = study.ask()  # a worker took one: RUNNING, counted whole by the stop
    record = stopping.stop(study, stopping.Gain(0.001, 0.01, 2))
    assert record is not None and record["target"] == 3
    running.set_user_attr("epochs_run", 2.0)  # pruned since, a quarter of the way
    running.set_user_attr("epochs_planned", PLANNED)
    study.tell(running.number, state=TrialState.PRUNED)
    assert st.counted_toward(study) == pytest.approx(1.5)  # 1.5 left of 3, yet:
    assert st.top_up(study, 3) == 0  # the stop keeps what it has
    assert standing.standing(study, grace_period=30, resume="c2f coarse").verdict.startswith(
        "done"
    )


def test_while_the_workers_run_a_pruned_trial_buys_one_at_once(tmp_path, monkeypatch):
    study = _study(tmp_path)
    _add(study, 4.0)  # pruned half way
    study.set_user_attr("target", 4)
    top_ups = []
    real_top_up = st.top_up
    monkeypatch.setattr(st, "top_up", lambda *a, **k: top_ups.append(1) or real_top_up(*a, **k))
    drawn = []
    tick = stage.SpendSaved(study, lambda: drawn.append(1))
    tick()  # the first look tops up: 3 whole trials fit in 3.5
    assert drawn == [1] and top_ups == [1] and _waiting(study) == 3
    tick()  # within its interval: no second look
    assert len(drawn) == 2 and top_ups == [1]

    def due():
        tick.next = 0.0
        tick()

    first, second = study.ask(), study.ask()  # two workers take two; one waits
    study.tell(first, 0.9)
    due()  # a completed trial left no steps: no read of the trials
    assert top_ups == [1]
    second.set_user_attr("epochs_run", 4.0)
    second.set_user_attr("epochs_planned", PLANNED)
    study.tell(second, state=TrialState.PRUNED)  # half its steps left: 1 trial fits
    due()  # but one waits already: nothing until the queue is empty
    assert top_ups == [1] and _waiting(study) == 1
    study.ask()
    due()  # the queue is empty and a trial was pruned since the last top-up
    assert top_ups == [1, 1] and _waiting(study) == 1
    assert st.counted_toward(study) == pytest.approx(4.0)
    stopping.stop(study, stopping.Gain(0.001, 0.01, 2))  # retires the waiting one
    due()
    assert _waiting(study) == 0 and top_ups == [1, 1]  # the stop ended it: nothing queued


def test_ctrl_c_in_a_budget_in_steps_leaves_a_study_the_rerun_completes(quick_study, tmp_path):
    """A real SIGINT to the group once a diverged trial has left steps and another trains:
    exit 130, nothing left running, and the rerun spends the target in steps, no more."""
    import os
    import signal
    import time

    from tests.search.conftest import run_coarse, start_coarse

    path = quick_study(
        "sig",
        search={"l2_lambda": [1e-5, 1e-1], "eta_max": [10.0, 1e4]},  # most diverge
        coarse={"trials": 4},
        training={"n_cycles": 10},  # a second or two a trial: the signal lands mid-training
        optuna={"budget": "steps", "workers": 2},
    )
    url = f"sqlite:///{tmp_path / 'sig.db'}"
    proc = start_coarse(path, url)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert proc.poll() is None, proc.communicate()
        try:
            states = [
                t.state for t in optuna.load_study(study_name="sig-coarse", storage=url).trials
            ]
        except KeyError:  # the command is creating it
            states = []
        if TrialState.PRUNED in states and TrialState.RUNNING in states:
            break
        time.sleep(0.05)
    else:
        raise AssertionError("no trial diverged while another trained")
    os.killpg(proc.pid, signal.SIGINT)
    _, err = proc.communicate(timeout=30)
    assert proc.returncode == 130, err
    study = optuna.load_study(study_name="sig-coarse", storage=url)
    assert not [t for t in study.trials if t.state == TrialState.RUNNING]
    rerun = run_coarse(path, url, timeout=180)
    assert rerun.returncode == 0, rerun.stderr
    study = optuna.load_study(study_name="sig-coarse", storage=url)
    assert not [t for t in study.trials if t.state in st.LIVE]
    assert 3 < st.counted_toward(study) <= 4 + 1e-9
    assert standing.standing(study, grace_period=30, resume="c2f coarse").verdict == "done"


def test_a_round_another_machine_queued_is_run_here_too_and_doubles_are_retired(tmp_path):
    """spend_saved_steps runs the workers on search trials another machine queued (it
    does not leave them to that machine), and a round queued twice is cut back."""
    study = _study(tmp_path)
    for _ in range(4):
        _add(study, 4.0)  # four halves: 2 trials' steps of a target of 4
    study.set_user_attr("target", 4)
    study.enqueue_trial({})  # another machine's round, waiting
    runs: list[int] = []

    def run(total):  # the workers: every waiting trial trains to its end
        runs.append(total)
        for t in study.get_trials(states=(TrialState.WAITING,)):
            trial = study.ask()
            assert trial.number == t.number
            study.tell(trial, 0.9)

    stage.spend_saved_steps(study, run, log=lambda *a, **k: None)
    # the other machine's trial first, then this one's round: 1 more fits (3 + 1 = 4)
    assert len(runs) == 2 and st.counted_toward(study) == pytest.approx(4.0)
    # Two machines queue the same round at once: the second top_up retires the double.
    (tmp_path / "two").mkdir()
    study2 = _study(tmp_path / "two")
    for _ in range(4):
        _add(study2, 4.0)
    assert st.top_up(study2, 4) == 2
    study2.enqueue_trial({})  # the other machine's copy of the same round, one more
    assert st.top_up(study2, 4) == 0 and _waiting(study2) == 2


def test_two_commands_on_one_study_in_steps_spend_its_target_and_at_most_a_trial_more(
    quick_study, tmp_path
):
    """Two real ``search.coarse`` commands at once on one study (two machines): both end
    with exit 0, nothing is left waiting or running, the study is done, and the steps
    spent pass the target by at most the one trial a doubled round can add."""
    from tests.search.conftest import start_coarse

    path = quick_study(
        "two",
        search={"l2_lambda": [1e-5, 1e-1], "eta_max": [10.0, 1e3]},  # many diverge
        coarse={"trials": 6},
        training={"n_cycles": 1},
        optuna={"budget": "steps", "workers": 1},
    )
    url = f"sqlite:///{tmp_path / 'two.db'}"
    procs = [start_coarse(path, url) for _ in range(2)]
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        assert "target 6 trials in steps" in out
    study = optuna.load_study(study_name="two-coarse", storage=url)
    assert not [t for t in study.trials if t.state in st.LIVE]
    trials = [t for t in study.trials if t.state in st.FINISHED]
    assert any(st.spent(t) < 1 for t in trials)  # some diverged and left steps
    drawn = [tuple(sorted(t.params.items())) for t in trials]
    assert len(set(drawn)) == len(drawn)  # no configuration drawn by both commands
    assert 5 < st.counted_toward(study) <= 6 + 1 + 1e-9
    assert standing.standing(study, grace_period=30, resume="c2f coarse").verdict == "done"
