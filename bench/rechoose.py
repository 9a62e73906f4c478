"""The final choice alone, re-made on finished searches: each ``[final] choose`` rule on
the same studies, scored by the same truth as ``bench.peers``.

The service's search takes about 15 s a seed on Fashion-MNIST; a choice rule reads the
finished studies and takes well under a second, and only a choice the truth has not
scored before is trained (3 seeds of one configuration). So the searches are kept once
(``python -m bench.peers --keep DIR``) and every rule is judged on them here, paired run
by run, with no search re-run::

    python -m bench.peers --landscape fashion --runs 30 --methods c2f --keep runs/kept
    python -m bench.rechoose runs/kept --landscape fashion

Each kept run (``DIR/<landscape>/<variant>_<run>/``: its study file, databases and
outputs) is read with ``search.sweep.retrain.chosen_configuration``, the code
``search.final`` runs, with ``[final] choose`` set to each rule in turn. Regret is
against the best of the grid and of the choices compared here: the peers' choices are
not in it, so a figure here is comparable with the others of one call, and sits a little
below the same run's regret in ``bench.peers`` (whose best known counts every method's
choice).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import re
import statistics
import sys
from pathlib import Path
from typing import Any

from bench import peers
from search.config.study import CHOICES

RUN_DIR = re.compile(r"^(?P<variant>c2f[\w-]*)_(?P<run>\d+)$")


def kept_runs(root: Path, variant: str) -> list[tuple[int, Path]]:
    """(run, folder) of every finished run of ``variant`` kept under ``root``, by run."""
    if not root.is_dir():
        return []
    found = []
    for work in root.iterdir():
        m = RUN_DIR.match(work.name)
        finished = any(work.glob("out/*/final/result.json"))
        if m and m["variant"] == variant and (work / "study.toml").is_file() and finished:
            found.append((int(m["run"]), work))
    return sorted(found)


def choice(work: Path, choose: str) -> dict[str, Any]:
    """The parameters ``search.final`` would train for the kept run in ``work`` with
    ``[final] choose = choose`` (as ``result.json`` records them)."""
    from search.config.study import load_spec
    from search.sweep import retrain

    with contextlib.chdir(work):  # a kept study file names its storage relative to it
        spec = load_spec(Path("study.toml"))
        spec = dataclasses.replace(spec, final=dataclasses.replace(spec.final, choose=choose))
        return dict(retrain.chosen_configuration(spec).config.params)


VISITED = (
    "best-trained"  # not a rule: the configuration the search trained that the truth scores best
)
# Not a rule either: of the configurations the search trained, the best by a validation
# mean over fresh seeds (peers.Truth.validation): the best a choice by validation
# accuracy could make among them, with the seed noise averaged out.
VALIDATED = "best-trained-by-validation"
LABELS = {VISITED: "best trained (truth)", VALIDATED: "best trained (validation)"}


def trained(work: Path) -> list[dict[str, Any]]:
    """The parameters of every configuration the kept run in ``work`` trained (coarse and
    fine), each once."""
    from search.config.study import load_spec
    from search.sweep import replicates, studies

    found: dict[str, dict[str, Any]] = {}
    with contextlib.chdir(work):
        spec = load_spec(Path("study.toml"))
        for stage in ("coarse", "fine"):
            study = studies.load_existing(spec, stage)
            for c in replicates.study_configurations(study) if study is not None else []:
                found.setdefault(peers.params_key(c.params), dict(c.params))
    return list(found.values())


def rechoose(
    root: Path,
    land: peers.Landscape,
    rules: list[str],
    *,
    variant: str = "c2f",
    visited: bool = False,
) -> dict[str, Any]:
    """Every rule's choice and regret on every kept run of ``variant`` under ``root``.
    ``visited``: also, under :data:`VISITED`, the best by the truth of every
    configuration the search trained (every one is scored): the regret the search's
    runs allowed, so that the rest is the choice's; and under :data:`VALIDATED`, the best
    of them by a validation mean over fresh seeds: what a choice by validation accuracy
    could do with no seed noise, so that the rest is the validation set's."""
    runs = kept_runs(root / land.name, variant)
    if not runs:
        raise SystemExit(
            f"error: no kept runs of {variant} in {root / land.name}; keep them with "
            f"python -m bench.peers --landscape {land.name} --methods {variant} --keep {root}"
        )
    chosen = {rule: {run: choice(work, rule) for run, work in runs} for rule in rules}
    by_split: dict[int, peers.Truth] = {}
    for run, _ in runs:
        split = land.split(run)
        if split not in by_split:
            by_split[split] = peers.Truth(
                land, cache_dir=peers.CACHE, mapper=peers.serial_map, split=split
            )
    if visited:
        rules = [*rules, VISITED, VALIDATED]
        chosen[VISITED], chosen[VALIDATED] = {}, {}
        for run, work in runs:
            configs = trained(work)
            truth = by_split[land.split(run)]
            for rule, scores in (
                (VISITED, truth.score(configs)),
                (VALIDATED, truth.validation(configs)),
            ):
                chosen[rule][run] = configs[max(range(len(configs)), key=scores.__getitem__)]
    best: dict[int, float] = {}
    for split, truth in by_split.items():
        mine = [chosen[r][run] for r in rules for run, _ in runs if land.split(run) == split]
        best[split] = max([*truth.score(land.grid()), *truth.score(mine)])
    out: dict[str, Any] = {"runs": [run for run, _ in runs], "rules": {}}
    for rule in rules:
        rows = []
        for run, _ in runs:
            split = land.split(run)
            true = by_split[split].scores[peers.params_key(chosen[rule][run])]
            rows.append(
                {"run": run, "params": chosen[rule][run], "regret": 100 * (best[split] - true)}
            )
        regrets = [r["regret"] for r in rows]
        out["rules"][rule] = {
            "mean": statistics.fmean(regrets),
            "worst": max(regrets),
            "runs": rows,
        }
    return out


def print_table(name: str, res: dict[str, Any], rules: list[str]) -> None:
    print(f"{name}: {len(res['runs'])} kept runs; regret in test accuracy points")
    base = rules[0]
    mine = [r["regret"] for r in res["rules"][base]["runs"]]
    for rule in rules:
        r = res["rules"][rule]
        label = f"{LABELS[rule]:26}" if rule in LABELS else f"choose = {rule!r:17}"
        line = f"  {label} mean {r['mean']:.2f}  worst {r['worst']:.2f}"
        if rule != base:
            diffs = [a - b["regret"] for a, b in zip(mine, r["runs"], strict=True)]
            better = sum(d < 0 for d in diffs)
            worse = sum(d > 0 for d in diffs)
            line += (
                f"  {base} minus it {statistics.fmean(diffs):+.2f} "
                f"({base} better in {better}, worse in {worse})"
            )
        print(line)
    for i, run in enumerate(res["runs"]):
        cells = " ".join(f"{res['rules'][rule]['runs'][i]['regret']:6.2f}" for rule in rules)
        print(f"    run {run:3d} {cells}")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m bench.rechoose", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("root", type=Path, help="the folder given to bench.peers --keep")
    p.add_argument("--landscape", choices=sorted(peers.LANDSCAPES), default="fashion")
    p.add_argument(
        "--choose",
        nargs="+",
        choices=list(CHOICES),
        default=list(CHOICES),
        help=f"the rules to compare, the first the base of the paired differences; "
        f"default: {' '.join(CHOICES)}",
    )
    p.add_argument("--variant", default="c2f", help="whose kept runs (a bench.peers method)")
    p.add_argument(
        "--visited",
        action="store_true",
        help="also the best configuration each search trained, by the truth (each is "
        "scored): what the search's runs allowed, the rest being the choice's; and the "
        "best of them by a validation mean over fresh seeds: what a choice by validation "
        "accuracy could do without seed noise",
    )
    p.add_argument("--json", action="store_true", help="print the figures as JSON, last line")
    args = p.parse_args(argv)
    if not args.root.is_dir():
        raise SystemExit(
            f"error: {args.root} is not a folder; keep runs with bench.peers --keep DIR"
        )
    land = peers.LANDSCAPES[args.landscape]
    res = rechoose(
        args.root.resolve(), land, args.choose, variant=args.variant, visited=args.visited
    )
    print_table(args.landscape, res, list(res["rules"]))
    if args.json:
        print(json.dumps(res, default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
