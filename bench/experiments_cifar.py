"""Run every experiment of studies/experiments on the real CIFAR-10 subset, then draw them.

    python -m bench.experiments_cifar [--data-dir DIR] [--out runs/experiments_cifar]
                                      [--workers 2] [--fresh]

Each experiment file is copied into ``--out`` and run there with ``--cifar DIR``
(data_batch_1..5 of the subset, 5,085 images, a tenth of them held out for
validation as DD2424 holds out 5,000 of 50,000: 4,577 training / 508 validation;
test_batch for the test accuracy), so its database, data cache and figures stay
out of the repository; n_s follows each file's ``n_s_epochs`` (bn_vs_none:
5 * floor(4577 / 100) = 225 steps). Runs resume: a second call only draws, then
writes the whole report (``search.report --all``) into ``--out/report``.
Prints the markdown section of each experiment and the key figures: the
test accuracies of the 3- and 9-layer networks with and without batch norm and
the final training loss for each initial sigma with and without batch norm.
"""

from __future__ import annotations

import argparse
import shutil
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from search import experiment as ex  # noqa: E402
from search.config.experiment import list_experiments  # noqa: E402
from search.reporting.experiment_figures import draw  # noqa: E402
from search.reporting.tables import label, metric_cell  # noqa: E402
from search.sweep.grid import results  # noqa: E402
from search.sweep.objective import curves_of  # noqa: E402

CIFAR = REPO.parent / "shared" / "data" / "cifar-10-batches-py"


def _finished(path: Path):
    """The grid points of an experiment that ran, with their trials."""
    return [r for r in results(path)[2] if r.trial is not None] if path.exists() else []


def key_figures(scratch: Path) -> str:
    lines = ["key figures (CIFAR-10 subset):", "  test accuracy, bn_vs_none:"]
    for r in _finished(scratch / "bn_vs_none.toml"):
        lines.append(
            f"    {label('hidden', r.point['hidden']):<32} "
            f"{label('batch_norm', r.point['batch_norm']):<6} "
            f"test acc {metric_cell(r.trial.user_attrs.get('test_acc'), '.4f')}"
            + ("  (diverged)" if r.trial.user_attrs.get("diverged") else "")
        )
    lines.append("  final training loss, sensitivity_init:")
    for r in _finished(scratch / "sensitivity_init.toml"):
        curves = curves_of(r.trial)
        loss = (curves.get("train_loss") or [float("nan")])[-1]
        lines.append(
            f"    sigma {r.point['sigma']:<7g} "
            f"{label('batch_norm', r.point['batch_norm']):<6} "
            f"train loss {loss:.4f}  test acc "
            f"{metric_cell(r.trial.user_attrs.get('test_acc'), '.4f')}"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.experiments_cifar", description=__doc__)
    p.add_argument("--data-dir", default=str(CIFAR), help=f"CIFAR-10 batches (default {CIFAR})")
    p.add_argument("--out", default=str(REPO / "runs" / "experiments_cifar"))
    p.add_argument("--workers", type=int, default=2)
    p.add_argument(
        "--n-val",
        type=int,
        default=None,
        help="validation images (default: a tenth of data_batch_1..5, as 5,000 of 50,000)",
    )
    p.add_argument("--fresh", action="store_true", help="delete --out first")
    args = p.parse_args(argv)
    scratch = Path(args.out).resolve()
    if args.fresh and scratch.exists():
        shutil.rmtree(scratch)
    scratch.mkdir(parents=True, exist_ok=True)
    t_all = time.perf_counter()
    copies = []
    for source in list_experiments(REPO / "studies" / "experiments"):
        copy = scratch / source.name
        shutil.copy(source, copy)
        copies.append(copy)
        t0 = time.perf_counter()
        extra = [] if args.n_val is None else ["--n-val", str(args.n_val)]
        code = ex.main(
            [str(copy), "--cifar", args.data_dir, "--workers", str(args.workers), *extra]
        )
        if code:
            return code
        print(f"{source.stem}: {time.perf_counter() - t0:.0f} s\n", flush=True)
    sections = []
    for copy in copies:
        section, paths = draw(copy, scratch / "figures")
        sections.append(section)
        print(section)
        for path in paths:
            print(f"figure: {path}")
        print()
    (scratch / "experiments.md").write_text("\n".join(sections))
    # The whole report as a student hands it in: gradient checks, these experiments,
    # and the quick-start search if it has run.
    from search import report

    report.main(
        [
            "--all",
            "--experiments-dir",
            str(scratch),
            "--out",
            str(scratch / "report"),
            "--study",
            str(REPO / "studies" / "quickstart.toml"),
        ]
    )
    print(key_figures(scratch))
    print(f"\ntotal {time.perf_counter() - t_all:.0f} s; sections in {scratch / 'experiments.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
