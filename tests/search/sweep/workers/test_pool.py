"""The forked pool as a joblib backend: ``joblib.Parallel`` launches the workers.

The lifecycle under real signals (Ctrl-C, a kill of the command, a second Ctrl-C) is
tested through the commands in test_signals.py; these tests pin what joblib sees.
"""

from __future__ import annotations

import os

import joblib

from search.sweep.workers import pool
from search.sweep.workers.pool import ForkBackend, register_backends, run_pool
from search.sweep.workers.signals import StopFlag


def code_elsewhere(parent: int, code: int) -> int:
    """A task: ``code`` when it runs in a process other than ``parent``, else 99."""
    return code if os.getpid() != parent else 99


def test_each_task_runs_in_a_child_of_its_own_and_returns_its_exit_code():
    register_backends()
    tasks = [joblib.delayed(code_elsewhere)(os.getpid(), c) for c in (0, 3, 7)]
    with joblib.parallel_config(backend="c2f-fork"):
        codes = joblib.Parallel(n_jobs=3, pre_dispatch="all")(tasks)
    assert codes == [0, 3, 7]


def test_a_lone_task_still_runs_in_a_child():
    # joblib runs a single job in the calling process; a worker must never run in the command.
    codes = joblib.Parallel(n_jobs=1, backend=ForkBackend())(
        [joblib.delayed(code_elsewhere)(os.getpid(), 5)]
    )
    assert codes == [5]


class Broken:
    """A worker job that cannot open its study."""

    threads = 1

    def open(self, worker: int):
        raise RuntimeError(f"no study for worker {worker}")


def test_run_pool_launches_its_workers_through_the_fork_backend(monkeypatch):
    submitted: list[int] = []
    submit = ForkBackend.submit

    def counted(self, func, callback=None):
        future = submit(self, func, callback)
        submitted.append(self.processes[-1].pid)
        return future

    monkeypatch.setattr(ForkBackend, "submit", counted)
    lines: list[str] = []
    result = run_pool(Broken(), workers=2, stop=StopFlag(), say=lines.append)
    assert len(submitted) == 2 and os.getpid() not in submitted
    assert result.codes == {0: 1, 1: 1}  # each worker's exit code, as joblib returned it
    assert sorted(lines) == [  # said at once, in the order they came
        f"worker {i} could not start: worker {i} failed: RuntimeError: no study for worker {i}"
        for i in (0, 1)
    ]
    assert result.errors[0].startswith("none of the 2 workers could start: worker ")


def test_the_workers_run_here_unless_a_cluster_backend_is_active():
    assert pool.cluster_client() is None
    with joblib.parallel_config(backend="c2f-fork"):
        assert pool.cluster_client() is None
