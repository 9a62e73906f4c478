"""Resuming sweeps: lost workers' trials, lowered targets, and the commands' guard rails."""

import io
import subprocess
import sys

import optuna
import pytest
from optuna.trial import TrialState

from search import cli, coarse, final, fine
from search.config.study import load_spec
from search.sweep import studies as st
from search.sweep.progress import Progress
from search.sweep.workers import lost
from search.sweep.workers.loop import take
from search.sweep.workers.storage import make_storage, storage_of
from tests.search.conftest import run_coarse


def _taken(study: optuna.Study, owner: dict) -> optuna.trial.FrozenTrial:
    """Queue the quick start's first point and take it as ``owner``."""
    storage = storage_of(study)
    study.enqueue_trial({"l2_lambda": 1e-3, "eta_max": 0.1})
    tid = take(storage, storage.get_study_id_from_name(study.study_name))
    storage.set_trial_system_attr(tid, lost.OWNER, owner)
    return storage.get_trial(tid)


def _exited_pid() -> int:
    probe = subprocess.Popen([sys.executable, "-c", "pass"])
    probe.wait()
    return probe.pid


def _orphan(spec, storage_url: str) -> int:
    """A trial left RUNNING by a process that died right after taking it.

    The process really ran and exited: its PID and start time are those of a
    process that is gone, as after a SIGKILL between taking a trial and training.
    """
    study = st.open_study(spec.with_overrides(storage=storage_url), "coarse")
    study.set_user_attr("target", 3)
    owner = {**lost.owner_record(), "pid": _exited_pid(), "start": "1"}
    return _taken(study, owner).number


# A journal file's lost trials: test_queue's exactly-once contract runs on it (the time budget).
@pytest.mark.parametrize("kind", ["sqlite", pytest.param("journal", marks=pytest.mark.slow)])
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
    rerun = run_coarse(path, url, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    storage = make_storage(url)
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


def test_a_silent_worker_of_another_machine_is_lost_after_the_grace_period(quick_study):
    spec = load_spec(quick_study(optuna={"heartbeat_interval": 1, "grace_period": 2}))
    study = st.open_study(spec, "coarse")
    trial = _taken(study, {**lost.owner_record(), "machine": "elsewhere", "pid": 1})
    beat = trial.system_attrs[lost.OWNER]["t"]
    assert lost.lost_reason(trial, grace_period=2, now=beat + 1.9) is None  # may still beat
    reason = lost.lost_reason(trial, grace_period=2, now=beat + 2.5)
    assert reason is not None and "no heartbeat" in reason and "for 2 s" in reason
    study_id = storage_of(study).get_study_id_from_name(study.study_name)
    assert lost.reap(storage_of(study), study_id, grace_period=0.0) == [0]
    assert lost.reap(storage_of(study), study_id, grace_period=0.0) == []  # once only
    trials = study.get_trials()
    assert trials[0].state == TrialState.FAIL and "no heartbeat" in trials[0].user_attrs["reason"]
    assert trials[1].state == TrialState.WAITING and trials[1].params == trials[0].params


def test_a_live_worker_of_this_machine_is_left_alone(quick_study):
    spec = load_spec(quick_study())
    study = st.open_study(spec, "coarse")
    trial = _taken(study, lost.owner_record())  # this process
    assert lost.lost_reason(trial, grace_period=30) is None
    study_id = storage_of(study).get_study_id_from_name(study.study_name)
    assert lost.reap(storage_of(study), study_id, grace_period=30) == []
    assert study.get_trials()[0].state == TrialState.RUNNING


def test_a_lower_target_shrinks_the_queue(quick_study, capsys):
    path = quick_study(coarse={"trials": 6})
    spec = load_spec(path)
    study = st.open_study(spec, "coarse")
    st.top_up(study, 6)  # queued by an earlier command with a larger target
    assert coarse.main(["--study", str(path), "--trials", "3"]) == 0
    assert "3/3 finished" in capsys.readouterr().out
    c = st.counts(study)
    assert c["COMPLETE"] + c["PRUNED"] == 3 and c["WAITING"] == 0 and c["RETIRED"] == 3
    assert c["FAIL"] == 0  # retired, not failed
    dropped = [t for t in study.get_trials() if t.state == TrialState.FAIL]
    assert all(
        t.user_attrs["reason"].startswith("not needed: over the target of 3 ") for t in dropped
    )
    assert coarse.main(["--study", str(path), "--trials", "6"]) == 0  # raised later
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
    progress = Progress(study, 2, stream=out)
    progress()
    progress.close()
    assert out.getvalue().startswith("\r0/2 ") and out.getvalue().endswith("\n")
    assert out.getvalue().count("\n") == 1
    piped = io.StringIO()
    Progress(study, 2, stream=piped)()
    assert piped.getvalue().startswith("0/2 finished") and "\r" not in piped.getvalue()


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
    assert cli.dashboard_hint(spec) == f"optuna-dashboard {spec.storage_url()}"
    journal = spec.with_overrides(storage=f"journal:///{tmp_path / 'j.log'}")
    assert cli.dashboard_hint(journal) == f"optuna-dashboard {tmp_path / 'j.log'}"


def test_owner_check_without_proc(monkeypatch):
    """Where /proc cannot tell (another OS, hidepid), a live PID is never taken for dead."""
    monkeypatch.setattr(lost, "process_start", lambda pid: None)
    me = lost.owner_record()
    assert not lost.owner_gone(me)
    assert lost.owner_gone({**me, "pid": _exited_pid()})
    assert not lost.owner_gone({**me, "machine": "elsewhere", "pid": _exited_pid()})


def test_a_reused_pid_is_not_the_old_worker():
    me = lost.owner_record()
    assert lost.owner_gone({**me, "start": "1"})  # this PID, but a process started earlier


def test_a_stage_in_which_every_trial_failed_exits_1_with_the_reasons(
    quick_study, capsys, monkeypatch
):
    from search import status
    from search.sweep import builtin

    def broken_fit(*args, **kwargs):
        raise ValueError("batch_size broken on purpose")

    monkeypatch.setattr(builtin, "fit", broken_fit)  # the forked workers inherit it
    path = quick_study()
    assert coarse.main(["--study", str(path)]) == 1
    out, err = capsys.readouterr()
    assert "error: every trial of qs-coarse failed: 6 x ValueError: batch_size" in err
    assert "next:" not in out  # nothing to go on with
    assert status.main(["--study", str(path)]) == 0
    assert "  failed   6 x ValueError: batch_size" in capsys.readouterr().out
    trial = st.open_study(load_spec(path), "coarse").get_trials()[0]
    assert "Traceback" in trial.user_attrs["traceback"]  # for the dashboard


def _draw(study, space):
    from search.config import space as sp

    trial = study.ask()  # takes the first WAITING trial, as a worker does
    params = sp.suggest(trial, space)
    study.tell(trial, 0.5)
    return trial.number, params


def test_processes_that_open_a_study_at_once_draw_different_configurations(quick_study):
    """Two commands started together open the study with the same trials, so the same
    seed: taking turns, they must still draw a new configuration for every trial. A lone
    process draws what one seeded sampler draws (reproducible, as before)."""
    spec = load_spec(quick_study())
    space = spec.search
    first = st.open_study(spec, "coarse")
    st.top_up(first, 8)
    second = st.open_study(spec, "coarse")  # the other command, at the same moment
    drawn = [_draw(study, space) for _ in range(4) for study in (first, second)]
    assert [n for n, _ in drawn] == list(range(8))
    configs = {tuple(sorted(p.items())) for _, p in drawn}
    assert len(configs) == 8, drawn  # one seed per process drew each value twice

    alone = st.open_study(load_spec(quick_study("alone")), "coarse")
    st.top_up(alone, 4)
    plain = optuna.create_study(sampler=st.make_sampler(spec), direction="maximize")
    for _ in range(4):
        plain.enqueue_trial({})
    assert [_draw(alone, space)[1] for _ in range(4)] == [_draw(plain, space)[1] for _ in range(4)]


def test_a_lone_resume_past_retired_trials_draws_from_one_stream(quick_study):
    """Trials retired from the queue (a lowered target) were run by nobody: a lone
    process taking the trials after them is still alone, and draws as one seeded sampler
    does, not from per-trial seeds."""
    spec = load_spec(quick_study())
    space = spec.search
    study = st.open_study(spec, "coarse")
    st.top_up(study, 4)
    st.top_up(study, 2)  # trials 2 and 3 retired
    st.top_up(study, 4)  # trials 4 and 5 queued
    alone = st.open_study(spec, "coarse")
    plain = optuna.create_study(sampler=st.make_sampler(spec), direction="maximize")
    for _ in range(4):
        plain.enqueue_trial({})
    drawn = [_draw(alone, space) for _ in range(4)]
    assert [n for n, _ in drawn] == [0, 1, 4, 5]
    assert [p for _, p in drawn] == [_draw(plain, space)[1] for _ in range(4)]


def test_starting_points_queued_twice_by_two_commands_run_once(quick_study):
    spec = load_spec(quick_study())
    study = st.open_study(spec, "coarse")
    start = {"l2_lambda": 1e-3, "eta_max": 0.05}
    for _ in range(2):  # each command queued the same start before seeing the other's
        study.enqueue_trial(start)
    study.enqueue_trial({})
    st.top_up(study, 3, enqueue=[start])  # the second command's top-up: nothing more
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == 3  # the target's count stays
    fixed = [t.system_attrs.get("fixed_params") for t in waiting]
    assert fixed[0] == start and not fixed[1] and not fixed[2]  # the copy drawn afresh
    drawn = [_draw(study, spec.search)[1] for _ in range(3)]
    assert drawn[0] == start and len({tuple(sorted(p.items())) for p in drawn}) == 3
