"""Is the search's answer better than seed luck? coarse -> fine -> final against a grid.

On the CIFAR-10 subset (``../shared/data/cifar-10-batches-py``: 4,068 training,
1,017 validation, 1,017 test images), a 2-layer network ([50], cyclical eta
1e-5..1e-1, n_s 80, 2 cycles, batches of 100) is trained:

- on a grid of 8 lambdas in [1e-5, 1e-1] x 5 seeds: each lambda's mean test
  accuracy; the best grid point is the reference;
- by R independent coarse -> fine -> final searches over lambda (study seeds
  0..R-1), each in a fresh database, with the same training settings.

For each search: the chosen lambda, that lambda's 5-seed mean test accuracy
(trained exactly as the grid), its regret to the best grid point, and the
compute it used in epochs of the training set (every trial, pruned, failed and
replicates included, plus final's training) relative to the grid's. The goal:
mean regret <= 0.5 points at <= 50% of the grid's compute.

``--mode before`` runs the search as it was first: a seed per trial, no replicates,
fine ranges around the top-k single runs, the best single run retrained.
``replicates``: shared seeds, blanket replicates of the best configurations,
noise-aware fine ranges, the best mean retrained. ``after`` (the defaults of study
files now): shared seeds, fine ranges and the choice by the model of the landscape,
the coarse runs carried over into the fine stage, a race between the best on shared
seeds. Prints a table; asserts nothing (``bench/peers.py`` is the benchmark against
other methods).

    python -m bench.search_quality [--runs 4] [--mode before replicates after] [--data-dir DIR]
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import statistics
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

import numpy as np

from model.train import fit
from search import coarse, final, fine
from search.config.study import StudySpec, load_spec
from search.sweep import replicates as rep
from search.sweep import studies as st
from search.sweep.builtin import network_of  # noqa: E402
from tests.search.conftest import dump_toml

REPO = Path(__file__).resolve().parents[1]
DATA = REPO.parent / "shared" / "data" / "cifar-10-batches-py"
LAMBDAS = np.logspace(-5, -1, 8)
GRID_SEEDS = range(5)

TRAINING = {
    "batch_size": 100,
    "schedule": "cyclical",
    "eta_min": 1e-5,
    "eta_max": 1e-1,
    "n_s": 80,
    "n_cycles": 2,
    "evals_per_cycle": 10,
    "train_eval_size": 2000,
}

OLD_FINE = {"race_runs": 0, "warm_start": False}  # the settings before the race and the model
MODES = {
    "before": {
        "coarse": {"trials": 10, "replicates": 1},
        "fine": {
            "trials": 6,
            "top_k": 3,
            "margin": 0.3,
            "narrow": "top_k",
            "replicates": 1,
            **OLD_FINE,
        },
        "final": {"seeds": 1, "choose": "best"},
        "optuna": {"seed_mode": "per_trial"},
    },
    "replicates": {
        "coarse": {"trials": 8, "replicates": 3, "replicate_top": 2},
        "fine": {
            "trials": 5,
            "top_k": 2,
            "margin": 0.3,
            "narrow": "noise",
            "replicates": 2,
            "replicate_top": 2,
            **OLD_FINE,
        },
        "final": {"seeds": 1, "choose": "best"},
        "optuna": {"seed_mode": "shared"},
    },
    "after": {  # the defaults of study files now, at the same number of runs
        "coarse": {"trials": 10},
        "fine": {"trials": 6, "top_k": 2, "margin": 0.3, "race_runs": 3},
        "final": {"seeds": 1},
        "optuna": {"seed_mode": "shared"},
    },
}


def study_doc(name: str, data_dir: Path, seed: int, mode: str) -> dict:
    m = MODES[mode]
    return {
        "name": name,
        "data": {"name": "cifar10", "dir": str(data_dir), "split": "all", "n_val": 1017},
        "network": {"hidden": [50], "batch_norm": False, "init": "xavier"},
        "training": dict(TRAINING),
        "search": {"l2_lambda": [1e-5, 1e-1]},
        "coarse": m["coarse"],
        "fine": m["fine"],
        "final": {**m["final"], "holdout": 0.2},
        "optuna": {
            "pruner": "percentile",
            "sampler": "tpe",
            "seed": seed,
            "workers": 2,
            "warmup_cycles": 1.0,
            "n_startup_trials": 5,
            **m["optuna"],
        },
    }


_SPLITS = None


def _train_test(args: tuple[str, float, int]) -> float:
    """Test accuracy of one run with the grid's settings (in a pool process)."""
    global _SPLITS
    spec_path, lam, seed = args
    spec = load_spec(spec_path)
    if _SPLITS is None:
        _SPLITS = st.prepare_for(spec, log=lambda _: None).open()
    config = spec.train_config("coarse", {"l2_lambda": float(lam), "seed": seed})
    hp = {**asdict(spec.network), "seed": seed}
    net = network_of(hp, _SPLITS.train.d, _SPLITS.train.n_classes)
    fit(net, _SPLITS, config)
    return net.evaluate(_SPLITS.test.X, _SPLITS.test.y, l2_lambda=float(lam))["accuracy"]


def test_means(pool, spec_path: Path, lambdas) -> dict[float, float]:
    """Each lambda's mean test accuracy over the grid's 5 seeds."""
    jobs = [(str(spec_path), float(lam), s) for lam in lambdas for s in GRID_SEEDS]
    accs = list(pool.map(_train_test, jobs))
    n = len(GRID_SEEDS)
    return {
        float(lam): statistics.fmean(accs[i * n : (i + 1) * n]) for i, lam in enumerate(lambdas)
    }


def epochs_used(spec: StudySpec, n_train: int) -> float:
    """Epochs of the training set: every trial of coarse and fine, and final's training."""
    total = 0.0
    for stage in ("coarse", "fine"):
        study = st.load_existing(spec, stage)
        if study is not None:
            total += sum(float(t.user_attrs.get("epochs_run") or 0) for t in study.trials)
    result = json.loads((spec.out_dir() / "final" / "result.json").read_text())
    cfg = result["config"]
    steps = 2 * cfg["n_s"] * cfg["n_cycles"] if cfg["n_s"] else 0
    total += result["n_seeds"] * steps * cfg["batch_size"] / n_train
    return total


def run_search(root: Path, data_dir: Path, seed: int, mode: str) -> dict:
    path = root / f"{mode}_{seed}.toml"
    path.write_text(dump_toml(study_doc(f"q{mode}{seed}", data_dir, seed, mode)))
    flags = ["--study", str(path)]
    t0 = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        for command in (coarse, fine, final):
            code = command.main(flags)
            if code != 0:
                raise SystemExit(f"{command.__name__} {flags} exited {code}")
    spec = load_spec(path)
    result = json.loads((spec.out_dir() / "final" / "result.json").read_text())
    n_train = st.prepare_for(spec, log=lambda _: None).sizes()["train"]
    fine_study = st.load_existing(spec, "fine")
    # The other rule, for comparison: the best smoothed mean over neighbours.
    configs = rep.study_configurations(fine_study, spec.fine.replicates)
    other = rep.choose(configs)[0].params["l2_lambda"]
    return {
        "seed": seed,
        "lambda": result["params"]["l2_lambda"],
        "lambda_other": other,
        "final_test": result["test_acc"],
        "epochs": epochs_used(spec, n_train),
        "wall": time.perf_counter() - t0,
        "path": path,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=4, help="independent searches per mode")
    p.add_argument(
        "--mode", nargs="+", default=["before", "replicates", "after"], choices=list(MODES)
    )
    p.add_argument("--data-dir", type=Path, default=DATA)
    args = p.parse_args(argv)
    if not (args.data_dir / "data_batch_1").exists():
        raise SystemExit(f"error: no CIFAR-10 batches in {args.data_dir}; pass --data-dir")
    with tempfile.TemporaryDirectory(prefix="c2f-quality-") as tmp, ProcessPoolExecutor(2) as pool:
        root = Path(tmp)
        grid_file = root / "grid.toml"
        grid_file.write_text(dump_toml(study_doc("grid", args.data_dir, 0, "after")))
        t0 = time.perf_counter()
        grid = test_means(pool, grid_file, LAMBDAS)
        grid_wall = time.perf_counter() - t0
        n_train = st.prepare_for(load_spec(grid_file), log=lambda _: None).sizes()["train"]
        steps = 2 * TRAINING["n_s"] * TRAINING["n_cycles"]
        grid_epochs = len(LAMBDAS) * len(GRID_SEEDS) * steps * TRAINING["batch_size"] / n_train
        best_lam = max(grid, key=grid.get)
        print(f"grid: 8 lambdas x 5 seeds, {grid_epochs:.0f} epochs, {grid_wall:.0f} s")
        print("  lambda    " + "  ".join(f"{lam:8.1e}" for lam in grid))
        print("  test acc  " + "  ".join(f"{100 * a:8.2f}" for a in grid.values()))
        print(f"  best grid point: lambda {best_lam:.1e}, {100 * grid[best_lam]:.2f}%\n")
        rows = []
        for mode in args.mode:
            for seed in range(args.runs):
                r = run_search(root, args.data_dir, seed, mode)
                r["mode"] = mode
                lams = sorted({r["lambda"], r["lambda_other"]})
                means = test_means(pool, r["path"], lams)
                r["test5"] = means[r["lambda"]]
                r["test5_other"] = means[r["lambda_other"]]
                r["regret_other"] = 100 * (grid[best_lam] - r["test5_other"])
                r["regret"] = 100 * (grid[best_lam] - r["test5"])
                r["compute"] = r["epochs"] / grid_epochs
                rows.append(r)
                print(
                    f"  {mode:6} seed {seed}: lambda {r['lambda']:.2e}, 5-seed test "
                    f"{100 * r['test5']:.2f}%, regret {r['regret']:+.2f}, compute "
                    f"{100 * r['compute']:.0f}% ({r['wall']:.0f} s); smoothed choice "
                    f"{r['lambda_other']:.2e}: regret {r['regret_other']:+.2f}",
                    flush=True,
                )
    print()
    print(
        f"{'mode':6}  {'seed':>4}  {'lambda':>8}  {'test5 %':>7}  {'regret':>6}  "
        f"{'final %':>7}  {'epochs':>6}  {'compute':>7}"
    )
    for r in rows:
        print(
            f"{r['mode']:6}  {r['seed']:>4}  {r['lambda']:8.2e}  {100 * r['test5']:7.2f}  "
            f"{r['regret']:+6.2f}  {100 * r['final_test']:7.2f}  {r['epochs']:6.0f}  "
            f"{100 * r['compute']:6.0f}%"
        )
    for mode in args.mode:
        mine = [r for r in rows if r["mode"] == mode]
        regret = statistics.fmean(r["regret"] for r in mine)
        compute = statistics.fmean(r["compute"] for r in mine)
        worst = max(r["regret"] for r in mine)
        other = statistics.fmean(r["regret_other"] for r in mine)
        ok = regret <= 0.5 and compute <= 0.5
        print(
            f"{mode}: mean regret {regret:.2f} points (worst {worst:.2f}), mean compute "
            f"{100 * compute:.0f}% of the grid; goal (<= 0.5 points at <= 50%) "
            f"{'met' if ok else 'not met'}; the smoothed choice's mean regret {other:.2f}"
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
