"""Trials per minute with 1, 2 and 4 ``search.worker`` processes, PostgreSQL vs SQLite.

    python -m bench.throughput [--trials 16] [--workers 1 2 4] [--postgres URL]

Each run queues ``--trials`` quick-start trials in a fresh study (``--create``),
starts N worker processes as N machines would (each with cores // N BLAS
threads) and times them until the queue is empty. Two rates are printed:
"wall" counts from starting the processes to the last one exiting (process
start-up and data loading included); "running" counts from the first trial's
start to the last trial's end. The PostgreSQL runs use a throwaway database
created on the server named by ``--postgres`` and dropped afterwards; they
are skipped when the server does not answer. Prints a table, asserts nothing.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import subprocess
import sys
import tempfile
import time
import tomllib
import uuid
from pathlib import Path

import optuna

from tests.search.pg_util import drop_database

REPO = Path(__file__).resolve().parents[1]
QUICKSTART = REPO / "studies" / "quickstart.toml"
DEFAULT_PG = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"


def write_study(directory: Path, name: str, trials: int) -> Path:
    """The quick-start study file under another name, with ``trials`` coarse trials."""
    text = QUICKSTART.read_text()
    doc = tomllib.loads(text)
    text = text.replace(f'name = "{doc["name"]}"', f'name = "{name}"', 1)
    text = text.replace(f"trials = {doc['coarse']['trials']}", f"trials = {trials}", 1)
    path = directory / f"{name}.toml"
    path.write_text(text)
    if tomllib.loads(text)["coarse"]["trials"] != trials:
        raise RuntimeError(f"could not set [coarse] trials in {path}")
    return path


@contextlib.contextmanager
def postgres_database(admin_url: str):
    """A throwaway database on the server of ``admin_url``; yields its URL or None."""
    import psycopg2
    from sqlalchemy.engine import make_url

    url = make_url(admin_url)
    try:
        admin = psycopg2.connect(
            host=url.host,
            port=url.port or 5432,
            user=url.username,
            password=url.password,
            dbname=url.database,
            connect_timeout=3,
        )
    except psycopg2.OperationalError as exc:
        print(f"PostgreSQL at {url.render_as_string()} does not answer ({exc}); skipped")
        yield None
        return
    admin.autocommit = True
    name = f"c2f_bench_{uuid.uuid4().hex[:8]}"
    with admin.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    try:
        yield url.set(database=name).render_as_string(hide_password=False)
    finally:
        drop_database(admin, name)
        admin.close()


def worker_cmd(*args: str) -> list[str]:
    return [sys.executable, "-m", "search.worker", *args]


def run(storage: str, study_file: Path, cache: Path, workers: int) -> dict[str, float]:
    """Create and queue the study, run ``workers`` processes, return the timings."""
    name = f"{tomllib.loads(study_file.read_text())['name']}-coarse"
    common = ["--storage", storage, "--study", str(study_file), "--cache-dir", str(cache)]
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run(
        worker_cmd("--create", *common), check=True, cwd=REPO, env=env, capture_output=True
    )
    threads = max(1, (os.cpu_count() or 1) // workers)
    start = time.monotonic()
    procs = [
        subprocess.Popen(
            worker_cmd(*common, "--study-name", name, "--threads", str(threads), "--poll", "0.2"),
            cwd=REPO,
            env=env,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.PIPE,
            text=True,
        )
        for _ in range(workers)
    ]
    for p in procs:
        _, err = p.communicate()
        if p.returncode != 0:
            raise RuntimeError(f"a worker exited with {p.returncode}: {err}")
    wall = time.monotonic() - start
    trials = optuna.load_study(study_name=name, storage=storage).get_trials()
    done = [t for t in trials if t.state.is_finished() and t.datetime_start]
    span = (
        max(t.datetime_complete for t in done) - min(t.datetime_start for t in done)
    ).total_seconds()
    finished = sum(t.state.name in ("COMPLETE", "PRUNED") for t in trials)
    return {
        "finished": finished,
        "wall_s": wall,
        "per_min_wall": 60 * finished / wall,
        "per_min_running": 60 * finished / span,
        "trial_s": statistics.mean(
            (t.datetime_complete - t.datetime_start).total_seconds() for t in done
        ),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.throughput", description=__doc__.split("\n")[0]
    )
    p.add_argument("--trials", type=int, default=16, help="trials per run (default 16)")
    p.add_argument("--workers", type=int, nargs="+", default=[1, 2, 4])
    p.add_argument("--postgres", default=DEFAULT_PG, help=f"server to use (default {DEFAULT_PG})")
    args = p.parse_args(argv)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    rows = []
    t0 = time.monotonic()
    with (
        tempfile.TemporaryDirectory(prefix="c2f-bench-") as tmp,
        postgres_database(args.postgres) as pg,
    ):
        tmp = Path(tmp)
        cache = tmp / "cache"
        storages = [("SQLite", lambda name: f"sqlite:///{tmp / name}.db")]
        if pg is not None:
            storages.append(("PostgreSQL", lambda name: pg))
        for kind, url_for in storages:
            for n in args.workers:
                name = f"bench_{kind.lower()}_{n}"
                study_file = write_study(tmp, name, args.trials)
                r = run(url_for(name), study_file, cache, n)
                rows.append((kind, n, r))
                print(
                    f"  {kind} x{n}: {r['finished']} trials in {r['wall_s']:.1f} s",
                    file=sys.stderr,
                    flush=True,
                )
    cores = os.cpu_count()
    print(
        f"\nquickstart, {args.trials} trials per run, {cores} cores, "
        f"optuna {optuna.__version__}, total {time.monotonic() - t0:.0f} s"
    )
    header = (
        f"{'storage':<10}  {'workers':>7}  {'trials':>6}  {'wall s':>6}  "
        f"{'trials/min (wall)':>17}  {'trials/min (running)':>20}  {'mean trial s':>12}"
    )
    print(header)
    print("-" * len(header))
    for kind, n, r in rows:
        print(
            f"{kind:<10}  {n:>7}  {r['finished']:>6}  {r['wall_s']:>6.1f}  "
            f"{r['per_min_wall']:>17.1f}  {r['per_min_running']:>20.1f}  {r['trial_s']:>12.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
