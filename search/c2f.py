"""``c2f``: every command of coarse2fine under one name, and ``c2f init``.

``c2f coarse ARGS`` runs ``python -m search.coarse ARGS`` (and so on for fine, final,
report, status, worker, experiment, proxy; train and gradcheck are ``model.train`` and
``model.gradcheck``): the same function, with hints and --help naming the command
as ``c2f coarse``. ``c2f init [DIR]`` copies the study files shipped with the
package (the quick start, the DD2424 studies, the experiments) into ``DIR``
(default ``studies``) for editing: a pip-installed copy has no checkout to read them
from, and the databases and outputs of a study are written beside its file.
"""

from __future__ import annotations

import difflib
import importlib
import sys
from pathlib import Path

# name: (module, one line for `c2f --help`); init is this module's own.
COMMANDS = {
    "init": ("", "copy the shipped study files into ./studies/ for editing"),
    "coarse": ("search.coarse", "coarse search over the study file's [search] ranges"),
    "fine": ("search.fine", "narrow the ranges around the best coarse trials, search again"),
    "final": ("search.final", "retrain the best configuration, report test accuracy"),
    "report": ("search.report", "figures and a Markdown report of a study"),
    "status": ("search.status", "the studies in a storage: trials per state, running or not"),
    "worker": ("search.worker", "join a study on a shared storage (another machine)"),
    "experiment": ("search.experiment", "run an experiment file (a grid of trainings)"),
    "proxy": ("search.proxy", "serve a database to many workers through one gRPC proxy"),
    "train": ("model.train", "train one network from the command line"),
    "gradcheck": ("model.gradcheck", "compare analytic and numerical gradients"),
}
DEFAULT_DIR = "studies"


def version() -> str:
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as installed

    try:
        return installed("coarse2fine")
    except PackageNotFoundError:  # run from a checkout that is not installed
        return "unknown (not installed)"


def usage() -> str:
    width = max(map(len, COMMANDS))
    lines = [
        "usage: c2f COMMAND [ARGS]   (c2f COMMAND --help for its flags)",
        "",
        "Coarse-to-fine hyperparameter search for NumPy k-layer networks, on Optuna.",
        "Start with: c2f init && c2f coarse && c2f fine && c2f final && c2f report",
        "",
        "commands:",
    ]
    lines += [f"  {name:<{width}}  {text}" for name, (_, text) in COMMANDS.items()]
    lines += [
        "",
        "options:",
        "  -h, --help  this list",
        "  --version   the installed version",
        "",
        "exit codes: 0 done; 1 the run failed; 2 bad settings or usage; 130 / 143 / 129 "
        "interrupted",
    ]
    return "\n".join(lines)


def shipped_studies() -> Path:
    """The study files that come with the package: ``search/studies`` in an installed copy
    (package data), ``studies/`` at the top of a checkout."""
    here = Path(__file__).resolve().parent
    for candidate in (here / "studies", here.parent / "studies"):
        if (candidate / "quickstart.toml").is_file():
            return candidate
    raise FileNotFoundError(f"no shipped study files beside {here}: the installation is broken")


def init(argv: list[str]) -> int:
    """``c2f init [DIR] [--force]``: copy the shipped study files into DIR."""
    import argparse
    import shutil

    from search import cli

    p = cli.parser(
        "c2f init",
        "Copy the study files shipped with coarse2fine (quick start, DD2424 studies, "
        "experiments) into DIR for editing. Files already there are kept unless --force.",
    )
    p.add_argument(
        "dir", nargs="?", default=DEFAULT_DIR, help=f"where to put them (default {DEFAULT_DIR})"
    )
    p.add_argument("--force", action="store_true", help="overwrite files that are there")
    args: argparse.Namespace = p.parse_args(argv)
    source = shipped_studies()
    target = Path(args.dir)
    if target.exists() and not target.is_dir():
        print(f"error: {target} exists and is not a directory", file=sys.stderr)
        return 2
    copied, kept = [], []
    try:
        for path in sorted(source.rglob("*.toml")):
            dest = target / path.relative_to(source)
            if dest.exists() and not args.force:
                kept.append(dest)
                continue
            dest.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(path, dest)
            copied.append(dest)
    except OSError as exc:
        print(f"error: cannot write {exc.filename or target}: {exc.strerror}", file=sys.stderr)
        return 1
    print(f"copied {len(copied)} study file(s) into {target}/")
    for dest in copied:
        print(f"  {dest}")
    if kept:
        print(f"kept {len(kept)} file(s) already there (--force overwrites them)")
    quickstart = target / "quickstart.toml"
    study = "" if quickstart.as_posix() == cli.DEFAULT_STUDY else f" --study {quickstart}"
    print(f"next: c2f coarse{study}   (digits, offline, under a minute)")
    return 0


def main(argv: list[str] | None = None) -> int:
    started = argv is None
    if started:  # the program itself: a Ctrl-C while the commands import ends it at once
        from search.sweep.workers.signals import exit_at_once_while_starting

        exit_at_once_while_starting()
    args = sys.argv[1:] if argv is None else list(argv)
    if not args or args[0] in ("-h", "--help"):
        print(usage())
        return 0 if args else 2
    if args[0] == "--version":
        print(f"c2f (coarse2fine) {version()}")
        return 0
    name, rest = args[0], args[1:]
    if name not in COMMANDS:
        close = difflib.get_close_matches(name, COMMANDS, n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        print(
            f"error: unknown command {name!r}{hint} (commands: {', '.join(COMMANDS)}; "
            "c2f --help lists them)",
            file=sys.stderr,
        )
        return 2
    from search import cli

    launcher, cli.LAUNCHER = cli.LAUNCHER, "c2f"
    try:
        if name == "init":
            return init(rest)
        module = importlib.import_module(COMMANDS[name][0])
        if name in ("train", "gradcheck"):
            return module.main(rest, prog=f"c2f {name}")
        return module.main(rest)
    finally:
        cli.LAUNCHER = launcher


if __name__ == "__main__":
    raise SystemExit(main())
