"""``python -m search.report``: figures and a markdown report of a study's coarse and fine stages.

For the study file's coarse and fine studies (whichever exist) it draws
validation accuracy against each searched parameter (log axis), the
optimisation history of each stage and the learning curves of each stage's top
trials, and writes ``report.md`` beside them: the ranges of each stage, the
top-10 trials, counts per state, the epochs trained and the final result (test
accuracy). ``--experiment PATH`` reports one experiment study file instead and
``--all`` writes one report with the gradient checks, every experiment and the study.
The figures and Markdown are made in :mod:`search.reporting`.
"""

from __future__ import annotations

from model.errors import UsageError, check_out_dir

if __name__ == "__main__":  # before the slow imports: a signal now ends it at once
    from search.sweep.workers.signals import exit_at_once_while_starting

    exit_at_once_while_starting()

from pathlib import Path

from search import cli
from search.reporting import files_only, markdown
from search.sweep import studies as st
from search.sweep.workers.storage import safe_url


@cli.guarded
def main(argv: list[str] | None = None) -> int:
    files_only()
    p = cli.base_parser(
        "python -m search.report", "Figures and a markdown report of a study.", trains=False
    )
    p.add_argument("--out", default=None, help="output directory (default <out dir>/report)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--experiment", default=None, help="report one experiment study file")
    which.add_argument(
        "--all", action="store_true", help="gradient checks, every experiment and the study"
    )
    p.add_argument(
        "--experiments-dir",
        default=None,
        help="with --all: where the experiment files are (default: experiments/ beside the "
        "study file)",
    )
    args = p.parse_args(argv)
    if args.out:
        check_out_dir(args.out, "--out")
    if args.experiment:
        # An experiment file stands alone: no study file needed; figures beside it.
        exp_path = Path(args.experiment)
        out = Path(args.out) if args.out else exp_path.resolve().parent / "out" / exp_path.stem
        md, figures = markdown.experiment_report(exp_path, out, storage=args.storage)
    else:
        spec = cli.load(args)
        # made by the report itself: a refused one leaves no empty folder behind
        out = Path(args.out) if args.out else spec.out_dir() / "report"
        if args.all:
            if args.experiments_dir:
                exp_dir = Path(args.experiments_dir)
                if not exp_dir.is_dir():
                    raise UsageError(
                        f"--experiments-dir {exp_dir} is not a directory; pass the folder that "
                        "holds the experiment files (studies/experiments in this repository)"
                    )
            else:
                exp_dir = Path(spec.path).resolve().parent / "experiments"
            md, figures = markdown.all_report(spec, out, storage=args.storage, exp_dir=exp_dir)
        else:
            if not any(st.load_existing(spec, stage) for stage in st.STAGES):
                raise UsageError(
                    f"no coarse or fine study of {spec.name} in {safe_url(spec.storage_url())}; "
                    f"run {cli.command('coarse')}{cli.same_flags(args)} first"
                )
            md, figures = markdown.study_report(spec, out)
    for path in figures:
        print(f"wrote {path}")
    print(f"wrote {md}")
    more = ""
    if not args.all and not args.experiment:
        more = (
            f" (or {cli.command('report')} --all{cli.same_flags(args)}: gradient checks and "
            "every experiment too)"
        )
    print(f"next: open {md}{more}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
