"""Many workers on one machine, directly on PostgreSQL and through ``c2f proxy``.

    flock /tmp/c2f-bench.lock nice -n 10 python -m bench.scale \\
        [--workers 8 32 96 192 400] [--direct-up-to 96] [--trial-seconds 60] \\
        [--trials-per-worker 2] [--group 8] [--events-at 400] [--pg URL]

Each run makes a fresh PostgreSQL database, queues a coarse study of
``trials-per-worker x N`` trials (``python -m search.worker --create``) and starts N
worker processes in groups of ``--group``: each group is a process of its own (a
machine, as ``c2f worker --workers 8`` would be) running the project's forked pool
on the study's queue, without the progress line. The training function sleeps
``--trial-seconds`` on average (0.5 to 1.5 times, drawn per trial) and reports once
(random sampler, no pruner): the workers are
mostly idle, as on a cluster whose trials train elsewhere, so hundreds of them fit
on two cores and what is measured is the storage path, not training.

"direct": every worker talks to PostgreSQL (one connection each). "proxy": every
worker talks to one ``c2f proxy`` (8 connections). With ``--events-at N``, the proxy
run of N workers also has one group SIGKILLed when 30% of the target is finished
and the proxy restarted (SIGTERM, then started again on its port) at 60%.

Per run: the workers that ran (distinct owners of trials), trials/s (finished over
the span from the first start to the last end) against the ideal N / trial-seconds,
"busy" (the share of the workers' time over that span spent in the training function:
the start and the last trials' tail keep it below 100% even with no overhead),
p50/p99 of take (a worker's previous trial recorded finished -> its next one
recorded RUNNING: reaping, the queue, the claim) and tell (the function returned ->
the trial recorded finished), the most connections to the database at once
(pg_stat_activity), finished against the target, duplicates (finished trials of
the same parameters: a trial finished twice), lost trials (of the target, not
finished), trials re-queued (and, in brackets, runs of the function that ended but
whose trial was re-queued: killed before the tell), the reasons of real failures, the
memory per worker (PSS, so shared pages are counted once), and
the proxy's CPU seconds. Asserts nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

# Imported before the groups are forked: they share these pages, and start at once.
from search.config.study import load_spec
from search.sweep import studies as st
from search.sweep.stage import StageJob
from search.sweep.workers.pool import run_pool
from search.sweep.workers.signals import StopFlag, signals_recorded
from search.sweep.workers.storage import make_storage, release

REPO = Path(__file__).resolve().parents[1]
PG = "postgresql+psycopg2://postgres@127.0.0.1:5432/test"
GIB = 1 << 30

STUDY = """\
name = "scale"
[data]
name = "digits"
[model]
train = "sleeper.py:train"
[training]
batch_size = 50
n_s = 5
n_cycles = 1
[search]
l2_lambda = [1e-5, 1e-1]
eta_max = [1e-3, 5e-1]
[coarse]
trials = {trials}
replicates = 1
[optuna]
workers = 1
pruner = "none"
sampler = "random"
heartbeat_interval = 10
grace_period = 30
"""

# Each completed run leaves one line in runs/PID.jsonl: its parameters and times.
SLEEPER = """\
import json, os, random, time

RUNS = {runs!r}

def train(hp, data, report):
    t0 = time.time()
    # From half to one and a half times the mean: the workers' trials end at different
    # moments, as real trainings do, not all in one wave.
    time.sleep({seconds} * (0.5 + random.Random(hp["l2_lambda"]).random()))
    report(1, 0.5)
    t1 = time.time()
    with open(os.path.join(RUNS, f"{{os.getpid()}}.jsonl"), "a") as out:
        out.write(json.dumps([hp["l2_lambda"], hp["eta_max"], t0, t1]) + "\\n")
    return {{"val_acc": 0.5, "t0": t0, "t1": t1}}
"""


# ----------------------------------------------------------------------------- PostgreSQL


def admin(pg: str):
    import psycopg2
    from sqlalchemy.engine import make_url

    u = make_url(pg)
    con = psycopg2.connect(
        host=u.host, port=u.port or 5432, user=u.username, dbname=u.database, password=u.password
    )
    con.autocommit = True
    return con


def query(pg: str, sql: str, args: tuple = ()) -> list[tuple]:
    con = admin(pg)
    try:
        with con.cursor() as cur:
            cur.execute(sql, args)
            return cur.fetchall() if cur.description else []
    finally:
        con.close()


def new_database(pg: str) -> tuple[str, str]:
    from sqlalchemy.engine import make_url

    name = f"c2f_scale_{uuid.uuid4().hex[:8]}"
    query(pg, f'CREATE DATABASE "{name}"')
    return name, make_url(pg).set(database=name).render_as_string(hide_password=False)


def drop_database(pg: str, name: str) -> None:
    for _ in range(60):  # a server at its limit refuses this too, until the workers go
        try:
            query(
                pg,
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = %s",
                (name,),
            )
            query(pg, f'DROP DATABASE IF EXISTS "{name}"')
            return
        except Exception:  # noqa: BLE001 - retried
            time.sleep(1.0)


class Monitor:
    """One connection to the run's database, opened before the workers start (a server
    at its limit would refuse a new one): the trials finished and the connections used."""

    def __init__(self, db_url: str, name: str) -> None:
        self.con = admin(db_url)
        self.name = name

    def connections(self) -> int:
        with self.con.cursor() as cur:
            cur.execute("SELECT count(*) FROM pg_stat_activity WHERE datname = %s", (self.name,))
            return int(cur.fetchone()[0])

    def finished(self) -> int:
        with self.con.cursor() as cur:
            cur.execute("SELECT count(*) FROM trials WHERE state = 'COMPLETE'")
            return int(cur.fetchone()[0])

    def close(self) -> None:
        self.con.close()


# ----------------------------------------------------------------------------- processes


def start_proxy(url: str, port: int, log: Path) -> tuple[subprocess.Popen, int]:
    proc = subprocess.Popen(
        [sys.executable, "-m", "search.proxy", "--storage", url, "--host", "127.0.0.1"]
        + ["--port", str(port), "--connections", "8"],
        cwd=REPO,
        env={**os.environ, "PYTHONPATH": str(REPO)},
        stdout=subprocess.PIPE,
        stderr=open(log, "a"),  # noqa: SIM115 - the proxy's own file, closed with it
        text=True,
    )
    assert proc.stdout is not None
    line = proc.stdout.readline()
    if "at grpc://" not in line:
        proc.kill()
        raise RuntimeError(f"the proxy did not start: {line!r}, see {log}")
    return proc, int(line.split("at grpc://127.0.0.1:")[1].split()[0])


def _group(url: str, study: Path, workers: int, cache: Path, offset: int, err: Path) -> None:
    """A group's process (forked): a session of its own, then the project's pool."""
    os.setsid()
    fd = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    try:
        spec = load_spec(str(study)).with_overrides(storage=url)
        storage = make_storage(url)
        st.open_study(spec, "coarse", storage, create=False)
        prepared = st.prepare_for(spec, cache_dir=str(cache), log=lambda *a, **k: None)
        job = StageJob(
            spec,
            "coarse",
            str(prepared.path),
            prepared.checksum,
            dict(spec.search),
            1,
            seed_offset=offset,
            poll=1.0,
        )
        release(storage)
        with signals_recorded(StopFlag()) as stop:
            result = run_pool(job, workers=workers, stop=stop)
        code = 1 if result.errors else 0
    except BaseException as exc:  # noqa: BLE001 - one line in the group's log, then exit 1
        print(f"group failed: {type(exc).__name__}: {exc}", flush=True)
        code = 1
    os._exit(code)


def start_group(url: str, study: Path, workers: int, cache: Path, offset: int, err: Path) -> int:
    pid = os.fork()
    if pid == 0:
        _group(url, study, workers, cache, offset, err)
    return pid


def pss_kib(pid: int) -> int:
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def processes_of(groups: set[int]) -> list[int]:
    """Every live process in the process groups ``groups``."""
    found = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[2]) in groups and fields[0] != "Z":
            found.append(int(stat.parent.name))
    return found


def cpu_seconds(pid: int) -> float:
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0.0
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


# ----------------------------------------------------------------------------- one run


def run(
    pg: str,
    *,
    via: str,
    workers: int,
    group: int,
    seconds: float,
    per_worker: int,
    events: bool,
    timeout: float,
) -> dict:
    name, db_url = new_database(pg)
    target = per_worker * workers
    proxy = None
    proxy_cpu = 0.0
    with tempfile.TemporaryDirectory(prefix="c2f-scale-") as tmp:
        d = Path(tmp)
        (d / "runs").mkdir()
        (d / "sleeper.py").write_text(SLEEPER.format(runs=str(d / "runs"), seconds=seconds))
        study = d / "scale.toml"
        study.write_text(STUDY.format(trials=target))
        try:
            url = db_url
            port = 0
            if via == "proxy":
                proxy, port = start_proxy(db_url, 0, d / "proxy.log")
                url = f"grpc://127.0.0.1:{port}"
            subprocess.run(
                [sys.executable, "-m", "search.worker", "--create", "--study", str(study)]
                + ["--storage", url, "--cache-dir", str(d / "cache")],
                cwd=REPO,
                env={**os.environ, "PYTHONPATH": str(REPO)},
                check=True,
                capture_output=True,
            )
            monitor = Monitor(db_url, name)
            t_start = time.monotonic()
            pids = []
            left = workers
            while left > 0:
                k = min(group, left)
                offset = workers - left
                err = d / f"group{len(pids)}.log"
                pids.append(start_group(url, study, k, d / "cache", offset, err))
                left -= k
            alive = set(pids)
            most_connections = 0
            memory_kib = 0
            killed: list[int] = []
            restarted = False
            deadline = time.monotonic() + timeout
            while alive and time.monotonic() < deadline:
                time.sleep(0.5)
                for pid in list(alive):
                    done, _ = os.waitpid(pid, os.WNOHANG)
                    if done:
                        alive.discard(pid)
                most_connections = max(most_connections, monitor.connections())
                finished = monitor.finished()
                if not memory_kib and finished >= 0.2 * target:  # every worker started
                    procs = processes_of(set(pids))
                    memory_kib = sum(pss_kib(p) for p in procs)
                if events and not killed and finished >= 0.3 * target and len(alive) > 1:
                    victim = sorted(alive)[-1]
                    os.killpg(victim, signal.SIGKILL)
                    killed.append(victim)
                if events and proxy is not None and not restarted and finished >= 0.6 * target:
                    proxy_cpu += cpu_seconds(proxy.pid)
                    proxy.send_signal(signal.SIGTERM)
                    proxy.wait(60)
                    proxy, _ = start_proxy(db_url, port, d / "proxy.log")
                    restarted = True
            wall = time.monotonic() - t_start
            timed_out = bool(alive)
            for pid in alive:
                os.killpg(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            if proxy is not None:
                proxy_cpu += cpu_seconds(proxy.pid)
            monitor.close()
            result = measure(db_url, d / "runs", target)
            logs = "".join(p.read_text() for p in sorted(d.glob("group*.log")))
            result.update(
                via=via,
                workers=workers,
                target=target,
                wall=wall,
                ideal=workers / seconds,
                connections=most_connections,
                pss_per_worker_mib=memory_kib / 1024 / workers,
                proxy_cpu=proxy_cpu,
                killed=len(killed),
                restarted=restarted,
                timed_out=timed_out,
                could_not_start=logs.count("could not start"),
            )
            return result
        finally:
            if proxy is not None and proxy.poll() is None:
                proxy.send_signal(signal.SIGTERM)
                proxy.wait(60)
            drop_database(pg, name)


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q * (len(values) - 1))))]


def measure(db_url: str, runs: Path, target: int) -> dict:
    """What the database and the functions' run logs say of a finished run."""
    import optuna
    from optuna.trial import TrialState

    from search.sweep.workers import bookkeeping

    optuna.logging.set_verbosity(optuna.logging.ERROR)
    trials = optuna.load_study(study_name="scale-coarse", storage=db_url).get_trials()
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    states = [bookkeeping.state_name(t) for t in trials]
    by_owner: dict[int, list] = {}
    for t in complete:
        by_owner.setdefault(int(t.system_attrs["c2f_owner"]["pid"]), []).append(t)
    takes = []
    for own in by_owner.values():
        own.sort(key=lambda t: t.datetime_start)
        for a, b in zip(own, own[1:], strict=False):
            takes.append((b.datetime_start - a.datetime_complete).total_seconds())
    tells = [
        t.datetime_complete.timestamp() - t.user_attrs["result"]["t1"]
        for t in complete
        if "result" in t.user_attrs
    ]
    starts = [t.datetime_start for t in complete]
    ends = [t.datetime_complete for t in complete]
    span = (max(ends) - min(starts)).total_seconds() if complete else float("nan")
    done = [json.loads(line) for p in runs.glob("*.jsonl") for line in p.read_text().splitlines()]
    # A trial's identity is its parameters (drawn at random; a retry keeps them).
    identities = [(t.params["l2_lambda"], t.params["eta_max"]) for t in complete]
    busy = sum(t1 - t0 for _, _, t0, t1 in done)
    return {
        "ran": len(by_owner),
        "finished": len(complete),
        "rate": len(complete) / span if complete else 0.0,
        "take_p50": percentile(takes, 0.5),
        "take_p99": percentile(takes, 0.99),
        "tell_p50": percentile(tells, 0.5),
        "tell_p99": percentile(tells, 0.99),
        "duplicates": len(identities) - len(set(identities)),
        # Runs of the function that ended but whose trial did not (killed before the tell,
        # or taken for lost): work done twice, not trials counted twice.
        "rerun": len(done) - len(complete),
        "fail_reasons": sorted(
            {
                str(t.user_attrs.get("reason", "?")).splitlines()[0][:200]
                for t in trials
                if bookkeeping.state_name(t) == "FAIL"
            }
        ),
        # The share of the workers' time spent in the training function.
        "busy": busy / (len(by_owner) * span) if complete else 0.0,
        "lost": max(0, target - len(complete)),
        "requeued": states.count("REQUEUED"),
        "failed": states.count("FAIL"),
    }


# ----------------------------------------------------------------------------- report


def row(r: dict) -> str:
    events = []
    if r["killed"]:
        events.append("kill -9 of a group")
    if r["restarted"]:
        events.append("proxy restart")
    if r["timed_out"]:
        events.append("TIMED OUT")
    return (
        f"| {r['via']} | {r['workers']} | {r['ran']} | {r['rate']:.1f} / {r['ideal']:.1f} | "
        f"{r['busy']:.0%} | "
        f"{r['take_p50'] * 1e3:.0f} / {r['take_p99'] * 1e3:.0f} | "
        f"{r['tell_p50'] * 1e3:.0f} / {r['tell_p99'] * 1e3:.0f} | {r['connections']} | "
        f"{r['finished']} / {r['target']} | {r['duplicates']} | {r['lost']} | "
        f"{r['requeued']} ({r['rerun']}) | {r['pss_per_worker_mib']:.1f} | {r['proxy_cpu']:.0f} | "
        f"{', '.join(events) or '-'} |"
    )


HEADER = (
    "| storage | workers | ran | trials/s (ideal) | busy | take p50 / p99 ms | "
    "tell p50 / p99 ms | connections | finished / target | duplicates | lost | re-queued "
    "(re-run) | "
    "PSS MiB/worker | proxy CPU s | events |\n"
    "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.scale", description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, nargs="+", default=[8, 32, 96, 192, 400])
    p.add_argument(
        "--direct-up-to",
        type=int,
        default=96,
        help="direct runs up to this N (past the server's limit, the other users of the "
        "server are refused too)",
    )
    p.add_argument("--group", type=int, default=8, help="workers per group process")
    p.add_argument("--trial-seconds", type=float, default=60.0, help="mean of a trial")
    p.add_argument("--trials-per-worker", type=int, default=2)
    p.add_argument(
        "--events-at", type=int, nargs="*", default=[400], help="N of the proxy runs with events"
    )
    p.add_argument(
        "--only-events", action="store_true", help="at the --events-at N, that run alone"
    )
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a run may take")
    p.add_argument("--pg", default=PG, help="an existing database on the server to use")
    args = p.parse_args(argv)
    [(max_connections,)] = query(args.pg, "SHOW max_connections")
    [(in_use,)] = query(args.pg, "SELECT count(*) FROM pg_stat_activity")
    print(
        f"PostgreSQL max_connections {max_connections} ({in_use} in use before the runs); "
        f"{os.cpu_count()} cores; trials sleep {args.trial_seconds:g} s, "
        f"{args.trials_per_worker} per worker; groups of {args.group} workers",
        flush=True,
    )
    print(HEADER, flush=True)
    results = []
    for n in args.workers:
        plan = [("direct", False)] if n <= args.direct_up_to else []
        plan.append(("proxy", False))
        if n in args.events_at:
            plan = [*([] if args.only_events else plan), ("proxy", True)]
        for via, events in plan:
            r = run(
                args.pg,
                via=via,
                workers=n,
                group=args.group,
                seconds=args.trial_seconds,
                per_worker=args.trials_per_worker,
                events=events,
                timeout=args.timeout,
            )
            results.append(r)
            print(row(r), flush=True)
            for reason in r["fail_reasons"]:
                print(f"  a failed trial: {reason}", flush=True)
    for via in ("direct", "proxy"):
        sizes = [(r["workers"], r["pss_per_worker_mib"]) for r in results if r["via"] == via]
        if sizes:
            n, per = max(sizes)
            print(
                f"memory, {via}: {per:.1f} MiB per worker at {n} workers (PSS, the group "
                f"processes included): {int(24 * 1024 / per)} such workers in 24 GiB",
                flush=True,
            )
    print(json.dumps(results, default=str), file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
