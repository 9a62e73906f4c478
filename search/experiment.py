"""``python -m search.experiment FILE``: run an experiment file as a resumable grid study.

An experiment file (``studies/experiments/*.toml``) is a study file plus an
``[experiment]`` and a ``[grid]`` table (:mod:`search.config.experiment`). Every
grid point is one trial of the study ``<name>-grid`` in the file's storage; a
killed run resumes where it stopped and a finished experiment trains nothing
when run again (:mod:`search.sweep.grid`). The command prints the table of the
grid points (:mod:`search.reporting.tables`) and, with ``--out``, draws the figures.

The same file runs on other data without editing: ``--cifar DIR`` (CIFAR-10,
split "all", a tenth of the images, at most 5,000, for validation unless
``--n-val``), or ``--dataset``, ``--data-dir``, ``--split``, ``--n-val``; ``--n-s``
fixes n_s. Runs on other data belong in another database (``--storage``): a study
refuses data it was not created with. Exit codes: 0 done, 1 grid points without a
finished run (each named with its cause), 2 a bad file or flag.
"""

from __future__ import annotations

from model.errors import UsageError

if __name__ == "__main__":  # before the slow imports: a signal now ends it at once
    from search.sweep.workers.signals import exit_at_once_while_starting

    exit_at_once_while_starting()

import argparse
import shlex
import sys
from pathlib import Path
from typing import Any

from model.data import cifar10_train_size
from search import cli
from search.cli import dashboard_hint, guarded
from search.config.experiment import load_experiment
from search.reporting import files_only
from search.reporting.experiment_figures import draw
from search.reporting.tables import table
from search.sweep.grid import rows, run, why_not_run


def build_parser() -> argparse.ArgumentParser:
    p = cli.parser(
        "python -m search.experiment",
        "Run an experiment file (a grid of trainings) as a resumable Optuna study.",
    )
    p.add_argument("path", help="experiment file, e.g. studies/experiments/bn_vs_none.toml")
    p.add_argument(
        "--workers", type=int, default=None, help="worker processes (default: the file's)"
    )
    p.add_argument(
        "--storage", default=None, help="Optuna storage URL (default SQLite beside the file)"
    )
    p.add_argument(
        "--cifar",
        metavar="DIR",
        default=None,
        help=(
            "run on CIFAR-10 in DIR: dataset cifar10, split all, a tenth of data_batch_1..5 "
            "(at most 5000 images) for validation unless --n-val"
        ),
    )
    p.add_argument("--dataset", default=None, help="override [data] name")
    p.add_argument("--data-dir", default=None, help="override [data] dir")
    p.add_argument("--split", default=None, help="override [data] split (cifar10: batch1, all)")
    p.add_argument(
        "--n-val",
        type=cli.n_val_arg,
        default=None,
        help="validation images, or a fraction such as 0.1 (overrides [data] n_val)",
    )
    p.add_argument("--n-s", type=int, default=None, help="fix the half-cycle n_s (steps)")
    p.add_argument("--out", default=None, help="also draw the figures into this directory")
    return p


def data_overrides(args: argparse.Namespace) -> dict[str, Any]:
    """The [data] keys the flags replace."""
    data: dict[str, Any] = {}
    if args.cifar:
        data |= {"name": "cifar10", "split": "all", "dir": args.cifar}
        if args.n_val is None and (args.split or "all") == "all":
            # DD2424 holds out 5,000 of 50,000: a tenth, at most 5,000 (a subset has fewer).
            data["n_val"] = min(5000, cifar10_train_size(args.cifar) // 10)
    if args.dataset:
        data["name"] = args.dataset
    if args.data_dir:
        data["dir"] = args.data_dir
    if args.split:
        data["split"] = args.split
    if args.n_val is not None:
        data["n_val"] = args.n_val
    if "dir" in data:
        data["dir"] = str(Path(data["dir"]).expanduser().resolve())
    return data


@guarded
def main(argv: list[str] | None = None) -> int:
    files_only()
    args = build_parser().parse_args(argv)
    if args.workers is not None and args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    if args.n_s is not None and args.n_s < 1:
        raise UsageError(f"--n-s must be >= 1, got {args.n_s}")
    experiment = load_experiment(
        args.path,
        data=data_overrides(args),
        n_s=args.n_s,
        storage=args.storage,
        workers=args.workers,
    )
    where = "--workers" if args.workers is not None else f"{args.path}: [optuna.workers]"
    cli.check_workers(experiment.spec.optuna.workers, where=where)
    study = run(experiment)
    print()
    grid = rows(experiment, study)
    print(table(experiment, grid))
    missing = why_not_run(experiment, study, grid)
    if missing:
        print(
            f"\nerror: {len(missing)} of {len(grid)} grid points have no finished run:",
            file=sys.stderr,
        )
        for line in missing:
            print(f"  {line}", file=sys.stderr)
        print(
            "fix the cause and run the same command again: finished points are kept",
            file=sys.stderr,
        )
        return 1
    if args.out:
        _, paths = draw(args.path, Path(args.out), storage=experiment.spec.storage_url())
        for path in paths:
            print(f"figure: {path}")
    print(f"\ndashboard: {dashboard_hint(experiment.spec)}")
    flags = cli.flags_text(storage=args.storage)
    print(f"next: {cli.command('report')} --experiment {shlex.quote(args.path)}{flags}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
