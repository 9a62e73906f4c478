"""The service's own cost around a user's training function: trials per second.

    python -m bench.user_overhead [--trials 200] [--workers 1 2] [--reports 0 10]
    python -m bench.user_overhead --vs-optuna [--trials 200] [--reports 0 10]
    python -m bench.user_overhead --queue 100 1000 10000 [--first 100] [--reports 10]

The user's function returns at once (after ``--reports`` calls of ``report``,
each one ``trial.report``; the study sets the percentile pruner, which the service
asks at the end of the first cycle, step 10), so all the time measured is the service's: sampling,
queueing, taking and telling trials in SQLite, heartbeats, recording the
curves. Each service run is ``python -m search.coarse`` on a fresh digits study
in a temporary directory. Two rates: "wall" from starting the command to its
exit (interpreter start-up, data preparation and forking included) and
"running" from the first trial's start to the last trial's end, both read
from the storage.

``--vs-optuna`` runs, in the same run and one after the other, plain Optuna on
the same function: ``study.optimize`` in one process with the service's sampler
(TPE, 10 start-up trials) and pruner (percentile 33, 5 start-up trials) on a
SQLite file, once given the URL as a user would (Optuna's defaults) and once
given the service's own SQLite storage (WAL, ``synchronous=NORMAL``). Plain
Optuna reports at every step and asks the pruner where the service does (step
10, the end of the first cycle), so both do the same work; the ratio
is the service's running rate over plain Optuna's (1 worker each).

``--queue`` runs the command with each target (100, 1,000, 10,000 queued
trials) and stops it (SIGINT) once ``--first`` trials have finished: the rate of
those first trials against the smallest target's shows what a long queue costs
each trial, with the same trials sampled and pruned in every run. Asserts nothing.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import optuna
from optuna.trial import TrialState

REPO = Path(__file__).resolve().parents[1]

INSTANT = """\
def train(hp, data, report):
    for step in range(1, {reports} + 1):
        report(step, 0.5)
    return 0.5
"""

STUDY = """\
name = "{name}"
[data]
name = "digits"
[model]
train = "instant.py:train"
[training]
batch_size = 50
n_s = 5                # total_steps 20: reports at steps 1..10 all fall before the last one
n_cycles = 2
[search]
l2_lambda = [1e-5, 1e-1]
eta_max = [1e-3, 5e-1]
[coarse]
trials = {trials}
replicates = 1         # no replicate rounds: the same function, only more trials
[optuna]
workers = {workers}
pruner = "percentile"  # asked at the end of the first cycle, step 10
warmup_cycles = 0.0
"""

FINISHED = (TrialState.COMPLETE, TrialState.PRUNED)
PRUNE_STEP = 10  # the end of the first cycle (2 x n_s): where the service asks its pruner


@dataclass
class Run:
    """What one run made: trials finished, wall seconds, and the two rates."""

    finished: int
    wall: float
    per_s_running: float

    @property
    def per_s_wall(self) -> float:
        return self.finished / self.wall


def running_rate(url: str, name: str, first: int | None = None) -> tuple[int, float]:
    """(trials finished, trials/s from the first start to the last end) of study ``name``;
    of its ``first`` trials to finish when given."""
    storage = optuna.storages.RDBStorage(url, skip_compatibility_check=True)
    try:
        done = storage.get_all_trials(
            storage.get_study_id_from_name(name), deepcopy=False, states=FINISHED
        )
    finally:
        storage.engine.dispose()
    done = sorted(done, key=lambda t: t.datetime_complete)[:first]
    span = max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)
    return len(done), len(done) / span.total_seconds()


def finished_count(db: Path) -> int:
    """Trials finished in the SQLite file ``db`` so far (0 before it has its tables)."""
    try:
        con = sqlite3.connect(f"file:{db}?mode=ro", uri=True, timeout=5)
    except sqlite3.OperationalError:
        return 0
    try:
        row = con.execute(
            "SELECT count(*) FROM trials WHERE state IN ('COMPLETE', 'PRUNED')"
        ).fetchone()
        return int(row[0])
    except sqlite3.OperationalError:
        return 0
    finally:
        con.close()


def service(
    directory: Path, *, trials: int, workers: int, reports: int, first: int | None = None
) -> Run:
    """``python -m search.coarse`` on an instant-function study of ``trials`` trials; with
    ``first``, stopped by SIGINT once that many have finished."""
    name = f"instant_{trials}_{workers}_{reports}"
    (directory / "instant.py").write_text(INSTANT.format(reports=reports))
    study = directory / f"{name}.toml"
    study.write_text(STUDY.format(name=name, trials=trials, workers=workers))
    db = directory / f"{name}.db"
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "search.coarse", "--study", str(study)],
        cwd=REPO,
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    if first is not None:
        while proc.poll() is None and finished_count(db) < first:
            time.sleep(0.1)
        proc.send_signal(signal.SIGINT)
    _, err = proc.communicate()
    wall = time.monotonic() - start
    if proc.returncode not in (0, 128 + signal.SIGINT) or (first is None and proc.returncode):
        raise RuntimeError(f"search.coarse exited {proc.returncode}: {err.strip()[-2000:]}")
    finished, per_s = running_rate(f"sqlite:///{db}", f"{name}-coarse", first)
    return Run(finished, wall, per_s)


def _optimize(url: str, name: str, trials: int, reports: int, service_storage: bool) -> None:
    """Plain Optuna on the same function, sampler and pruner (in a child process)."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage: str | optuna.storages.BaseStorage = url
    if service_storage:
        from search.sweep.workers.storage import make_storage

        storage = make_storage(url)
    study = optuna.create_study(
        storage=storage,
        study_name=name,
        direction="maximize",
        sampler=optuna.samplers.TPESampler(seed=0, n_startup_trials=10),
        pruner=optuna.pruners.PercentilePruner(33.0, n_startup_trials=5),
    )

    def objective(trial: optuna.Trial) -> float:
        trial.suggest_float("l2_lambda", 1e-5, 1e-1, log=True)
        trial.suggest_float("eta_max", 1e-3, 5e-1, log=True)
        for step in range(1, reports + 1):
            trial.report(0.5, step)
            if step == PRUNE_STEP and trial.should_prune():
                raise optuna.TrialPruned()
        return 0.5

    study.optimize(objective, n_trials=trials)


def plain_optuna(directory: Path, *, trials: int, reports: int, service_storage: bool) -> Run:
    """:func:`_optimize` in a forked process; its rates read from the storage."""
    name = f"optuna_{trials}_{reports}_{int(service_storage)}"
    url = f"sqlite:///{directory / name}.db"
    ctx = multiprocessing.get_context("fork")
    proc = ctx.Process(target=_optimize, args=(url, name, trials, reports, service_storage))
    start = time.monotonic()
    proc.start()
    proc.join()
    wall = time.monotonic() - start
    if proc.exitcode != 0:
        raise RuntimeError(f"plain Optuna exited {proc.exitcode}")
    finished, per_s = running_rate(url, name)
    return Run(finished, wall, per_s)


def header(columns: list[tuple[str, int]]) -> str:
    line = "  ".join(f"{name:>{width}}" for name, width in columns)
    return f"{line}\n{'-' * len(line)}"


RUNS = ("service", "optuna (URL)", "optuna (service storage)")


def vs_optuna(tmp: Path, trials: int, reports_list: list[int]) -> None:
    rows = []
    for reports in reports_list:
        for what in RUNS:
            if what == "service":
                r = service(tmp, trials=trials, workers=1, reports=reports)
            else:
                r = plain_optuna(
                    tmp, trials=trials, reports=reports, service_storage=what == RUNS[2]
                )
            rows.append((reports, what, r))
            print(f"  {reports} reports, {what}: {r.wall:.1f} s", file=sys.stderr)
    print(
        f"\nthe service against plain Optuna: an instant function, {trials} trials a run, "
        f"1 worker, SQLite, TPE + percentile pruner, {os.cpu_count()} cores, "
        f"optuna {optuna.__version__}"
    )
    cols = [
        ("reports", 7),
        ("run", 24),
        ("trials", 6),
        ("wall s", 6),
        ("trials/s (wall)", 15),
        ("trials/s (running)", 18),
        ("service/this", 12),
    ]
    print(header(cols))
    for reports, what, r in rows:
        ours = next(s for n, w, s in rows if n == reports and w == "service")
        print(
            f"{reports:>7}  {what:>24}  {r.finished:>6}  {r.wall:>6.1f}  {r.per_s_wall:>15.1f}  "
            f"{r.per_s_running:>18.1f}  {ours.per_s_running / r.per_s_running:>12.2f}"
        )
    print("service/this: the service's running rate over this run's (>= 1: the service is faster)")


def queue(tmp: Path, targets: list[int], first: int, reports: int) -> None:
    rows = []
    for target in targets:
        r = service(tmp, trials=target, workers=1, reports=reports, first=min(first, target))
        rows.append((target, r))
        print(f"  {target} queued: {r.wall:.1f} s", file=sys.stderr)
    print(
        f"\nthe first {first} trials with a queue of each size: an instant function, "
        f"{reports} reports a trial, 1 worker, SQLite, {os.cpu_count()} cores"
    )
    cols = [("queued", 7), ("trials", 6), ("trials/s (running)", 18), ("vs smallest", 11)]
    print(header(cols))
    base = rows[0][1].per_s_running
    for target, r in rows:
        print(
            f"{target:>7}  {r.finished:>6}  {r.per_s_running:>18.1f}  "
            f"{r.per_s_running / base:>11.2f}"
        )


def table(tmp: Path, trials: int, workers_list: list[int], reports_list: list[int]) -> None:
    rows = []
    for reports in reports_list:
        for workers in workers_list:
            r = service(tmp, trials=trials, workers=workers, reports=reports)
            rows.append((reports, workers, r))
            print(f"  {reports} reports x{workers}: {r.wall:.1f} s", file=sys.stderr)
    print(
        f"\nan instant user function, {trials} trials per run, SQLite, "
        f"{os.cpu_count()} cores, optuna {optuna.__version__}"
    )
    cols = [
        ("reports", 7),
        ("workers", 7),
        ("trials", 6),
        ("wall s", 6),
        ("trials/s (wall)", 15),
        ("trials/s (running)", 18),
    ]
    print(header(cols))
    for reports, workers, r in rows:
        print(
            f"{reports:>7}  {workers:>7}  {r.finished:>6}  {r.wall:>6.1f}  "
            f"{r.per_s_wall:>15.1f}  {r.per_s_running:>18.1f}"
        )


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.user_overhead", description=__doc__.split("\n")[0]
    )
    p.add_argument("--trials", type=int, default=200, help="trials per run (default 200)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument("--reports", type=int, nargs="+", default=None, help="report() calls per trial")
    mode = p.add_mutually_exclusive_group()
    mode.add_argument(
        "--vs-optuna",
        action="store_true",
        help="the service and plain Optuna side by side (1 worker)",
    )
    mode.add_argument(
        "--queue",
        type=int,
        nargs="+",
        metavar="N",
        help="trials/s of the first --first trials with N queued (e.g. 100 1000 10000)",
    )
    p.add_argument(
        "--first", type=int, default=100, help="with --queue: trials timed per run (default 100)"
    )
    args = p.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    with tempfile.TemporaryDirectory(prefix="c2f-overhead-") as tmp:
        if args.vs_optuna:
            vs_optuna(Path(tmp), args.trials, args.reports or [0, 10])
        elif args.queue:
            queue(Path(tmp), args.queue, args.first, (args.reports or [10])[0])
        else:
            table(Path(tmp), args.trials, args.workers, args.reports or [0, 10])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
