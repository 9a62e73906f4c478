"""End to end: coarse -> fine -> final on the quick-start data, parallel workers, resumption."""

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from search import coarse, final, fine
from search.config.study import load_spec
from search.sweep import studies as st
from search.sweep.objective import curves_of
from tests.search.conftest import is_new_fine_trial

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def load(spec, stage):
    return optuna.load_study(study_name=f"{spec.name}-{stage}", storage=spec.storage_url())


def test_coarse_fine_final_end_to_end(quick_study, capsys):
    # One coarse cycle, fine's three and final's one: fast, and fine still trains longer.
    path = quick_study(training={"n_cycles": 1}, final={"training": {"n_cycles": 1}})
    assert coarse.main(["--study", str(path)]) == 0
    out = capsys.readouterr().out
    assert "top" in out and "optuna-dashboard sqlite:///" in out and "6/6 finished" in out
    spec = load_spec(path)
    c = load(spec, "coarse")
    trials = c.get_trials()
    assert len(trials) == 6 and all(t.state in st.FINISHED for t in trials)
    for t in trials:
        # log-uniform params, learning curves and bookkeeping on every trial
        assert all(d.log for d in t.distributions.values())
        assert set(t.params) == {"l2_lambda", "eta_max"}
        curves = curves_of(t)
        assert len(curves["val_acc"]) == len(t.intermediate_values) > 0
        assert t.user_attrs["epochs_run"] > 0 and "wall_time" in t.user_attrs
        assert t.user_attrs["diverged"] in (True, False)
    assert c.user_attrs["data_checksum"] and c.user_attrs["target"] == 6

    assert fine.main(["--study", str(path)]) == 0
    f = load(spec, "fine")
    ranges = f.user_attrs["ranges"]
    top = st.top_trials(c, 2)
    for name, (lo, hi) in ranges.items():
        clo, chi = spec.search[name].bounds
        # within the coarse range, or past an edge by at most [fine] extend decades
        assert clo / 10**spec.fine.extend <= lo < hi <= chi * 10**spec.fine.extend
        assert all(lo <= t.params[name] <= hi for t in top)
    fine_params = [t.params for t in f.get_trials()]
    for t in top:  # the fine study started from the best coarse trials, once each
        assert sum(p == t.params for p in fine_params) == 1
    # Its 4 trials, on top of the coarse runs it carried over and the race's runs.
    assert sum(is_new_fine_trial(t) for t in f.get_trials()) == 4
    # The quick start's fine stage trains as its coarse one (so its runs carry over).
    assert max(len(t.intermediate_values) for t in f.get_trials()) == max(
        len(t.intermediate_values) for t in trials
    )

    assert final.main(["--study", str(path)]) == 0
    out = capsys.readouterr().out
    result = json.loads((spec.out_dir() / "final" / "result.json").read_text())
    assert result["test_acc"] > 0.85 and f"test accuracy {result['test_acc']:.4f}" in out
    assert set(result["params"]) == {"l2_lambda", "eta_max"} and result["n_seeds"] == 1
    assert (spec.out_dir() / "final" / "curves.png").stat().st_size > 10_000
    assert load(spec, "fine").user_attrs["final"]["test_acc"] == result["test_acc"]
    # Running it again does not retrain.
    assert final.main(["--study", str(path)]) == 0
    assert "already recorded" in capsys.readouterr().out
    # Its out folder deleted: result.json is written again from the record, and the
    # files only a retraining makes are named
    shutil.rmtree(spec.out_dir() / "final")
    assert final.main(["--study", str(path)]) == 0
    out = capsys.readouterr().out
    again = json.loads((spec.out_dir() / "final" / "result.json").read_text())
    assert again["test_accs"] == result["test_accs"] and again["params"] == result["params"]
    assert "again from the study's record" in out and "network.npz" in out and "--force" in out


# The same and a larger target again: test_noise's stage run again (the suite's time budget).
@pytest.mark.slow
def test_target_is_total_not_more(quick_study):
    path = quick_study()
    assert coarse.main(["--study", str(path), "--trials", "3"]) == 0
    assert coarse.main(["--study", str(path), "--trials", "3"]) == 0
    spec = load_spec(path)
    assert len(load(spec, "coarse").get_trials()) == 3
    assert coarse.main(["--study", str(path), "--trials", "5"]) == 0
    trials = load(spec, "coarse").get_trials()
    assert len(trials) == 5 and all(t.state in st.FINISHED for t in trials)


def test_diverging_trial_is_recorded_and_study_goes_on(quick_study):
    path = quick_study(
        search={"l2_lambda": [1e-5, 1e-4], "eta_max": [1e3, 1e4]}, coarse={"trials": 3}
    )
    assert coarse.main(["--study", str(path)]) == 0
    trials = load(load_spec(path), "coarse").get_trials()
    assert len(trials) == 3
    diverged = [t for t in trials if t.user_attrs.get("diverged")]
    assert diverged and all(t.state == TrialState.PRUNED for t in diverged)
    assert all("diverged" in t.user_attrs["reason"] for t in diverged)
    for t in diverged:
        # the steps it trained: to where it diverged (said in its reason), not to its last report
        at = int(t.user_attrs["reason"].split("diverged at step ")[1].split(" ")[0])
        planned = t.user_attrs["epochs_planned"]
        total = 2 * 48 * 2  # steps: 2 cycles of 2 x n_s
        assert t.user_attrs["epochs_run"] == pytest.approx((at + 1) * planned / total, abs=1e-4)


def test_bad_study_file_gives_one_line_error(tmp_path, capsys):
    bad = tmp_path / "bad.toml"
    bad.write_text('name = "x"\n[search]\nl2_lambda = [1.0, 0.1]\n')
    assert coarse.main(["--study", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "bad.toml" in err and "search.l2_lambda" in err and "Traceback" not in err


def test_prepared_data_is_mmapped_and_checksum_guards_the_study(quick_study):
    spec = load_spec(quick_study())
    prepared = st.prepare_for(spec)
    splits = prepared.open()
    assert isinstance(splits.train.X, np.memmap) and splits.train.X.dtype == np.float32
    assert abs(float(splits.train.X.mean())) < 1e-3  # normalised before writing
    assert st.prepare_for(spec).path == prepared.path  # cached
    study = st.open_study(spec, "coarse")
    st.record_data(study, prepared)
    study.set_user_attr("data_checksum", "0" * 64)
    with pytest.raises(st.DataMismatchError, match="differ"):
        st.record_data(study, prepared)


@pytest.mark.slow  # test_dashboard and test_postgres read a study live (the suite's time budget)
def test_four_workers_on_sqlite_with_the_dashboard_reading(quick_study):
    """4 workers x 24 short trials on one SQLite file, optuna-dashboard reading: none FAIL."""
    from tests.search.conftest import get_json, run_dashboard

    path = quick_study(
        coarse={"trials": 24},
        training={"n_cycles": 1, "evals_per_cycle": 4},
        optuna={"workers": 4},
    )
    spec = load_spec(path)
    st.open_study(spec, "coarse")  # the dashboard is pointed at an existing database
    stop = threading.Event()
    reads: list = []

    def reader(base: str) -> None:
        # What the dashboard's page asks for while it is open: the list, then the study.
        while not stop.is_set():
            try:
                summaries = get_json(f"{base}/api/studies")["study_summaries"]
                for s in summaries:
                    detail = get_json(f"{base}/api/studies/{s['study_id']}")
                    reads.append(len(detail["trials"]))
            except Exception as exc:  # noqa: BLE001 - recorded, then asserted on
                reads.append(repr(exc))
            time.sleep(0.1)

    with run_dashboard(spec.storage_url()) as base:
        thread = threading.Thread(target=reader, args=(base,))
        thread.start()
        try:
            assert coarse.main(["--study", str(path)]) == 0
        finally:
            stop.set()
            thread.join()
        study_id = get_json(f"{base}/api/studies")["study_summaries"][0]["study_id"]
        # The dashboard serves a study's trials from a cache up to 2 s old (optuna-dashboard
        # 0.21: a TTL of 2 s under 100 trials): the last read waits that out.
        deadline = time.monotonic() + 10
        final_detail = get_json(f"{base}/api/studies/{study_id}")
        while len(final_detail["trials"]) < 24 and time.monotonic() < deadline:
            time.sleep(0.5)
            final_detail = get_json(f"{base}/api/studies/{study_id}")
    trials = load(spec, "coarse").get_trials()
    states = {t.state for t in trials}
    assert len(trials) == 24 and states <= set(st.FINISHED), states
    errors = [r for r in reads if isinstance(r, str)]
    assert len(reads) >= 3 and not errors, errors[:3]
    assert len(final_detail["trials"]) == 24


def _run_until(cmd, cond, timeout=120):
    proc = subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, start_new_session=True
    )
    deadline = time.time() + timeout
    while time.time() < deadline:
        if cond():
            return proc
        if proc.poll() is not None:
            err = proc.stderr.read().decode()
            raise AssertionError(f"the command ended ({proc.returncode}) first: {err}")
        time.sleep(0.05)
    proc.kill()
    raise AssertionError("condition not reached")


# A lost trial retried on the rerun: test_resume's worker that exited, test_signals' killed
# command (the suite's time budget).
@pytest.mark.slow
def test_sigkill_mid_trial_then_resume(quick_study):
    path = quick_study(
        coarse={"trials": 3},
        training={"n_cycles": 40},  # long enough that the kill lands mid-trial
        optuna={"heartbeat_interval": 1, "grace_period": 3, "pruner": "none"},
    )
    spec = load_spec(path)

    def state():
        try:
            trials = load(spec, "coarse").get_trials()
        except KeyError:
            return []
        return trials

    def one_done_one_running():
        t = state()
        # One finished result to keep intact; the second or the third trial to kill, so a
        # slow look at the study (a loaded machine) still has two windows to land in.
        return sum(x.state == TrialState.COMPLETE for x in t) >= 1 and any(
            # in the first half of its 320 evaluation points: the kill lands mid-trial
            x.state == TrialState.RUNNING
            and len(x.params) == 2
            and len(x.intermediate_values) < 160
            for x in t
        )

    proc = _run_until(
        [sys.executable, "-m", "search.coarse", "--study", str(path)], one_done_one_running
    )
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = {t.number: t.value for t in state() if t.state == TrialState.COMPLETE}
    killed = [t for t in state() if t.state == TrialState.RUNNING]
    assert len(killed) == 1, [
        (t.number, t.state.name, t.user_attrs.get("reason")) for t in state()
    ]
    rerun = subprocess.run(
        [sys.executable, "-m", "search.coarse", "--study", str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert rerun.returncode == 0, rerun.stderr
    after = state()
    assert not [t for t in after if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    assert sum(t.state in st.FINISHED for t in after) == 3
    for number, value in before.items():  # earlier results intact
        assert after[number].state == TrialState.COMPLETE and after[number].value == value
    assert after[killed[0].number].state == TrialState.FAIL
    retried = [t for t in after if t.system_attrs.get("failed_trial") == killed[0].number]
    assert len(retried) == 1 and retried[0].state in st.FINISHED, "\n".join(
        f"{t.number} {t.state.name} {sorted(t.params.values())} {t.system_attrs}" for t in after
    )
    if killed[0].params:  # killed after it drew its parameters: the retry has the same
        assert retried[0].params == killed[0].params


def test_a_final_run_that_diverges_says_so_with_the_fix(quick_study, capsys, monkeypatch):
    """The chosen configuration diverges in final training (its search runs did not, as
    happened to a pruned Fashion-MNIST search at eta_max 0.54): one line, exit 1, the fix."""
    import math

    from model.train import History, TrainingDiverged
    from search.sweep import user_train

    path = quick_study(coarse={"trials": 3}, fine={"trials": 2}, training={"n_cycles": 1})
    assert coarse.main(["--study", str(path)]) == 0
    assert fine.main(["--study", str(path)]) == 0

    def diverges(hp, data, report):
        raise TrainingDiverged(step=767, eta=0.505, loss=math.inf, history=History())

    monkeypatch.setattr(user_train, "train_function", lambda spec: diverges)
    capsys.readouterr()
    assert final.main(["--study", str(path)]) == 1
    err = capsys.readouterr().err
    assert "diverged in final training with seed 0 (at step 767, eta=0.505, loss=inf)" in err
    assert "though its search runs did not" in err and "lower the upper bound" in err
    assert "unexpected" not in err and "Traceback" not in err


def test_fine_commands_started_together_carry_the_coarse_runs_over_once(quick_study):
    """Three ``search.fine`` at once on a finished coarse study: the coarse runs are
    copied into the fine study once, every command counts the same target, and no
    configuration is drawn twice."""
    path = quick_study(coarse={"trials": 4}, fine={"trials": 4, "top_k": 2})
    assert coarse.main(["--study", str(path)]) == 0
    spec = load_spec(path)
    command = [sys.executable, "-m", "search.fine", "--study", str(path)]
    procs = [
        subprocess.Popen(
            command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for _ in range(3)
    ]
    outs = []
    for proc in procs:
        out, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err
        outs.append(out)
    study = optuna.load_study(study_name=f"{spec.name}-fine", storage=spec.storage_url())
    carried = [t for t in study.trials if "from_coarse" in t.user_attrs]
    coarse_runs = {t.user_attrs["from_coarse"] for t in carried}
    assert len(carried) == len(coarse_runs) > 0  # each coarse run once
    targets = {
        line.split("target ")[1].split(" trials")[0]
        for o in outs
        for line in o.splitlines()
        if "target " in line and "trials" in line
    }
    assert targets == {str(len(carried) + 4)}, outs
    new = [
        t
        for t in study.trials
        if "from_coarse" not in t.user_attrs
        and t.state == TrialState.COMPLETE
        and t.user_attrs.get("replicate", 0) == 0
    ]
    starts = {tuple(sorted(t.params.items())) for t in new if t.system_attrs.get("fixed_params")}
    drawn = [
        tuple(sorted(t.params.items())) for t in new if not t.system_attrs.get("fixed_params")
    ]
    # Every drawn configuration is new. A starting point both commands queued can still
    # run twice when one command's worker takes the other's copy before it is made blank
    # (studies._unfix_double_starts); that race is known and left.
    assert len(set(drawn)) == len(drawn) and not set(drawn) & starts


def _warm(n):
    x = optuna.distributions.FloatDistribution(0, 9)
    return [
        optuna.trial.create_trial(
            params={"x": float(i)},
            distributions={"x": x},
            value=0.5,
            user_attrs={"from_coarse": i},
        )
        for i in range(n)
    ]


def test_a_command_that_finds_the_fine_study_made_waits_for_its_creator_to_carry_over(
    quick_study,
):
    from search.sweep import stage

    spec = load_spec(quick_study())
    made = st.open_study(spec, "fine")
    other = st.open_study(spec, "fine")  # a command started at the same moment
    assert st.created_here(made) and not st.created_here(other)
    waiting = threading.Thread(target=stage.carry_over, args=(other, _warm(3)))
    waiting.start()  # first to look, it finds the study empty, and waits
    time.sleep(0.5)
    assert other.get_trials() == [] and waiting.is_alive()
    stage.carry_over(made, _warm(3))
    waiting.join(timeout=10)
    assert not waiting.is_alive()
    assert len(other.get_trials()) == 3 and other.user_attrs[stage.CARRIED] == 3


def test_a_fine_study_whose_creator_stopped_before_carrying_over_gets_the_runs(quick_study):
    from search.sweep import stage

    spec = load_spec(quick_study())
    made = st.open_study(spec, "fine")  # created here, then "stopped": nothing carried
    other = st.open_study(spec, "fine")  # a command that finds it made
    said = []
    stage.carry_over(other, _warm(3), wait=0.3, log=lambda *a, **k: said.append(a[0]))
    assert len(other.get_trials()) == 3 and other.user_attrs[stage.CARRIED] == 3
    assert "another command is creating it" in said[0]
    stage.carry_over(made, _warm(3))  # the creator, run again: recorded, nothing added twice
    assert len(made.get_trials()) == 3


def test_a_command_that_ends_while_another_still_trains_the_stage_says_so(quick_study, capsys):
    """No ``next:`` and no note from a command whose stage another command or machine is
    still running: it says what is left and who goes on."""
    import argparse

    from search import cli

    path = quick_study(coarse={"trials": 3})
    assert coarse.main(["--study", str(path)]) == 0
    spec = load_spec(path)
    study = st.open_study(spec, "coarse")
    args = argparse.Namespace(study=str(path), storage=None)
    capsys.readouterr()
    st.top_up(study, 4)  # another command's trial, waiting
    cli.end_stage(spec, study, spec.search, args, next_name="fine", replicates=1)
    out = capsys.readouterr().out
    assert "1 trial(s) waiting and 0 running, by another command or machine" in out
    assert "next:" not in out and "top 3 configurations" in out
    study.tell(study.ask(), 0.5)  # it ran: now this command's end is the stage's
    cli.end_stage(spec, study, spec.search, args, next_name="fine", replicates=1)
    assert "next: python -m search.fine" in capsys.readouterr().out


def test_runs_carried_over_from_coarse_say_so_in_the_tables_and_count_apart(quick_study, capsys):
    from search.reporting import markdown

    path = quick_study(coarse={"trials": 6}, fine={"trials": 3, "top_k": 6})
    assert coarse.main(["--study", str(path)]) == 0
    capsys.readouterr()
    assert fine.main(["--study", str(path)]) == 0
    out = capsys.readouterr().out
    spec = load_spec(path)
    study = optuna.load_study(study_name=f"{spec.name}-fine", storage=spec.storage_url())
    carried = [t for t in study.trials if "from_coarse" in t.user_attrs]
    assert carried  # the fine stage starts from the coarse runs in its ranges
    rows = [line.split() for line in out.splitlines()]
    numbers = {t.number for t in carried}
    carried_rows = [r for r in rows if r and r[0].isdigit() and int(r[0]) in numbers]
    assert carried_rows and all(r[-2:] == ["coarse", "-"] for r in carried_rows)
    md = markdown.stage_section("fine", study, {})
    new = len(study.trials) - len(carried)
    assert f"over {new} trials that ran" in md
    assert f"and {len(carried)} runs carried over from the coarse stage (trained there)." in md
    assert "| (coarse) | - |" in md


def test_a_fine_study_of_an_earlier_version_is_not_waited_for(quick_study):
    """Made before the carried runs were recorded: it has runs of its own, so it was given
    them long ago; a command that opens it goes on at once and adds nothing."""
    from search.sweep import stage

    spec = load_spec(quick_study())
    made = st.open_study(spec, "fine")
    made.add_trials(_warm(2))
    made.enqueue_trial({})  # a run of its own
    other = st.open_study(spec, "fine")
    said = []
    t0 = time.monotonic()
    stage.carry_over(other, _warm(2), wait=30, log=lambda *a, **k: said.append(a[0]))
    assert time.monotonic() - t0 < 5 and not said
    assert len(other.get_trials()) == 3 and other.user_attrs[stage.CARRIED] == 2


def test_a_final_run_whose_function_calls_sys_exit_is_one_line(quick_study, capsys, monkeypatch):
    from search.sweep import user_train

    path = quick_study(coarse={"trials": 3}, fine={"trials": 2}, training={"n_cycles": 1})
    assert coarse.main(["--study", str(path)]) == 0
    assert fine.main(["--study", str(path)]) == 0

    def exits(hp, data, report):
        sys.exit("done training")

    monkeypatch.setattr(user_train, "train_function", lambda spec: exits)
    capsys.readouterr()
    assert final.main(["--study", str(path)]) == 1
    err = capsys.readouterr().err
    assert "raised SystemExit: done training" in err and "Traceback" not in err


def test_the_report_counts_the_trials_that_ran_not_those_that_wait_or_were_retired(
    quick_study,
):
    from search.reporting import markdown

    spec = load_spec(quick_study())
    study = st.open_study(spec, "coarse")
    st.top_up(study, 5)
    for _ in range(2):
        t = study.ask()
        t.set_user_attr("epochs_run", 4.0)
        study.tell(t, 0.9)
    st.top_up(study, 3)  # a lower target: 2 of the 3 waiting are retired, 1 waits
    md = markdown.stage_section("coarse", study, {})
    assert "Epochs trained: 8.0 over 2 trials that ran" in md


def test_the_report_names_the_commands_as_the_user_runs_them(quick_study, monkeypatch):
    from search import cli
    from search.reporting import markdown

    spec = load_spec(quick_study())
    coarse_study = st.open_study(spec, "coarse")
    monkeypatch.setattr(cli, "LAUNCHER", "c2f")  # started as c2f report
    md = markdown.final_section(spec, {"coarse": coarse_study})
    assert f"the fine search first (`c2f fine --study {spec.path}`)" in md
    assert f"then `c2f final --study {spec.path}`" in md
    md = markdown.final_section(
        spec, {"coarse": coarse_study, "fine": st.open_study(spec, "fine")}
    )
    assert f"Not run yet: `c2f final --study {spec.path}`." in md


def test_a_study_file_whose_fixed_settings_changed_is_refused_until_put_back(quick_study, capsys):
    """Trials trained with 1 cycle and with 2 must not be ranked together, nor reported
    under the new settings: the command refuses, names what changed, and gives the fix."""
    path = quick_study(coarse={"trials": 2}, training={"n_cycles": 1})
    assert coarse.main(["--study", str(path)]) == 0
    quick_study(coarse={"trials": 3}, training={"n_cycles": 2})  # edited in place
    capsys.readouterr()
    assert coarse.main(["--study", str(path)]) == 2
    err = capsys.readouterr().err
    assert "[training] n_cycles = 2, but the trials of qs-coarse ran with 1" in err
    assert "put the old values back" in err and "new `name`" in err
    spec = load_spec(path)
    study = optuna.load_study(study_name=f"{spec.name}-coarse", storage=spec.storage_url())
    assert len(study.trials) == 2  # nothing queued or run under the new settings
    quick_study(coarse={"trials": 3}, training={"n_cycles": 1})  # put back
    assert coarse.main(["--study", str(path)]) == 0
    assert (
        len(optuna.load_study(study_name=f"{spec.name}-coarse", storage=spec.storage_url()).trials)
        == 3
    )


def test_settings_in_effect_are_compared_and_a_study_none_of_whose_trials_ran_takes_new_ones(
    quick_study, capsys
):
    spec = load_spec(quick_study(coarse={"trials": 2}, training={"n_cycles": 3}))
    study = st.open_study(spec, "coarse")
    st.check_settings(study, spec, "coarse")  # as worker --create records them
    st.top_up(study, 2)  # queued, none ran: a fixed file takes the new settings
    fixed = load_spec(quick_study(coarse={"trials": 2}, training={"n_cycles": 1}))
    st.check_settings(study, fixed, "coarse")
    assert coarse.main(["--study", str(fixed.path)]) == 0
    # A default written out is the default left out; what is measured may change.
    same = load_spec(
        quick_study(
            coarse={"trials": 2},
            training={"n_cycles": 1, "train_metrics": "running", "train_eval_size": 500},
        )
    )
    st.check_settings(st.open_study(same, "coarse"), same, "coarse")
    # The fine stage refuses coarse runs that ran under other settings than the file's.
    edited = quick_study(coarse={"trials": 2}, training={"n_cycles": 2})
    capsys.readouterr()
    assert fine.main(["--study", str(edited)]) == 2
    assert "n_cycles = 2, but the trials of qs-coarse ran with 1" in capsys.readouterr().err


def test_a_parameter_searched_then_fixed_or_fixed_then_searched_is_named_so(quick_study, capsys):
    """The message names what changed: a parameter no longer searched is to be put back
    in [search], not given an "old value" it never had; one newly searched, the reverse."""
    rho = {"rho": {"low": 0.0, "high": 0.9}}
    path = quick_study(coarse={"trials": 2}, search=rho)
    assert coarse.main(["--study", str(path)]) == 0
    quick_study(coarse={"trials": 2})  # rho taken out of [search]
    capsys.readouterr()
    assert coarse.main(["--study", str(path)]) == 2
    err = capsys.readouterr().err
    assert "[search] rho = 0.0 is fixed now, but the trials of qs-coarse searched it. " in err
    assert "To go on with them, put what they searched back in [search]; or give" in err
    assert "old value" not in err
    other = quick_study("fixed", coarse={"trials": 2})
    assert coarse.main(["--study", str(other)]) == 0
    quick_study("fixed", coarse={"trials": 2}, search=rho)
    capsys.readouterr()
    assert coarse.main(["--study", str(other)]) == 2
    err = capsys.readouterr().err
    assert "[search] rho is searched now, but the trials of fixed-coarse ran with it at 0.0" in err
    assert "take what they ran with out of [search] and set it back; or give" in err
    assert "old value" not in err


def test_a_range_drawn_another_way_is_refused_and_new_bounds_are_not(quick_study, capsys):
    """Optuna cannot mix a parameter drawn log and not log (or as other choices) in one
    study: every new trial would fail. The rerun is refused, naming the range; bounds that
    moved are the user's to move."""
    path = quick_study(coarse={"trials": 2})
    assert coarse.main(["--study", str(path)]) == 0
    quick_study(coarse={"trials": 3}, search={"l2_lambda": {"low": 1e-5, "high": 1e-1}})
    capsys.readouterr()
    assert coarse.main(["--study", str(path)]) == 2
    err = capsys.readouterr().err
    assert (
        '[search] l2_lambda is drawn as "float" now, but the trials of qs-coarse drew it ' in err
    )
    assert 'as "float, log"' in err and "give the ranges back their kind, log" in err
    quick_study(coarse={"trials": 3}, search={"l2_lambda": [1e-6, 1e-1]})  # wider, still log
    assert coarse.main(["--study", str(path)]) == 0


def test_a_study_recorded_with_a_setting_nothing_read_goes_on_once_it_is_removed(
    quick_study,
):
    """A study run by an earlier version with eta in [training] beside the cyclical
    schedule (which never read it) recorded eta = 0.05 with its settings; the file, with
    eta taken out as the refusal asks, goes on with those trials."""
    path = quick_study(coarse={"trials": 2})
    assert coarse.main(["--study", str(path)]) == 0
    spec = load_spec(path)
    study = load(spec, "coarse")
    old = study.user_attrs[st.SETTINGS]
    study.set_user_attr(st.SETTINGS, {**old, "training": {**old["training"], "eta": "0.05"}})
    assert "eta" not in old["training"]  # nothing the schedule never reads is recorded now
    assert coarse.main(["--study", str(path), "--trials", "3"]) == 0


def test_a_changed_stage_override_is_named_in_its_own_table(quick_study):
    """A setting the fine stage takes from [fine.training] is named there, not in
    [training], when a rerun changed it."""
    from search.config.study import StudyDefinitionError

    spec = load_spec(quick_study(fine={"trials": 2, "training": {"n_cycles": 2}}))
    study = st.open_study(spec, "fine")
    st.check_settings(study, spec, "fine")
    study.add_trial(
        optuna.trial.create_trial(
            value=0.9,
            params={"l2_lambda": 1e-3},
            distributions={"l2_lambda": optuna.distributions.FloatDistribution(1e-5, 1e-1)},
        )
    )
    edited = load_spec(quick_study(fine={"trials": 2, "training": {"n_cycles": 3}}))
    with pytest.raises(StudyDefinitionError) as info:
        st.check_settings(study, edited, "fine")
    assert info.value.field == "fine.training"
    assert "[fine.training] n_cycles = 3, but the trials of qs-fine ran with 2" in str(info.value)


def test_a_fine_study_whose_creator_exited_mid_carry_is_completed_without_the_long_wait(
    quick_study,
):
    from search.sweep import stage
    from search.sweep.workers import lost

    spec = load_spec(quick_study())
    made = st.open_study(spec, "fine")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()  # a process of this machine that has exited
    made.set_user_attr(stage.CARRYING, {**lost.owner_record(), "pid": gone.pid, "start": ""})
    made.add_trials(_warm(3)[:1])  # it had added one of three when it was stopped
    other = st.open_study(spec, "fine")
    t0 = time.monotonic()
    stage.carry_over(other, _warm(3), wait=30, log=lambda *a, **k: None)
    assert time.monotonic() - t0 < 5  # not the 30 s for a creator elsewhere
    numbers = sorted(t.user_attrs["from_coarse"] for t in other.get_trials())
    assert numbers == [0, 1, 2] and other.user_attrs[stage.CARRIED] == 3


def test_fine_refuses_coarse_runs_made_on_other_data_and_names_the_flag(quick_study, capsys):
    """coarse ran with --n-val 200; fine without it would rank the coarse runs, scored on
    200 validation images, beside its own on 300: refused (exit 2), naming the flag."""
    path = quick_study(coarse={"trials": 2}, fine={"trials": 1})
    assert coarse.main(["--study", str(path), "--n-val", "200"]) == 0
    capsys.readouterr()
    assert fine.main(["--study", str(path)]) == 2
    err = capsys.readouterr().err
    assert "trained on other data" in err and "(--n-val 200)" in err, err
    spec = load_spec(path)
    assert st.load_existing(spec, "fine") is None  # nothing made on the wrong data
    # final, on the coarse study, names the flag too
    assert final.main(["--study", str(path)]) == 2
    assert "it ran with --n-val 200: give this command the same" in capsys.readouterr().err
    assert fine.main(["--study", str(path), "--n-val", "200"]) == 0
