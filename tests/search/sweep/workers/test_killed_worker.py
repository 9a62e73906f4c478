"""A worker process killed from outside the command (SIGKILL, as the OOM killer does):
its trial is re-queued, the others go on, and the command says so; with no worker left,
the command fails and says how to go on. Real signals, real processes."""

from __future__ import annotations

import os
import signal

import optuna
import pytest

from search.sweep import studies as st
from tests.search import pg_util
from tests.search.conftest import start_coarse
from tests.search.sweep.workers.test_proxy import owner_of_a_running_trial, slow_study


@pytest.mark.parametrize("workers", [2, 1])
def test_a_worker_killed_from_outside_is_said_and_its_trial_requeued(tmp_path, workers):
    url = f"sqlite:///{tmp_path / 'k.db'}"
    path = slow_study(tmp_path, "k", trials=3, workers=workers)
    hold = tmp_path / "hold"
    hold.touch()  # the trials wait at their start until the kill
    proc = start_coarse(path, url)
    killed, pid = owner_of_a_running_trial(proc, url, "k-coarse")
    os.kill(pid, signal.SIGKILL)
    hold.unlink()
    out, err = proc.communicate(timeout=120)
    study = optuna.load_study(study_name="k-coarse", storage=url)
    c = st.counts(study)
    assert f"(pid {pid}) was killed (SIGKILL: out of memory, or killed from outside" in err
    assert c["RUNNING"] == 0, c  # its trial is not left running for ever
    assert c["REQUEUED"] == 1 and study.trials[killed].state != optuna.trial.TrialState.RUNNING
    if workers == 2:
        # the other worker went on: the stage reached its target
        assert proc.returncode == 0, err
        assert "the other workers went on" in err
        assert c["COMPLETE"] == 3 and c["WAITING"] == 0, c
    else:
        # no worker left: the command fails, and the queue is left for the next run
        assert proc.returncode == 1, (out, err)
        assert "run the command again to go on" in err
        assert c["WAITING"] >= 1, c


def test_ctrl_c_to_a_joining_worker_command_says_one_line(tmp_path):
    """SIGINT to `c2f worker` (the command alone, as `kill -INT PID` sends it) while its
    worker trains: one line, exit 130; not also the line of a signal that came after the
    work."""
    url = f"sqlite:///{tmp_path / 'w.db'}"
    path = slow_study(tmp_path, "w", trials=3, workers=1)
    hold = tmp_path / "hold"
    hold.touch()
    first = start_coarse(path, url)
    owner_of_a_running_trial(first, url, "w-coarse")
    os.killpg(first.pid, signal.SIGINT)  # leaves the queue to the joining worker
    first.communicate(timeout=60)
    worker = pg_util.start_worker("--storage", url, "--study-name", "w-coarse", "--poll", "0.2")
    owner_of_a_running_trial(worker, url, "w-coarse")
    os.kill(worker.pid, signal.SIGINT)
    out, _ = worker.communicate(timeout=60)  # stderr with it
    assert worker.returncode == 130, out
    assert out.count("interrupted (SIGINT)") == 1, out
    assert "after the command had finished" not in out
