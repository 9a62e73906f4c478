"""Workers on a Dask cluster against the same workers forked here: speed, stop and kill.

``flock /tmp/c2f-bench.lock nice -n 10 python -m bench.cluster_stop --storage URL``
starts a local Dask cluster (2 worker processes of 1 thread) and, on the PostgreSQL
database of ``--storage``, runs ``search.worker --workers 2`` on a fresh study of
``--trials`` one-cycle trials of the quick start, once forked here (the reference, in
the same run) and once with ``--backend dask`` on the warm cluster: wall time and
trials/s of each. Then ``--runs`` times each on the cluster, with trials that train for
seconds: SIGINT to the command's group once two trials train (seconds to the command's
exit, and to both trials re-queued), and SIGKILL to the command (seconds to both trials
re-queued by its workers, which take the silence of its record for its death). The
studies are deleted at the end. Prints one table.
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from pathlib import Path

import optuna
from optuna.trial import TrialState

REPO = Path(__file__).resolve().parents[1]


def study_file(directory: Path, *, n_cycles: int) -> Path:
    """The quick start under a new name, its training ``n_cycles`` long, not pruned."""
    text = (REPO / "studies" / "quickstart.toml").read_text()
    doc = tomllib.loads(text)
    name = f"bench{uuid.uuid4().hex[:8]}"
    text = text.replace(f'name = "{doc["name"]}"', f'name = "{name}"', 1)
    text = text.replace(f"n_cycles = {doc['training']['n_cycles']}", f"n_cycles = {n_cycles}", 1)
    text = text.replace('pruner = "percentile"', 'pruner = "none"', 1)
    # One run a configuration: no replicate round after the queue.
    text = text.replace("[coarse]\n", "[coarse]\nreplicates = 1\n", 1)
    path = directory / f"{name}.toml"
    path.write_text(text)
    return path


def worker(*args: str) -> list[str]:
    return [sys.executable, "-m", "search.worker", *args]


def create(path: Path, url: str, trials: int) -> str:
    subprocess.run(
        worker("--create", "--study", str(path), "--storage", url, "--trials", str(trials)),
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    return f"{path.stem}-coarse"


def trials(url: str, name: str) -> list[optuna.trial.FrozenTrial]:
    return optuna.load_study(study_name=name, storage=url).get_trials()


def until(condition, timeout: float = 60.0) -> float:
    """Seconds until ``condition()`` holds, polled every 20 ms."""
    t0 = time.monotonic()
    while not condition():
        if time.monotonic() - t0 > timeout:
            raise TimeoutError("condition not met")
        time.sleep(0.02)
    return time.monotonic() - t0


def requeued(url: str, name: str, n: int) -> bool:
    ts = trials(url, name)
    return (
        not any(t.state == TrialState.RUNNING for t in ts)
        and sum("requeued_from" in t.system_attrs for t in ts) >= n
    )


def speed(url: str, tmp: Path, scheduler: str, n: int, backend: str) -> tuple[float, str]:
    path = study_file(tmp, n_cycles=1)
    name = create(path, url, n)
    flags = ["--backend", backend, "--scheduler", scheduler] if backend == "dask" else []
    t0 = time.monotonic()
    subprocess.run(
        worker("--storage", url, "--study-name", name, "--workers", "2", *flags),
        cwd=REPO,
        check=True,
        capture_output=True,
    )
    return time.monotonic() - t0, name


def stopped(url: str, tmp: Path, scheduler: str, sig: int) -> tuple[float | None, float, str]:
    """(seconds to the command's exit or None for SIGKILL, seconds to re-queued, study)."""
    path = study_file(tmp, n_cycles=30)
    name = create(path, url, 2)
    proc = subprocess.Popen(
        worker("--storage", url, "--study-name", name, "--workers", "2")
        + ["--backend", "dask", "--scheduler", scheduler],
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    until(
        lambda: (
            sum(t.state == TrialState.RUNNING and len(t.params) == 2 for t in trials(url, name))
            >= 2
        )
    )
    t0 = time.monotonic()
    if sig == signal.SIGKILL:
        proc.kill()
        exited = None
    else:
        os.killpg(proc.pid, sig)
        proc.wait(timeout=60)
        exited = time.monotonic() - t0
    until(lambda: requeued(url, name, 2))
    return exited, time.monotonic() - t0, name


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--storage", required=True, help="postgresql+psycopg2://USER@HOST/DB")
    p.add_argument("--trials", type=int, default=40)
    p.add_argument("--runs", type=int, default=3)
    args = p.parse_args(argv)
    from distributed import LocalCluster

    made: list[str] = []
    with (
        LocalCluster(
            processes=True, n_workers=2, threads_per_worker=1, dashboard_address=None
        ) as cluster,
        tempfile.TemporaryDirectory(prefix="c2f-cluster-") as tmp,
    ):
        address = cluster.scheduler_address
        try:
            _, warm = speed(args.storage, Path(tmp), address, 2, "dask")  # imports, once
            made.append(warm)
            rows = []
            for backend in ("fork", "dask"):
                wall, name = speed(args.storage, Path(tmp), address, args.trials, backend)
                made.append(name)
                rows.append((backend, wall, args.trials / wall))
            stops = [
                stopped(args.storage, Path(tmp), address, signal.SIGINT) for _ in range(args.runs)
            ]
            kills = [
                stopped(args.storage, Path(tmp), address, signal.SIGKILL) for _ in range(args.runs)
            ]
            made += [name for *_, name in stops + kills]
        finally:
            for name in made:
                optuna.delete_study(study_name=name, storage=args.storage)
    print(f"search.worker --workers 2, {args.trials} one-cycle trials, PostgreSQL")
    print(f"{'backend':<8} {'wall s':>7} {'trials/s':>9}")
    for backend, wall, rate in rows:
        print(f"{backend:<8} {wall:7.2f} {rate:9.2f}")
    print(f"on the cluster, 2 trials training, {args.runs} runs each (median, max):")
    exits = [e for e, _, _ in stops if e is not None]
    print(
        f"SIGINT   command exits {statistics.median(exits):.2f} s, {max(exits):.2f} s; "
        f"trials re-queued {statistics.median(r for _, r, _ in stops):.2f} s, "
        f"{max(r for _, r, _ in stops):.2f} s"
    )
    print(
        f"SIGKILL  trials re-queued {statistics.median(r for _, r, _ in kills):.2f} s, "
        f"{max(r for _, r, _ in kills):.2f} s"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
