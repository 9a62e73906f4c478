"""Fine ranges from coarse configurations, respecting the seed noise: every kind of range.

A configuration is *within noise* of the best when its mean validation
accuracy is below the best mean by at most one standard error of the
difference, ``sigma * sqrt(1 / n_best + 1 / n)``, where sigma is the pooled
standard deviation over seeds of the replicated configurations. The fine
range of each parameter spans every configuration within noise and the
``top_k`` best means, widened by ``margin`` decades on each side.

- Flat: when the configurations within noise span most of a coarse range
  (:data:`FLAT_SHARE` of its decades), the landscape is flat within noise along
  that parameter; the range stays wide and the choice is said to be noise.
- Edges: when that span comes within ``margin`` of an edge of the coarse
  range, the fine range goes past the edge by up to ``extend`` decades (not
  along a flat parameter: a flat landscape says nothing of what lies past it).
- Without replicates there is no noise estimate: the ``top_k`` best single
  runs make the range (``narrow = "top_k"`` asks for that always).

Floats and integers narrow on their own axis (:attr:`search.config.space.Range.scale`):
decades where log; on a linear axis a "decade" of margin or extension is
:data:`search.config.space.LINEAR_DECADE` of the coarse width. Integers stay
integers. A choice keeps the levels of the configurations within noise of the
best (without a noise estimate, of the ``top_k`` best), keeps levels the coarse
stage never tried, and drops the others, saying so.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import optuna
from optuna.trial import FrozenTrial, TrialState

from model.errors import UsageError
from search.config import space as sp
from search.config.study import StudySpec, check_point
from search.sweep import replicates as rep
from search.sweep import studies as st
from search.sweep import surrogate
from search.sweep.objective import CURVES
from search.sweep.replicates import Configuration, pooled_sd

FLAT_SHARE = 2 / 3


@dataclass
class Narrowing:
    ranges: dict[str, sp.Range]
    sigma: float | None  # the seed noise of one run (pooled sd), None without replicates
    within: list[Configuration]  # within noise of the best (the best included)
    chosen: list[Configuration]  # what the ranges cover: within noise + the top_k means
    flat: list[str] = field(default_factory=list)  # parameters flat within noise
    extended: dict[str, str] = field(default_factory=dict)  # parameter -> what was done
    notes: list[str] = field(default_factory=list)
    dropped: dict[str, list] = field(default_factory=dict)  # choice -> levels dropped
    noise_from: str = "replicates"  # where sigma comes from: "model" or "replicates"

    def as_dict(self) -> dict:
        """What the fine study records (user attr ``narrowing``), for status and report."""
        return {
            "sigma": self.sigma,
            "within": [c.number for c in self.within],
            "chosen": [c.number for c in self.chosen],
            "flat": self.flat,
            "extended": self.extended,
            "notes": self.notes,
            "dropped": {k: [sp.describe_value(v) for v in vs] for k, vs in self.dropped.items()},
            "noise_from": self.noise_from,
        }


def within_noise(configs: Sequence[Configuration], sigma: float) -> list[Configuration]:
    """The configurations whose mean is within one standard error of the first one's
    (the best: :func:`search.sweep.replicates.configurations` order)."""
    best = configs[0]
    return [c for c in configs if best.mean - c.mean <= sigma * math.sqrt(1 / best.n + 1 / c.n)]


def narrow(
    configs: Sequence[Configuration],
    coarse: dict[str, sp.Range],
    *,
    margin: float,
    top_k: int,
    extend: float = 1.0,
    mode: str = "noise",
    valid: Callable[[dict[str, Any]], bool] = lambda point: True,
    trials: Sequence[FrozenTrial] = (),
    n_val: int | None = None,
) -> Narrowing:
    """The fine ranges around ``configs`` (best first, as ranked by
    :func:`search.sweep.replicates.configurations`) inside ``coarse``.

    ``mode = "model"``: within noise of the best are the configurations whose value
    predicted by the model of the landscape fitted to every run in ``trials``
    (:func:`search.sweep.surrogate.rank`) is within one standard error of the
    difference (the model's own uncertainty at both) of the best prediction, and sigma
    is the model's seed noise. The ranges still cover the ``top_k`` best means: the
    model marks down a configuration next to runs that diverged, and the fine stage
    must still be able to look there (an optimum often sits just below such a cliff).
    With too few runs to fit a model it narrows as ``"noise"`` does.

    ``valid(point)`` says whether a point of the new ranges can be trained (an
    eta_max extended below eta_min cannot); an extension that makes a corner
    invalid is given up and the range stays at the coarse edge.
    """
    if not configs:
        raise UsageError("no completed coarse trials to narrow around; run search.coarse first")
    configs = list(configs)
    within: list[Configuration] | None = None
    sigma = None
    if mode == "model":
        ranked, model = surrogate.rank(configs, trials, coarse, n_val=n_val)
        if model is not None:
            best = ranked[0]
            sigma = model.noise_sd
            within = [
                r.config for r in ranked if best.mean - r.mean <= math.sqrt(best.sd**2 + r.sd**2)
            ]
        else:
            mode = "noise"
    if mode == "noise":
        sigma = pooled_sd(configs)
    if mode == "top_k":
        extend = 0.0  # the old rule: the top_k single runs, inside the coarse range
    notes = []
    if within is None:
        within = configs[:1] if sigma is None else within_noise(configs, sigma)
        if sigma is None and mode == "noise":
            notes.append(
                "no replicated configurations, so no estimate of the seed noise: the ranges "
                f"cover the {top_k} best single runs (set [coarse] replicates >= 2)"
            )
    chosen = list(within) + [c for c in configs[:top_k] if c not in within]
    ranges: dict[str, sp.Range] = {}
    flat: list[str] = []
    extended: dict[str, str] = {}
    dropped: dict[str, list] = {}

    def values(name: str, group: Sequence[Configuration]) -> list[Any]:
        r = coarse[name]
        return [r.decode(c.params[name]) for c in group if name in c.params]

    for name, r in coarse.items():
        if r.kind == "choice":
            keep_from = within if sigma is not None else chosen
            why = (
                "not within the seed noise of the best"
                if sigma is not None
                else (f"not among the {top_k} best")
            )
            ranges[name], gone, said = _narrow_choice(
                r, tried=values(name, configs), kept=values(name, keep_from), why=why
            )
            notes += said
            if gone:
                dropped[name] = gone
            continue
        chosen_values = values(name, chosen)
        if not chosen_values:
            ranges[name] = r
            continue
        span = values(name, within)
        width = r.scale(r.high) - r.scale(r.low)
        if sigma is not None and span and len(within) > 1:
            if r.scale(max(span)) - r.scale(min(span)) >= FLAT_SHARE * width:
                flat.append(name)
        # Flat within noise up to an edge says nothing about what lies past it.
        past = 0.0 if name in flat else extend
        ranges[name], said_edges = _narrow_number(r, chosen_values, margin=margin, extend=past)
        if said_edges:
            extended[name] = "extended " + " and ".join(said_edges)
    # Each extension on its own: one that makes a corner invalid is given up, not the others.
    extended_ranges = dict(ranges)
    for name in extended:
        r, c = ranges[name], coarse[name]
        ranges[name] = r.narrowed(max(c.low, r.low), min(c.high, r.high))
    for name in list(extended):
        candidate = {**ranges, name: extended_ranges[name]}
        if all(valid(point) for point in sp.points_to_check(candidate)):
            ranges = candidate
        else:
            extended[name] = "kept at the coarse edge: past it the training settings are invalid"
    notes += [_flat_note(coarse[name], values(name, within), sigma or 0.0) for name in flat]
    noise_from = "model" if mode == "model" else "replicates"
    return Narrowing(ranges, sigma, within, chosen, flat, extended, notes, dropped, noise_from)


def _narrow_choice(
    r: sp.Range, *, tried: list[Any], kept: list[Any], why: str
) -> tuple[sp.Range, list[Any], list[str]]:
    """A choice keeps the levels in ``kept`` and those never ``tried``; (the range, the
    levels dropped, what to say)."""
    tried_set, kept_set = set(map(repr, tried)), set(map(repr, kept))
    keep = [v for v in r.choices if repr(v) in kept_set or repr(v) not in tried_set]
    gone = [v for v in r.choices if v not in keep]
    notes = []
    if gone:
        notes.append(
            f"{r.name}: dropped {', '.join(sp.describe_value(v) for v in gone)} "
            f"({why}); kept {', '.join(sp.describe_value(v) for v in keep)}"
        )
    untried = [v for v in r.choices if repr(v) not in tried_set]
    if untried:
        notes.append(
            f"{r.name}: kept {', '.join(sp.describe_value(v) for v in untried)}, "
            "never tried in the coarse stage"
        )
    return (r.with_choices(keep) if keep else r), gone, notes


def _narrow_number(
    r: sp.Range, chosen: list[float], *, margin: float, extend: float
) -> tuple[sp.Range, list[str]]:
    """A float or integer range around the ``chosen`` values, widened by ``margin`` and
    past a coarse edge by at most ``extend`` (decades, or their linear equivalent);
    (the range, what was said of the edges it passed)."""
    pos = r.scale
    width = pos(r.high) - pos(r.low)
    unit = 1.0 if r.log else sp.LINEAR_DECADE * width  # one "decade" on this axis
    lo_p = max(pos(r.low) - extend * unit, pos(min(chosen)) - margin * unit)
    hi_p = min(pos(r.high) + extend * unit, pos(max(chosen)) + margin * unit)
    if hi_p <= lo_p:  # one value at a bound with margin 0: 1 % either side
        half = math.log10(1.01) if r.log else 0.005 * width
        lo_p, hi_p = lo_p - half, hi_p + half
    back = (lambda p: 10.0**p) if r.log else (lambda p: p)
    new = r.narrowed(back(lo_p), back(hi_p))
    said = []
    if new.low < r.low:
        said.append(
            f"below the coarse range's lower edge {r.format(r.low)} to {new.format(new.low)}"
        )
    if new.high > r.high:
        said.append(
            f"above the coarse range's upper edge {r.format(r.high)} to {new.format(new.high)}"
        )
    return new, said


def _flat_note(r: sp.Range, span: list[float], sigma: float) -> str:
    measured = (
        f"{r.scale(max(span)) - r.scale(min(span)):.1f} of the coarse range's "
        f"{r.scale(r.high) - r.scale(r.low):.1f} decades"
        if r.log
        else f"{(max(span) - min(span)) / (r.high - r.low):.0%} of its width"
    )
    return (
        f"{r.name}: flat within noise (sigma {sigma:.4f}) over {measured}; any value there "
        "is as good as the best within the seed noise, and the fine range stays wide"
    )


@dataclass
class FinePlan:
    """What the fine stage searches: its ranges, the configurations it starts from (runs
    to queue), the coarse runs it carries over (``warm``: copies of the coarse trials
    inside its ranges, when both stages train alike), what it records on its study, and
    the lines that say so."""

    ranges: dict[str, sp.Range]
    starts: list[dict[str, Any]]
    attrs: dict[str, Any]
    lines: list[str]
    warm: list[FrozenTrial] = field(default_factory=list)


FROM_COARSE = st.FROM_COARSE_ATTR  # user attr of a fine trial copied from coarse: its number
CARRIED_ATTRS = ("seed", "diverged", "reason", rep.REPLICATE)


def carried_over(trials: Sequence[FrozenTrial], ranges: dict[str, sp.Range]) -> list[FrozenTrial]:
    """Copies of the finished ``trials`` whose parameters all lie inside ``ranges``, for the
    fine study: the sampler starts from what the coarse stage learnt there (Optuna's way
    to warm-start a study), and the fine stage's choice and race see those runs too.

    They keep their value, curve points, seed and replicate index, and name their coarse
    trial (user attr ``from_coarse``); not their training time, which was spent in the
    coarse stage.
    """
    distributions = sp.distributions(ranges)
    out = []
    for t in trials:
        if t.state not in st.FINISHED or set(t.params) != set(ranges):
            continue
        if not all(ranges[k].contains(v) for k, v in t.params.items()):
            continue
        attrs = {k: t.user_attrs[k] for k in CARRIED_ATTRS + ("curves",) if k in t.user_attrs}
        copy = optuna.trial.create_trial(
            state=t.state,
            value=t.value if t.state == TrialState.COMPLETE else None,
            params=dict(t.params),
            distributions=distributions,
            intermediate_values=dict(t.intermediate_values),
            user_attrs={**attrs, FROM_COARSE: t.number},
            # the learning curves the figures draw
            system_attrs={CURVES: t.system_attrs[CURVES]} if CURVES in t.system_attrs else None,
        )
        out.append(copy)
    return out


def plan_fine(
    spec: StudySpec,
    *,
    top_k: int | None = None,
    margin: float | None = None,
    coarse_command: str = "search.coarse",
) -> FinePlan:
    """The fine stage's ranges: narrowed around the finished coarse stage's best
    configurations (:func:`narrow`), or, when the fine study has trials already, the
    ranges it was started with. ``top_k`` and ``margin`` override the study file's;
    ``coarse_command`` is named in the errors that ask to finish the coarse stage."""
    if top_k is not None and top_k < 1:
        raise UsageError(f"--top-k must be >= 1, got {top_k}")
    if margin is not None and not margin >= 0:
        raise UsageError(f"--margin must be >= 0 decades, got {margin}")
    coarse = st.load_existing(spec, "coarse")
    if coarse is None or not rep.study_configurations(coarse):
        raise UsageError(
            f"no completed coarse trials of {spec.name} in {spec.storage_url()}; "
            f"run {coarse_command} first"
        )
    # The coarse runs narrow the ranges and are carried over: not under changed settings.
    st.check_settings(coarse, spec, "coarse")
    existing = st.load_existing(spec, "fine")
    recorded = existing.user_attrs.get("ranges") if existing is not None else None
    if recorded and existing is not None and existing.get_trials(deepcopy=False):
        plan = _resumed_plan(coarse, existing, top_k=top_k, margin=margin)
    else:
        if why := st.pending(spec, "coarse", coarse):
            raise UsageError(
                f"{coarse.study_name} is not finished ({why}); the fine ranges need all of it: "
                f"run {coarse_command}{st.trials_flag(coarse, spec, 'coarse')} again to finish "
                "it, or wait for the workers running it"
            )
        plan = _new_plan(
            spec,
            coarse,
            top_k=spec.fine.top_k if top_k is None else top_k,
            margin=spec.fine.margin if margin is None else margin,
        )
    plan.lines.append("fine ranges:")
    for name, r in plan.ranges.items():
        # The study file may have changed since the fine study began.
        was = f"  (coarse {spec.search[name].describe()})" if name in spec.search else ""
        plan.lines.append(f"  {name:>10}: {r.describe()}{was}")
    said = plan.attrs.get("narrowing") or (
        existing.user_attrs.get("narrowing", {}) if existing else {}
    )
    plan.lines += [f"  {name}: {what}" for name, what in said.get("extended", {}).items()]
    plan.lines += [f"note: {note}" for note in said.get("notes", [])]
    plan.attrs["coarse_study"] = coarse.study_name
    return plan


def _resumed_plan(
    coarse: optuna.Study, existing: optuna.Study, *, top_k: int | None, margin: float | None
) -> FinePlan:
    """A fine study with trials keeps the ranges it was started with."""
    was = (existing.user_attrs.get("top_k"), existing.user_attrs.get("margin"))
    asked = (was[0] if top_k is None else top_k, was[1] if margin is None else margin)
    if asked != was:
        raise UsageError(
            f"study {existing.study_name} was started with top_k={was[0]}, "
            f"margin={was[1]}; got top_k={asked[0]}, margin={asked[1]}. Its ranges are "
            "fixed once it has trials: drop --top-k/--margin to resume it, or use "
            "another --storage for a new fine search"
        )
    lines = []
    coarse_now = len(coarse.get_trials(deepcopy=False, states=st.FINISHED))
    coarse_then = existing.user_attrs.get("coarse_finished")
    if coarse_then is not None and coarse_now != coarse_then:
        lines.append(
            f"note: {coarse.study_name} has {coarse_now} finished trials, {coarse_then} "
            "when these ranges were fixed; they stay as they are (use another --storage "
            "for a fine search on the new results)"
        )
    ranges = sp.from_record(existing.user_attrs["ranges"])
    return FinePlan(ranges, [], {"top_k": was[0], "margin": was[1]}, lines)


def _new_plan(spec: StudySpec, coarse: optuna.Study, *, top_k: int, margin: float) -> FinePlan:
    """Fine ranges narrowed around the coarse stage's configurations."""
    configs = rep.study_configurations(coarse, spec.coarse.replicates)

    def valid(point: dict[str, Any]) -> bool:
        try:
            check_point(spec, "fine", point)
        except (ValueError, TypeError):
            return False
        return True

    n = narrow(
        configs,
        dict(spec.search),
        margin=margin,
        top_k=top_k,
        extend=spec.fine.extend,
        mode=spec.fine.narrow,
        valid=valid,
        trials=coarse.get_trials(deepcopy=False),
        n_val=surrogate.n_val_of(coarse),
    )
    noise = "" if n.sigma is None else f"; seed noise (sd of one run) {n.sigma:.4f}"
    lines = [
        f"best coarse configuration: trial {configs[0].number}, val acc "
        f"{configs[0].describe()}; {len(n.within)} configuration(s) within noise of it{noise}"
    ]
    # Both stages train alike: the coarse runs inside the fine ranges are carried over
    # (the same seed would only repeat them). Else the best configurations start the fine
    # search, where the fine ranges hold them, trained the fine stage's way.
    carry = spec.fine.warm_start and not spec.fine.training
    warm = carried_over(coarse.get_trials(deepcopy=False), n.ranges) if carry else []
    starts = [
        dict(c.params)
        for c in configs[:top_k]
        if all(k in n.ranges and n.ranges[k].contains(v) for k, v in c.params.items())
    ]
    if warm:
        starts = []
        lines.append(
            f"{sum(not rep.is_replicate(t) for t in warm)} coarse trials (and "
            f"{sum(rep.is_replicate(t) for t in warm)} replicate runs) inside the fine ranges "
            "are carried over: the fine search starts from them"
        )
    attrs = {
        "top_k": top_k,
        "margin": margin,
        "narrowing": n.as_dict(),
        "coarse_finished": len(coarse.get_trials(deepcopy=False, states=st.FINISHED)),
    }
    return FinePlan(n.ranges, starts, attrs, lines, warm)
