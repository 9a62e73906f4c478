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
    from search.sweep.signals import exit_at_once_while_starting

    exit_at_once_while_starting()

from typing import Any

from search import cli
from search.config import space as sp
from search.config.study import check_point
from search.sweep import narrowing
from search.sweep import replicates as rep
from search.sweep import studies as st


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
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be >= 1, got {args.top_k}")
    if args.margin is not None and not args.margin >= 0:
        raise ValueError(f"--margin must be >= 0 decades, got {args.margin}")
    top_k = spec.fine.top_k if args.top_k is None else args.top_k
    margin = spec.fine.margin if args.margin is None else args.margin
    coarse = st.load_existing(spec, "coarse")
    if coarse is None or not rep.study_configurations(coarse):
        raise ValueError(
            f"no completed coarse trials of {spec.name} in {spec.storage_url()}; "
            f"run {cli.command('coarse')}{cli.same_flags(args)} first"
        )
    existing = st.load_existing(spec, "fine")
    recorded = existing.user_attrs.get("ranges") if existing is not None else None
    if recorded and existing is not None and existing.get_trials(deepcopy=False):
        # Resuming: keep the ranges the fine study was started with.
        was = (existing.user_attrs.get("top_k"), existing.user_attrs.get("margin"))
        asked = (
            was[0] if args.top_k is None else args.top_k,
            was[1] if args.margin is None else args.margin,
        )
        if asked != was:
            raise ValueError(
                f"study {existing.study_name} was started with top_k={was[0]}, "
                f"margin={was[1]}; got top_k={asked[0]}, margin={asked[1]}. Its ranges are "
                "fixed once it has trials: drop --top-k/--margin to resume it, or use "
                "another --storage for a new fine search"
            )
        top_k, margin = was
        ranges = sp.from_record(recorded)
        notes = existing.user_attrs.get("narrowing", {}).get("notes", [])
        extended = existing.user_attrs.get("narrowing", {}).get("extended", {})
        starts: list[dict[str, Any]] = []
        narrowed: dict = {}
        coarse_now = len(coarse.get_trials(deepcopy=False, states=st.FINISHED))
        coarse_then = existing.user_attrs.get("coarse_finished")
        if coarse_then is not None and coarse_now != coarse_then:
            print(
                f"note: {coarse.study_name} has {coarse_now} finished trials, {coarse_then} "
                "when these ranges were fixed; they stay as they are (use another --storage "
                "for a fine search on the new results)"
            )
    else:
        if why := st.pending(spec, "coarse", coarse):
            raise ValueError(
                f"{coarse.study_name} is not finished ({why}); the fine ranges need all of it: "
                f"run {cli.command('coarse')}{cli.same_flags(args)} again to finish it, or "
                "wait for the workers running it"
            )
        configs = rep.study_configurations(coarse, spec.coarse.replicates)

        def valid(point: dict[str, Any]) -> bool:
            try:
                check_point(spec, "fine", point)
            except (ValueError, TypeError):
                return False
            return True

        n = narrowing.narrow(
            configs,
            dict(spec.search),
            margin=margin,
            top_k=top_k,
            extend=spec.fine.extend,
            mode=spec.fine.narrow,
            valid=valid,
        )
        ranges, notes, extended = n.ranges, n.notes, n.extended
        noise = "" if n.sigma is None else f"; seed noise (sd of one run) {n.sigma:.4f}"
        print(
            f"best coarse configuration: trial {configs[0].number}, val acc "
            f"{configs[0].describe()}; {len(n.within)} configuration(s) within noise of it"
            f"{noise}"
        )
        # The best configurations start the fine search, where the fine ranges hold them.
        starts = [
            dict(c.params)
            for c in configs[:top_k]
            if all(k in ranges and ranges[k].contains(v) for k, v in c.params.items())
        ]
        narrowed = {
            "narrowing": n.as_dict(),
            "coarse_finished": len(coarse.get_trials(deepcopy=False, states=st.FINISHED)),
        }
    print("fine ranges:")
    for name, r in ranges.items():
        # The study file may have changed since the fine study began.
        was = f"  (coarse {spec.search[name].describe()})" if name in spec.search else ""
        print(f"  {name:>10}: {r.describe()}{was}")
    for name, what in extended.items():
        print(f"  {name}: {what}")
    for note in notes:
        print(f"note: {note}")
    target = args.trials or spec.fine.trials
    study = cli.run_stage(
        spec,
        "fine",
        target=target,
        ranges=ranges,
        enqueue=starts,
        attrs={
            "top_k": top_k,
            "margin": margin,
            "coarse_study": coarse.study_name,
            **narrowed,
        },
    )
    if cli.finish(spec, study, ranges):
        cli.next_step("final", args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
