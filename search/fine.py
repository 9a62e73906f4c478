"""``python -m search.fine``: narrow the ranges around the best coarse trials and search again.

Each log range becomes [min / 10**margin, max * 10**margin] over the top-k coarse
trials' values, clipped to the coarse range. The chosen ranges are recorded on
the fine study (user attr ``ranges``), and the top-k coarse trials are queued
first (``enqueue_trial``) so the fine study starts from them.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the slow imports: a signal now ends it at once
    from search.sweep.signals import exit_at_once_while_starting

    exit_at_once_while_starting()

import math

import optuna

from search import cli
from search.sweep import studies as st


def narrow(
    trials: list[optuna.trial.FrozenTrial],
    coarse: dict[str, tuple[float, float]],
    *,
    margin: float,
) -> dict[str, tuple[float, float]]:
    """Fine ranges: the span of the trials' values widened by ``margin`` decades each side."""
    if not trials:
        raise ValueError("no completed coarse trials to narrow around; run search.coarse first")
    ranges = {}
    for name, (lo, hi) in coarse.items():
        values = [t.params[name] for t in trials if name in t.params]
        f = 10.0**margin
        new_lo, new_hi = max(lo, min(values) / f), min(hi, max(values) * f)
        if new_hi <= new_lo:  # one value at a bound with margin 0
            new_lo, new_hi = max(lo, new_lo / 1.01), min(hi, new_hi * 1.01)
        ranges[name] = (new_lo, new_hi)
    return ranges


@cli.guarded
def main(argv: list[str] | None = None) -> int:
    p = cli.base_parser("python -m search.fine", "Fine search around the best coarse trials.")
    p.add_argument("--top-k", type=int, default=None, help="coarse trials to narrow around")
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
    if coarse is None or not st.top_trials(coarse, 1):
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
        ranges = {k: (float(v[0]), float(v[1])) for k, v in recorded.items()}
        starts: list[dict[str, float]] = []
    else:
        best = st.top_trials(coarse, top_k)
        ranges = narrow(best, dict(spec.search), margin=margin)
        starts = [dict(t.params) for t in best]
    print("fine ranges (log-uniform):")
    for name, (lo, hi) in ranges.items():
        coarse_range = ""
        if name in spec.search:  # the study file may have changed since the fine study began
            clo, chi = spec.search[name]
            coarse_range = f"coarse [{clo:.1e}, {chi:.1e}], "
        print(
            f"  {name:>10}: [{lo:.3e}, {hi:.3e}]  ({coarse_range}"
            f"{math.log10(hi / lo):.2f} decades)"
        )
    target = args.trials or spec.fine.trials
    study = cli.run_stage(
        spec,
        "fine",
        target=target,
        ranges=ranges,
        enqueue=starts,
        attrs={"top_k": top_k, "margin": margin, "coarse_study": coarse.study_name},
    )
    if cli.finish(spec, study, list(ranges)):
        cli.next_step("final", args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
