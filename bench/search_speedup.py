"""Wall time of one coarse search with 1 worker and with 2 workers, and their ratio.

The study is the quick start (digits) with more work per trial, so that starting
the worker processes is amortised: a wider network (``--hidden``), more cycles
(``--cycles``) and pruner "none", so that both runs train exactly the same number of
steps. The data is prepared once beforehand and not timed; each run gets a fresh
SQLite database in a scratch directory and is timed from ``run_workers`` start to
end (process start-up included). The 1-worker run is one forked worker process with
cores BLAS threads; the N-worker run gives each process cores // N threads. A
control run (one worker limited to one BLAS thread) shows what the
BLAS threads cost. Columns: "sum fit s" is the trials' training time (user attr
``wall_time``), "overhead s" is workers x wall minus that (start-up, sampling,
SQLite, idle tail), "cpu s" the CPU seconds of this process and its worker
processes during the run (getrusage, so it holds when other processes load the
machine) and "load" the 1-minute load average around the run: above the core
count, other processes competed for the CPU and wall times are not comparable.
Prints a table, asserts nothing.

    python -m bench.search_speedup [--trials 32] [--hidden 200] [--cycles 6] [--repeats 1]
    python -m bench.search_speedup --cifar ../shared/data/cifar-10-batches-py \\
        --hidden 50 --cycles 2 --trials 16
"""

from __future__ import annotations

import argparse
import os
import resource
import tempfile
import time
from pathlib import Path

from search.config.study import load_spec
from search.sweep import stage
from search.sweep import studies as st
from tests.search.conftest import write_study


def cpu_seconds() -> float:
    """User + system CPU seconds of this process and of its children that have exited
    and been waited for (the pool waits for every worker process it forks)."""
    me, kids = (
        resource.getrusage(resource.RUSAGE_SELF),
        resource.getrusage(resource.RUSAGE_CHILDREN),
    )
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def run_once(
    study_file: Path, *, workers: int, trials: int, tag: str, threads: int | None = None
) -> dict[str, float]:
    """One coarse search on a fresh database; seconds and per-trial figures.

    ``threads`` set: one worker in this process with that many BLAS threads (the
    control), instead of ``run_workers``' own choice of cores // workers.
    """
    spec = load_spec(study_file)
    db = Path(study_file).parent / f"{tag}.db"
    spec = spec.with_overrides(storage=f"sqlite:///{db}", workers=workers)
    prepared = st.prepare_for(spec, log=lambda _: None)
    study = st.open_study(spec, "coarse")
    st.record_data(study, prepared)
    st.top_up(study, trials)
    load0 = os.getloadavg()[0]
    t0 = time.perf_counter()
    cpu0 = cpu_seconds()
    # The pool releases this process's database connections before it forks.
    stage.run_stage_workers(
        spec, "coarse", dict(spec.search), prepared, workers=workers, threads=threads
    )
    wall = time.perf_counter() - t0
    cpu = cpu_seconds() - cpu0
    done = study.get_trials(deepcopy=False, states=st.FINISHED)
    train = sum(t.user_attrs.get("wall_time", 0.0) for t in done)
    epochs = sum(t.user_attrs.get("epochs_run", 0.0) for t in done)
    return {
        "wall": wall,
        "trials": len(done),
        "train": train,
        "epochs": epochs,
        "cpu": cpu,
        "load": (load0 + os.getloadavg()[0]) / 2,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--trials", type=int, default=32)
    p.add_argument("--hidden", type=int, default=200)
    p.add_argument("--cycles", type=int, default=6)
    p.add_argument("--workers", type=int, default=2, help="the parallel run's worker count")
    p.add_argument("--repeats", type=int, default=1, help="alternate 1/N runs this many times")
    p.add_argument(
        "--cifar",
        metavar="DIR",
        default=None,
        help="search the CIFAR-10 batches in DIR (all batches, 1017 held out, batch 100, "
        "cyclical eta, n_s = 2 * floor(N / 100)) instead of digits",
    )
    p.add_argument(
        "--no-control",
        dest="control",
        action="store_false",
        help="skip the control run (1 worker limited to 1 BLAS thread)",
    )
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-speedup-") as tmp:
        sections: dict = {
            "network": {"hidden": [args.hidden]},
            "training": {"n_cycles": args.cycles},
            "coarse": {"trials": args.trials},
            "optuna": {"pruner": "none", "workers": 1},
        }
        if args.cifar:
            sections["data"] = {
                "name": "cifar10",
                "dir": str(Path(args.cifar).resolve()),
                "split": "all",
                "n_val": 1017,
            }
            from model.data import load

            n_train = load("cifar10", args.cifar, split="all", n_val=1017).train.n
            n_s = 2 * (n_train // 100)
            sections["training"] |= {"batch_size": 100, "n_s": n_s, "evals_per_cycle": 10}
        study_file = write_study(Path(tmp), "speedup", **sections)
        # Prepare the data once, outside the timings.
        st.prepare_for(load_spec(study_file), log=lambda _: None)
        cores = os.cpu_count() or 1
        rows = []  # (label, workers, BLAS threads per worker, figures)
        for r in range(args.repeats):
            for w in (1, args.workers):
                m = run_once(study_file, workers=w, trials=args.trials, tag=f"r{r}w{w}")
                rows.append((f"run_workers({w})", w, max(1, cores // w), m))
        if args.control:
            m = run_once(study_file, workers=1, trials=args.trials, tag="control", threads=1)
            rows.append(("1 worker, 1 thread", 1, 1, m))

    print(
        f"coarse search, {'CIFAR-10 ' + args.cifar if args.cifar else 'digits'}, "
        f"hidden [{args.hidden}], {args.cycles} cycles, "
        f"{args.trials} trials, pruner none, {cores} cores"
    )
    print(
        f"{'run':<20}  {'BLAS thr':>8}  {'trials':>6}  {'epochs':>7}  {'wall s':>7}  "
        f"{'sum fit s':>9}  {'fit/wall':>8}  {'s/trial':>7}  {'overhead s':>10}  "
        f"{'cpu s':>6}  {'load':>5}"
    )
    for label, w, threads, m in rows:
        # Time outside fit(): start-up, sampling, SQLite writes, waiting.
        overhead = m["wall"] * w - m["train"]
        print(
            f"{label:<20}  {threads:>8}  {m['trials']:>6}  {m['epochs']:7.1f}  {m['wall']:7.2f}  "
            f"{m['train']:9.2f}  {m['train'] / m['wall']:8.2f}  "
            f"{m['wall'] / max(m['trials'], 1):7.3f}  {overhead:10.2f}  {m['cpu']:6.1f}  "
            f"{m['load']:5.1f}"
        )
    for r in range(args.repeats):
        t1 = rows[2 * r][3]["wall"]
        tn = rows[2 * r + 1][3]["wall"]
        ratio = tn / t1
        print(f"repeat {r}: t{args.workers}/t1 = {tn:.2f} / {t1:.2f} = {ratio:.3f} (goal <= 0.6)")
        if args.control:
            tc = rows[-1][3]["wall"]
            cn, cc = rows[2 * r + 1][3]["cpu"], rows[-1][3]["cpu"]
            print(
                f"repeat {r}: against 1 worker with 1 BLAS thread, t{args.workers}/t1 = "
                f"{tn:.2f} / {tc:.2f} = {tn / tc:.3f}; CPU seconds {cn:.1f} / {cc:.1f} = "
                f"{cn / cc:.2f} (an idle machine would give about "
                f"{cn / min(args.workers, cores) / cc:.2f})"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
