"""What pruning saves: total training epochs, best validation accuracy and wall time.

The same coarse search (the quick start on digits with more cycles and trials)
is run with a pruner and without one ("none"), for each seed. Total epochs is the
sum of the user attr ``epochs_run`` over all finished trials (complete, pruned
and diverged); best val acc is the best complete trial's value. The goal is at
least 40% fewer epochs with the best val acc within 1 point of the unpruned run.

A pruner setting is written ``KIND[:WARMUP_CYCLES[:N_STARTUP_TRIALS]]``, e.g.
``median`` (the study file's defaults), ``median:0.25:5``, ``percentile:0.5:5``,
``successive_halving``. "fit s" is the trials' summed training time (user attr
``wall_time``); the rest of workers x wall is per-trial overhead. Each run gets a
fresh SQLite database in a scratch directory; the data is prepared once
beforehand. With 2 workers the order in which trials finish varies, so repeated
runs of one setting can differ by a trial or two. Prints a table, asserts nothing.

    python -m bench.pruning [--seeds 0 1] [--trials 50] [--cycles 3] \\
        [--pruners none median median:0.25:5 percentile]
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

from search.config.study import PRUNERS, load_spec
from search.sweep import stage
from search.sweep import studies as st
from tests.search.conftest import write_study


def parse_pruner(text: str, defaults: tuple[float, int]) -> dict:
    """``"median:0.25:5"`` -> the ``[optuna]`` fields it sets."""
    kind, *rest = text.split(":")
    if kind not in PRUNERS:
        raise SystemExit(f"error: pruner {kind!r} is not one of {list(PRUNERS)}")
    warmup = float(rest[0]) if rest and rest[0] else defaults[0]
    startup = int(rest[1]) if len(rest) > 1 and rest[1] else defaults[1]
    return {"pruner": kind, "warmup_cycles": warmup, "n_startup_trials": startup}


def run_once(study_file: Path, *, seed: int, trials: int, workers: int, optuna: dict, tag: str):
    """One coarse search on a fresh database; total epochs, best val acc, wall time."""
    spec = load_spec(study_file)
    db = Path(study_file).parent / f"{tag}.db"
    spec = spec.with_overrides(storage=f"sqlite:///{db}", workers=workers, seed=seed, **optuna)
    prepared = st.prepare_for(spec, log=lambda _: None)
    study = st.open_study(spec, "coarse")
    st.record_data(study, prepared)
    st.top_up(study, trials)
    t0 = time.perf_counter()
    stage.run_stage_workers(spec, "coarse", dict(spec.search), prepared, workers=workers)
    wall = time.perf_counter() - t0
    c = st.counts(study)
    done = study.get_trials(deepcopy=False, states=st.FINISHED)
    diverged = sum(bool(t.user_attrs.get("diverged")) for t in done)
    return {
        "epochs": sum(t.user_attrs.get("epochs_run", 0.0) for t in done),
        "best": study.best_value if c["COMPLETE"] else float("nan"),
        "wall": wall,
        "fit": sum(t.user_attrs.get("wall_time", 0.0) for t in done),
        "complete": c["COMPLETE"],
        "pruned": c["PRUNED"] - diverged,
        "diverged": diverged,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--trials", type=int, default=50)
    p.add_argument("--cycles", type=int, default=3)
    p.add_argument("--workers", type=int, default=2)
    p.add_argument(
        "--pruners",
        nargs="+",
        default=["none", "median", "median:0.25:5", "percentile"],
        help="pruner settings KIND[:WARMUP_CYCLES[:N_STARTUP_TRIALS]]; the first is the baseline",
    )
    args = p.parse_args(argv)

    rows = []
    with tempfile.TemporaryDirectory(prefix="bench-pruning-") as tmp:
        study_file = write_study(
            Path(tmp),
            "pruning",
            training={"n_cycles": args.cycles},
            coarse={"trials": args.trials},
        )
        base = load_spec(study_file)
        defaults = (base.optuna.warmup_cycles, base.optuna.n_startup_trials)
        st.prepare_for(base, log=lambda _: None)
        for seed in args.seeds:
            for i, text in enumerate(args.pruners):
                optuna = parse_pruner(text, defaults)
                m = run_once(
                    study_file,
                    seed=seed,
                    trials=args.trials,
                    workers=args.workers,
                    optuna=optuna,
                    tag=f"s{seed}p{i}",
                )
                rows.append((seed, text, optuna, m))
                print(
                    f"  seed {seed} {text}: {m['epochs']:.1f} epochs, best {m['best']:.4f}, "
                    f"{m['wall']:.1f} s",
                    flush=True,
                )

    print(
        f"\ncoarse search, digits, hidden {list(base.network.hidden)}, {args.cycles} cycles, "
        f"{args.trials} trials, {args.workers} workers; baseline {args.pruners[0]!r}"
    )
    print(
        f"{'seed':>4}  {'pruner':<26}  {'compl':>5}  {'pruned':>6}  {'diverg':>6}  "
        f"{'epochs':>7}  {'cut %':>6}  {'best val':>8}  {'delta pt':>8}  {'wall s':>6}  "
        f"{'fit s':>6}  goal"
    )
    baseline: dict[int, dict] = {}
    for seed, _text, optuna, m in rows:
        label = optuna["pruner"]
        if label != "none":
            label += f" w{optuna['warmup_cycles']:g} s{optuna['n_startup_trials']}"
        if seed not in baseline:
            baseline[seed] = m
        b = baseline[seed]
        cut = 100 * (1 - m["epochs"] / b["epochs"])
        delta = 100 * (m["best"] - b["best"])
        goal = "-" if m is b else ("yes" if cut >= 40 and abs(delta) <= 1 else "no")
        print(
            f"{seed:>4}  {label:<26}  {m['complete']:>5}  {m['pruned']:>6}  {m['diverged']:>6}  "
            f"{m['epochs']:7.1f}  {cut:6.1f}  {m['best']:8.4f}  {delta:+8.2f}  "
            f"{m['wall']:6.1f}  {m['fit']:6.1f}  {goal}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
