"""The service's own cost around a user's training function: trials per second.

    python -m bench.user_overhead [--trials 200] [--workers 1 2] [--reports 0 10]

The user's function returns at once (after ``--reports`` calls of ``report``,
each one ``trial.report`` and, with the default percentile pruner, one
``should_prune``), so all the time measured is the service's: sampling,
queueing, taking and telling trials in SQLite, heartbeats, recording the
curves. Each run is ``python -m search.coarse`` on a fresh digits study in a
temporary directory. Two rates: "wall" from starting the command to its exit
(interpreter start-up, data preparation and forking included) and "running"
from the first trial's start to the last trial's end. Asserts nothing.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import optuna

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
warmup_cycles = 0.0
"""


def run(directory: Path, *, trials: int, workers: int, reports: int) -> dict[str, float]:
    name = f"instant_{workers}_{reports}"
    (directory / "instant.py").write_text(INSTANT.format(reports=reports))
    study = directory / f"{name}.toml"
    study.write_text(STUDY.format(name=name, trials=trials, workers=workers))
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    start = time.monotonic()
    subprocess.run(
        [sys.executable, "-m", "search.coarse", "--study", str(study)],
        check=True,
        cwd=REPO,
        env=env,
        capture_output=True,
    )
    wall = time.monotonic() - start
    ts = optuna.load_study(
        study_name=f"{name}-coarse", storage=f"sqlite:///{directory / name}.db"
    ).get_trials()
    done = [t for t in ts if t.state.name in ("COMPLETE", "PRUNED")]
    span = (
        max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)
    ).total_seconds()
    return {
        "finished": len(done),
        "wall": wall,
        "per_s_wall": len(done) / wall,
        "per_s_running": len(done) / span,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.user_overhead", description=__doc__.split("\n")[0]
    )
    p.add_argument("--trials", type=int, default=200, help="trials per run (default 200)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2])
    p.add_argument(
        "--reports", type=int, nargs="+", default=[0, 10], help="report() calls per trial"
    )
    args = p.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows = []
    with tempfile.TemporaryDirectory(prefix="c2f-overhead-") as tmp:
        for reports in args.reports:
            for workers in args.workers:
                r = run(Path(tmp), trials=args.trials, workers=workers, reports=reports)
                rows.append((reports, workers, r))
                print(f"  {reports} reports x{workers}: {r['wall']:.1f} s", file=sys.stderr)
    print(
        f"\nan instant user function, {args.trials} trials per run, SQLite, "
        f"{os.cpu_count()} cores, optuna {optuna.__version__}"
    )
    header = (
        f"{'reports':>7}  {'workers':>7}  {'trials':>6}  {'wall s':>6}  "
        f"{'trials/s (wall)':>15}  {'trials/s (running)':>18}"
    )
    print(header)
    print("-" * len(header))
    for reports, workers, r in rows:
        print(
            f"{reports:>7}  {workers:>7}  {r['finished']:>6}  {r['wall']:>6.1f}  "
            f"{r['per_s_wall']:>15.1f}  {r['per_s_running']:>18.1f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
