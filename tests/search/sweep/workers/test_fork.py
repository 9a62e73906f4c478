"""No SQLite file crosses the fork into a worker: a worker that closed its copy lost its
own locks on the file, and with them every trial it stored afterwards."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import optuna

from search.sweep.workers.loop import Sweep
from search.sweep.workers.pool import run_pool
from search.sweep.workers.signals import StopFlag
from search.sweep.workers.storage import make_storage, release


def open_files(under: Path) -> list[str]:
    """The files under ``under`` this process holds open."""
    held = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(str(under)):
            held.append(target)
    return held


@dataclass
class Inherits:
    """A worker that writes down which of the study's files it holds when it starts."""

    url: str
    directory: str
    threads: int = 1

    def open(self, worker: int) -> Sweep:
        Path(self.directory, "inherited.txt").write_text("\n".join(open_files(self.directory)))
        storage = make_storage(self.url)
        study = optuna.load_study(study_name="s", storage=storage)
        return Sweep(storage, study, lambda t: 0.0, heartbeat_interval=1.0, grace_period=30.0)


def test_a_worker_inherits_no_connection_the_command_dropped_without_releasing(tmp_path):
    url = f"sqlite:///{tmp_path / 's.db'}"
    kept = make_storage(url)
    optuna.create_study(storage=kept, study_name="s")
    dropped = make_storage(url)
    dropped.get_all_studies()  # a pooled connection, never released
    cycle: list = [dropped.backend.engine]
    cycle.append(cycle)  # reachable only through a cycle, as SQLAlchemy's engines are
    del dropped, cycle
    kept.get_all_studies()
    assert open_files(tmp_path)  # the command holds the file open before it forks

    result = run_pool(Inherits(url, str(tmp_path)), workers=1, stop=StopFlag())

    assert (result.started, result.errors) == (1, [])
    assert (tmp_path / "inherited.txt").read_text() == ""
    release(kept)
