"""Bookkeeping is not failure: re-queued and retired trials are never shown as "failed".

A Ctrl-C re-queues the running trials, two commands on one study retire the
later copy of a replicate, a lowered target retires waiting trials: Optuna
stores each as FAIL, and every count a user reads (the progress line, the
commands' last lines, ``status``, the report) shows them as "re-queued" or
"retired" instead. A real failure still shows, with its reason. Real signals
go to real ``search.coarse`` processes, as in ``test_signals.py``.
"""

from __future__ import annotations

import io
import os
import re
import signal
import textwrap

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState, create_trial

from search import coarse, status
from search.config.study import load_spec
from search.reporting import markdown
from search.sweep import replicates as rep
from search.sweep import stage
from search.sweep import studies as st
from search.sweep.progress import Progress
from search.sweep.workers import bookkeeping as bk
from tests.search.conftest import dump_toml, run_coarse, start_coarse, wait_until_training

INTERRUPTS = 2
# The last progress line of a command: its finished trials of the total, and the states.
LAST_LINE = re.compile(r"^(\d+)/(\d+) finished \((.*), (\d+) running\)", re.M)


def last_progress(out: str) -> tuple[int, int, str]:
    """(finished, total, states) of the last progress line in a command's output."""
    *_, last = LAST_LINE.finditer(out)
    return int(last[1]), int(last[2]), last[3]


def status_text(path, url: str, capsys) -> str:
    capsys.readouterr()
    assert status.main(["--study", str(path), "--storage", url]) == 0
    return capsys.readouterr().out


def test_many_ctrl_c_then_a_resume_shows_no_failure_and_the_exact_target(
    quick_study, tmp_path, capsys
):
    path = quick_study(
        "bk",
        coarse={"trials": 4},
        training={"n_cycles": 24},  # a second or more a trial: each Ctrl-C lands mid-training
        optuna={"pruner": "none", "workers": 2},
    )
    url = f"sqlite:///{tmp_path / 'bk.db'}"
    for _ in range(INTERRUPTS):
        proc = start_coarse(path, url)
        wait_until_training(proc, url, "bk-coarse")
        os.killpg(proc.pid, signal.SIGINT)  # what a terminal sends
        _, err = proc.communicate(timeout=60)
        assert proc.returncode == 130, err
    study = optuna.load_study(study_name="bk-coarse", storage=url)
    stopped = study.get_trials(states=(TrialState.FAIL,))
    assert len(stopped) >= INTERRUPTS  # a trial trained at each Ctrl-C
    assert all(t.system_attrs[bk.ATTR] == "requeued" for t in stopped)

    rerun = run_coarse(path, url, timeout=300)
    assert rerun.returncode == 0, rerun.stderr
    states = f"4 complete, 0 pruned, 0 failed, {len(stopped)} re-queued"
    assert last_progress(rerun.stdout) == (4, 4, states)
    shown = status_text(path, url, capsys)
    assert "bk-coarse: done" in shown
    assert (
        "trials   4/4 finished; COMPLETE 4, PRUNED 0, FAIL 0, RUNNING 0, WAITING 0; "
        f"{len(stopped)} re-queued"
    ) in shown
    assert "failed" not in shown
    last_line = f"4 finished of target 4 (0 failed, {len(stopped)} re-queued)"
    assert st.finished_text(study, 4) == last_line  # search.worker's last line
    table = markdown.stage_section("coarse", study, {})
    assert "| COMPLETE | PRUNED | FAIL | RUNNING | WAITING | re-queued |" in table
    assert f"| 4 | 0 | 0 | 0 | 0 | {len(stopped)} |" in table


# The race made certain: the retired replicate and the last line's tests below (the suite's
# time budget).
@pytest.mark.slow
def test_two_commands_on_one_study_show_no_failure_and_the_exact_target(
    quick_study, tmp_path, capsys
):
    path = quick_study(
        "two",
        coarse={"trials": 4, "replicates": 2, "replicate_top": 2},
        training={"n_cycles": 24},  # a second or more a trial: the first is seen training
        optuna={"pruner": "none", "workers": 1},
    )
    url = f"sqlite:///{tmp_path / 'two.db'}"
    first = start_coarse(path, url)
    wait_until_training(first, url, "two-coarse")  # the study and its data exist
    second = start_coarse(path, url)
    outs = [proc.communicate(timeout=300) for proc in (first, second)]
    for proc, (out, err) in zip((first, second), outs, strict=True):
        assert proc.returncode == 0, err
        done, total, states = last_progress(out)
        # The target, with the replicates if this command's pool ran any of them (its own
        # or the other's): never more than its total.
        assert done == total and total in (4, 4 + 2) and ", 0 failed" in states, out
    shown = status_text(path, url, capsys)
    assert "two-coarse: done" in shown
    assert "trials   4/4 finished (+ 2 replicate runs); COMPLETE 6, PRUNED 0, FAIL 0" in shown
    assert "failed" not in shown


def test_a_replicate_queued_by_two_commands_at_once_is_retired_not_failed(
    quick_study, monkeypatch, capsys
):
    """The race of two commands made certain: each queues the same replicates."""
    path = quick_study(coarse={"trials": 4, "replicates": 2, "replicate_top": 2})
    queue = rep.queue_replicates

    def both_commands(study: optuna.Study, replicates: int, top: int) -> int:
        missing = rep._missing(study.get_trials(), replicates, top)
        queued = queue(study, replicates, top)
        for params, index in missing:  # what the other command queued at the same moment
            study.enqueue_trial(params, user_attrs={rep.REPLICATE: index})
        rep._fail_duplicates(study)  # as the other command does after queueing
        return queued

    monkeypatch.setattr(stage, "queue_replicates", both_commands)
    assert coarse.main(["--study", str(path)]) == 0
    out = capsys.readouterr().out
    assert last_progress(out)[:2] == (6, 6)
    assert ", 0 failed, 2 retired" in last_progress(out)[2]
    study = optuna.load_study(study_name="qs-coarse", storage=load_spec(path).storage_url())
    c = st.counts(study)
    assert (c["FAIL"], c["RETIRED"], c["COMPLETE"] + c["PRUNED"]) == (0, 2, 6)
    shown = status_text(path, load_spec(path).storage_url(), capsys)
    assert "trials   4/4 finished (+ 2 replicate runs)" in shown
    assert "FAIL 0, RUNNING 0, WAITING 0; 2 retired" in shown and "failed" not in shown


# One worker runs the trials in order; its first call raises.
FIRST_CALL_RAISES = """
    calls = []

    def train(hp, data, report):
        calls.append(hp)
        if len(calls) == 1:
            raise MemoryError("no room for the first network")
        report(6, 0.5)
        return 0.75
"""


def test_a_real_failure_still_shows_with_its_reason(tmp_path, capsys):
    (tmp_path / "net.py").write_text(textwrap.dedent(FIRST_CALL_RAISES))
    doc = {
        "name": "own",
        "data": {"name": "digits", "n_val": 300},
        "model": {"train": "net.py:train"},
        "training": {"batch_size": 50, "n_s": 24, "n_cycles": 1, "evals_per_cycle": 4},
        "search": {"l2_lambda": [1e-5, 1e-1], "eta_max": [1e-3, 0.5]},
        "coarse": {"trials": 4, "replicates": 1},
        "optuna": {"workers": 1, "pruner": "none"},
    }
    path = tmp_path / "own.toml"
    path.write_text(dump_toml(doc))
    assert coarse.main(["--study", str(path)]) == 0
    out = capsys.readouterr().out
    # One of the target's four trials raised: the line says so and does not reach 4/4.
    assert last_progress(out) == (3, 4, "3 complete, 0 pruned, 1 failed")
    study = optuna.load_study(study_name="own-coarse", storage=load_spec(path).storage_url())
    assert st.finished_text(study, 4) == "3 finished of target 4 (1 failed)"
    shown = status_text(path, load_spec(path).storage_url(), capsys)
    assert "COMPLETE 3, PRUNED 0, FAIL 1, RUNNING 0, WAITING 0\n" in shown
    assert "failed   1 x MemoryError: no room for the first network" in shown
    table = markdown.stage_section("coarse", study, {})
    assert "| COMPLETE | PRUNED | FAIL | RUNNING | WAITING |\n" in table
    assert "| 3 | 0 | 1 | 0 | 0 |\n" in table


DIST = {"l2_lambda": FloatDistribution(1e-5, 1e-1, log=True)}


def failed(reason: str, **system_attrs) -> optuna.trial.FrozenTrial:
    return create_trial(
        state=TrialState.FAIL,
        params={"l2_lambda": 1e-3},
        distributions=DIST,
        user_attrs={"reason": reason},
        system_attrs=system_attrs,
    )


@pytest.mark.parametrize(
    "trial, kind",
    [
        (failed("interrupted (SIGINT)"), bk.Kind.REQUEUED),
        (
            failed("worker lost: its worker (pid 12 on this machine) exited mid-trial"),
            bk.Kind.REQUEUED,
        ),
        (failed("not needed: duplicate replicate"), bk.Kind.RETIRED),
        (failed("not needed: target lowered to 3"), bk.Kind.RETIRED),
        (failed("worker lost: no heartbeat (not retried: lost 4 times in a row)"), None),
        (failed("ValueError: boom"), None),
        (failed("ValueError: boom", c2f_retired="requeued"), bk.Kind.REQUEUED),
    ],
)
def test_studies_made_before_the_mark_are_read_by_their_recorded_reason(trial, kind):
    assert bk.kind(trial) == kind


def test_every_reason_the_sweep_records_is_read_back_as_its_kind():
    reasons = {
        bk.interrupted("SIGTERM"): bk.Kind.REQUEUED,
        bk.worker_lost("no worker claimed it in 30 s"): bk.Kind.REQUEUED,
        bk.DUPLICATE_REPLICATE: bk.Kind.RETIRED,
        bk.DUPLICATE_RETRY: bk.Kind.RETIRED,
        bk.over_target(7): bk.Kind.RETIRED,
        bk.not_retried(bk.worker_lost("no heartbeat"), 4): None,
    }
    for reason, kind in reasons.items():
        assert bk.kind(failed(reason)) == kind, reason


def test_replicates_another_command_queues_raise_the_total_instead_of_passing_it():
    study = optuna.create_study(direction="maximize")
    for _ in range(4):
        study.enqueue_trial({"l2_lambda": 1e-3})
    out = io.StringIO()
    line = Progress(study, 4, stream=out, every=1e9)
    line()
    for value in (0.5, 0.6, 0.7, 0.8):
        trial = study.ask(DIST)
        study.tell(trial, value)
    # Another command queues two replicates, and this command's pool runs them.
    for index in (1, 2):
        study.enqueue_trial({"l2_lambda": 1e-3}, user_attrs={rep.REPLICATE: index})
        study.tell(study.ask(DIST), 0.7)
    line.close()
    assert (
        out.getvalue()
        .splitlines()[-1]
        .startswith("6/6 finished (6 complete, 0 pruned, 0 failed, 0 running)")
    )


def test_a_duplicate_retired_during_the_run_leaves_the_total():
    study = optuna.create_study(direction="maximize")
    for index in (0, 1, 1):  # the second seed 1 was queued by another command too
        study.enqueue_trial({"l2_lambda": 1e-3}, user_attrs={rep.REPLICATE: index})
    out = io.StringIO()
    line = Progress(study, 3, stream=out, every=1e9)
    line()
    rep._fail_duplicates(study)
    for _ in range(2):
        study.tell(study.ask(DIST), 0.7)
    line.close()
    assert (
        out.getvalue()
        .splitlines()[-1]
        .startswith("2/2 finished (2 complete, 0 pruned, 0 failed, 1 retired, 0 running)")
    )


def four_finished_then_replicates_queued(*, look_between: bool) -> tuple[io.StringIO, Progress]:
    """A progress line of a pool that finished its 4 trials, and 2 replicates another
    command queued then; ``look_between``: the line drew once before they were queued."""
    study = optuna.create_study(direction="maximize")
    for _ in range(4):
        study.enqueue_trial({"l2_lambda": 1e-3})
    out = io.StringIO()
    line = Progress(study, 4, stream=out, every=1e9)
    for value in (0.5, 0.6, 0.7, 0.8):
        study.tell(study.ask(DIST), value)
    if look_between:
        line()  # the last look while the workers run
    for index in (1, 2):
        study.enqueue_trial({"l2_lambda": 1e-3}, user_attrs={rep.REPLICATE: index})
    return out, line


@pytest.mark.parametrize("dry", [True, False])
def test_replicates_a_look_counted_after_the_workers_stopped_leave_the_last_line_when_dry(dry):
    """The other command queues them as this pool's workers stop, and a draw of the line
    counts them before the pool returns: a pool that ran dry ends at its own total; a
    stopped one keeps what waits, as its unfinished work."""
    out, line = four_finished_then_replicates_queued(look_between=False)
    line()  # the supervisor's last draw, before it sees the workers gone
    line.close(dry=dry)
    last = out.getvalue().splitlines()[-1]
    assert last.startswith("4/4 finished" if dry else "4/6 finished"), last


def test_replicates_queued_after_the_pool_stopped_are_not_counted_in_its_last_line():
    """The other command queues them as this pool's queue runs dry: the other one runs them."""
    out, line = four_finished_then_replicates_queued(look_between=True)
    line.close()
    assert (
        out.getvalue()
        .splitlines()[-1]
        .startswith("4/4 finished (4 complete, 0 pruned, 0 failed, 0 running)")
    )
