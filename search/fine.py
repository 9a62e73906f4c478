"""``python -m search.fine``: narrow the ranges around the best coarse configurations and
search again.

The ranges cover every coarse configuration within the seed noise of the best
(means over replicates) and the top-k best means, widened by ``margin``
decades, and go past an edge of the coarse range the best sits on
(:mod:`search.sweep.narrowing`). They are recorded on the fine study (user
attrs ``ranges`` and ``narrowing``), and the configurations they cover are
queued first (``enqueue_trial``) so the fine study starts from them.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the slow imports: a signal now ends it at once
    from search.sweep.workers.signals import exit_at_once_while_starting

    exit_at_once_while_starting()

from search import cli
from search.sweep import stage
from search.sweep import studies as st
from search.sweep.narrowing import plan_fine


@cli.guarded
def main(argv: list[str] | None = None) -> int:
    p = cli.base_parser("python -m search.fine", "Fine search around the best coarse trials.")
    p.add_argument(
        "--top-k",
        type=int,
        default=None,
        help="best coarse configurations the ranges cover at least (default: the study file's)",
    )
    p.add_argument("--margin", type=float, default=None, help="decades added on each side")
    args = p.parse_args(argv)
    spec = cli.load(args)
    again = f"{cli.command('coarse')}{cli.same_flags(args)}"
    # before the plan is said: the coarse runs it narrows around are on the same data
    prepared = st.prepare_for(spec)
    st.check_coarse_data(spec, prepared)
    plan = plan_fine(spec, top_k=args.top_k, margin=args.margin, coarse_command=again)
    for line in plan.lines:
        print(line)
    target = args.trials or spec.fine.trials
    study = stage.run_stage(
        spec,
        "fine",
        target=target,
        space=plan.ranges,
        enqueue=plan.starts,
        warm=plan.warm,
        attrs=plan.attrs,
        prepared=prepared,
    )
    cli.end_stage(
        spec, study, plan.ranges, args, next_name="final", replicates=spec.fine.replicates
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
