"""Resuming sweeps: lost workers' trials, lowered targets, and the commands' guard rails."""

import io
import subprocess
import sys
import time

import optuna
import pytest
from optuna.trial import TrialState

from search import coarse, final, fine
from search import study as st
from search.spec import load_spec
from search.storage import make_storage
from tests.search.conftest import REPO


def _orphan(spec, storage_url: str) -> int:
    """A trial left RUNNING by a process that died before its first heartbeat.

    The process really ran and exited: its PID and start time are those of a
    process that is gone, as after a SIGKILL between taking a trial and training.
    """
    study = st.open_study(spec.with_overrides(storage=storage_url), "coarse")
    study.set_user_attr("target", 3)
    study.enqueue_trial({"l2_lambda": 1e-3, "eta_max": 0.1})
    trial_id = study._pop_waiting_trial_id()
    owner = st._owner()
    probe = subprocess.Popen([sys.executable, "-c", "pass"])
    probe.wait()
    owner = {**owner, "pid": probe.pid, "start": "1"}  # a process that has exited
    study._storage.set_trial_system_attr(trial_id, st.OWNER, owner)
    return study._storage.get_trial(trial_id).number


@pytest.mark.parametrize("kind", ["sqlite", "journal"])
def test_rerun_retries_a_trial_whose_worker_process_exited(quick_study, tmp_path, kind):
    path = quick_study(coarse={"trials": 3}, optuna={"pruner": "none"})
    url = (
        f"sqlite:///{tmp_path / 'o.db'}"
        if kind == "sqlite"
        else f"journal:///{tmp_path / 'o.log'}"
    )
    spec = load_spec(path)
    number = _orphan(spec, url)
    # Before the fix this waited for the RUNNING trial forever.
    rerun = subprocess.run(
        [sys.executable, "-m", "search.coarse", "--study", str(path), "--storage", url],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert rerun.returncode == 0, rerun.stderr
    storage = make_storage(url, heartbeat_interval=None, grace_period=None)
    trials = optuna.load_study(study_name="qs-coarse", storage=storage).get_trials()
    lost = trials[number]
    assert lost.state == TrialState.FAIL and "worker lost" in lost.user_attrs["reason"]
    retry = [t for t in trials if t.system_attrs.get("requeued_from") == number]
    assert len(retry) == 1 and retry[0].state == TrialState.COMPLETE
    # The lost trial was enqueued and died before suggesting: its retry runs the
    # enqueued parameters, not fresh ones.
    assert retry[0].params == {"l2_lambda": 1e-3, "eta_max": 0.1}
    assert sum(t.state in st.FINISHED for t in trials) == 3
    assert not [t for t in trials if t.state in st.LIVE]


def test_silent_trial_is_failed_after_the_grace_period(quick_study):
    """Another machine's trial that never sent a heartbeat: failed once it is old enough."""
    spec = load_spec(quick_study(optuna={"heartbeat_interval": 1, "grace_period": 2}))
    study = st.open_study(spec, "coarse")
    study.enqueue_trial({"l2_lambda": 1e-3, "eta_max": 0.1})
    trial_id = study._pop_waiting_trial_id()
    study._storage.set_trial_system_attr(trial_id, st.OWNER, {"machine": "elsewhere", "pid": 1})
    assert st.reap_lost_trials(study) == []  # young: it may still send its first heartbeat
    time.sleep(2.5)
    assert st.reap_lost_trials(study) == [0]
    assert st.reap_lost_trials(study) == []  # once only
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL and "no heartbeat" in trials[0].user_attrs["reason"]
    assert trials[1].state == TrialState.WAITING and trials[1].params == trials[0].params


def test_a_live_worker_of_this_machine_is_left_alone(quick_study):
    spec = load_spec(quick_study())
    study = st.open_study(spec, "coarse")
    study.enqueue_trial({"l2_lambda": 1e-3, "eta_max": 0.1})
    trial_id = study._pop_waiting_trial_id()
    study._storage.set_trial_system_attr(trial_id, st.OWNER, st._owner())  # this process
    assert st.reap_lost_trials(study) == []
    assert study.get_trials()[0].state == TrialState.RUNNING


def test_a_lower_target_caps_the_queue(quick_study, capsys):
    path = quick_study(coarse={"trials": 6})
    spec = load_spec(path)
    study = st.open_study(spec, "coarse")
    st.top_up(study, 6)  # queued by an earlier command with a larger target
    assert coarse.main(["--study", str(path), "--trials", "3"]) == 0
    assert "3/3 finished" in capsys.readouterr().out
    c = st.counts(study)
    assert c["COMPLETE"] + c["PRUNED"] == 3 and c["WAITING"] == 3
    assert coarse.main(["--study", str(path), "--trials", "6"]) == 0  # used later
    c = st.counts(study)
    assert c["COMPLETE"] + c["PRUNED"] == 6 and c["WAITING"] == 0


def test_progress_redraws_one_line_on_a_terminal(quick_study):
    spec = load_spec(quick_study())
    study = st.open_study(spec, "coarse")
    st.top_up(study, 2)

    class Tty(io.StringIO):
        def isatty(self):
            return True

    out = Tty()
    progress = st.Progress(study, 2, stream=out)
    progress()
    progress.close()
    assert out.getvalue().startswith("\r[") and out.getvalue().endswith("\n")
    assert out.getvalue().count("\n") == 1
    piped = io.StringIO()
    st.Progress(study, 2, stream=piped)()
    assert piped.getvalue().startswith("[") and "\r" not in piped.getvalue()


def test_fine_and_final_need_coarse_results_and_create_nothing(quick_study, capsys):
    path = quick_study()
    spec = load_spec(path)
    assert fine.main(["--study", str(path)]) == 2
    assert "run python -m search.coarse" in capsys.readouterr().err
    assert final.main(["--study", str(path)]) == 2
    assert "run python -m search.coarse" in capsys.readouterr().err
    assert not (spec.base_dir / "qs.db").exists() or not optuna.get_all_study_names(
        spec.storage_url()
    )


def test_fine_checks_its_flags_and_keeps_its_ranges(quick_study, tmp_path, capsys):
    path = quick_study()
    url = f"sqlite:///{tmp_path / 'other.db'}"
    assert coarse.main(["--study", str(path), "--storage", url]) == 0
    out = capsys.readouterr().out
    # The next command keeps the flags that name the storage.
    assert f"next: python -m search.fine --study {path} --storage {url}" in out
    assert fine.main(["--study", str(path), "--storage", url, "--margin", "-1"]) == 2
    assert "--margin must be >= 0" in capsys.readouterr().err
    assert fine.main(["--study", str(path), "--storage", url, "--top-k", "0"]) == 2
    assert "--top-k must be >= 1" in capsys.readouterr().err
    assert fine.main(["--study", str(path), "--storage", url, "--trials", "2"]) == 0
    capsys.readouterr()
    assert fine.main(["--study", str(path), "--storage", url, "--margin", "0.5"]) == 2
    assert "was started with" in capsys.readouterr().err
    assert fine.main(["--study", str(path), "--storage", url]) == 0  # resumes as it was


def test_dashboard_hint_for_each_storage(quick_study, tmp_path):
    spec = load_spec(quick_study())
    assert st.dashboard_hint(spec) == f"optuna-dashboard {spec.storage_url()}"
    journal = spec.with_overrides(storage=f"journal:///{tmp_path / 'j.log'}")
    assert st.dashboard_hint(journal) == f"optuna-dashboard {tmp_path / 'j.log'}"


@pytest.mark.parametrize("where", ["after taking the trial", "while telling the result"])
def test_ctrl_c_outside_the_objective_still_requeues(quick_study, monkeypatch, where):
    spec = load_spec(quick_study())
    study = st.open_study(spec, "coarse")
    study.enqueue_trial({"l2_lambda": 1e-3, "eta_max": 0.1})
    storage = study._storage

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    if where == "after taking the trial":
        monkeypatch.setattr(storage, "set_trial_system_attr", interrupt)
    else:
        monkeypatch.setattr(study, "tell", interrupt)

    def objective(trial):
        return trial.suggest_float("l2_lambda", 1e-5, 1e-1, log=True) * 0 + 0.5

    with pytest.raises(KeyboardInterrupt):
        st.run_trials(study, objective)
    monkeypatch.undo()
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL and "interrupted" in trials[0].user_attrs["reason"]
    assert trials[1].state == TrialState.WAITING
    assert trials[1].system_attrs["requeued_from"] == 0
    # The retry runs the enqueued parameters.
    assert st.run_trials(study, objective) == 1
    assert study.get_trials()[1].params["l2_lambda"] == 1e-3


def test_owner_check_without_proc(monkeypatch):
    """Where /proc cannot tell (another OS, hidepid), a live PID is never taken for dead."""
    monkeypatch.setattr(st, "_process_start", lambda pid: None)
    me = st._owner()
    assert not st._owner_gone(me)
    probe = subprocess.Popen([sys.executable, "-c", "pass"])
    probe.wait()
    assert st._owner_gone({**me, "pid": probe.pid})
    assert not st._owner_gone({**me, "machine": "elsewhere", "pid": probe.pid})


def test_a_reused_pid_is_not_the_old_worker():
    me = st._owner()
    assert st._owner_gone({**me, "start": "1"})  # this PID, but a process started earlier


def test_retries_drop_the_dead_owner_and_stop_after_three(quick_study):
    from search.storage import MAX_RETRIES_OF_LOST_TRIAL, OWNER, requeue, retry_lost_trial

    spec = load_spec(quick_study())
    study = st.open_study(spec, "coarse")
    study.enqueue_trial({"l2_lambda": 1e-3, "eta_max": 0.1})
    trial_id = study._pop_waiting_trial_id()
    study._storage.set_trial_system_attr(trial_id, OWNER, {"machine": "m", "pid": 1})
    study._storage.set_trial_state_values(trial_id, state=TrialState.FAIL)
    for _ in range(MAX_RETRIES_OF_LOST_TRIAL + 2):
        failed = study.get_trials()[-1]
        retry_lost_trial(study, failed)  # what the heartbeat check calls
        last = study.get_trials()[-1]
        if last.number == failed.number:
            break  # no more retries
        assert OWNER not in last.system_attrs
        assert last.system_attrs["fixed_params"] == {"l2_lambda": 1e-3, "eta_max": 0.1}
        assert last.system_attrs["failed_trial"] == 0
        tid = study._pop_waiting_trial_id()
        study._storage.set_trial_state_values(tid, state=TrialState.FAIL)
    trials = study.get_trials()
    assert len(trials) == 1 + MAX_RETRIES_OF_LOST_TRIAL
    assert trials[-1].system_attrs["retry_history"] == list(range(MAX_RETRIES_OF_LOST_TRIAL))
    assert requeue(study, trials[-1])  # Ctrl-C re-queues without a limit
