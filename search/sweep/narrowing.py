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
  range, the fine range goes past the edge by up to ``extend`` decades.
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

from search.config import space as sp
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
) -> Narrowing:
    """The fine ranges around ``configs`` (best first, as ranked by
    :func:`search.sweep.replicates.configurations`) inside ``coarse``.

    ``valid(point)`` says whether a point of the new ranges can be trained (an
    eta_max extended below eta_min cannot); an extension that makes a corner
    invalid is given up and the range stays at the coarse edge.
    """
    if not configs:
        raise ValueError("no completed coarse trials to narrow around; run search.coarse first")
    configs = list(configs)
    sigma = pooled_sd(configs) if mode == "noise" else None
    if mode == "top_k":
        extend = 0.0  # the old rule: the top_k single runs, inside the coarse range
    notes = []
    if sigma is None:
        within = configs[:1]
        if mode == "noise":
            notes.append(
                "no replicated configurations, so no estimate of the seed noise: the ranges "
                f"cover the {top_k} best single runs (set [coarse] replicates >= 2)"
            )
    else:
        within = within_noise(configs, sigma)
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
            tried = set(map(repr, values(name, configs)))
            kept = set(map(repr, values(name, keep_from)))
            keep = [v for v in r.choices if repr(v) in kept or repr(v) not in tried]
            gone = [v for v in r.choices if v not in keep]
            ranges[name] = r.with_choices(keep) if keep else r
            if gone:
                dropped[name] = gone
                why = (
                    "not within the seed noise of the best"
                    if sigma is not None
                    else (f"not among the {top_k} best")
                )
                notes.append(
                    f"{name}: dropped {', '.join(sp.describe_value(v) for v in gone)} "
                    f"({why}); kept {', '.join(sp.describe_value(v) for v in keep)}"
                )
            untried = [v for v in r.choices if repr(v) not in tried]
            if untried:
                notes.append(
                    f"{name}: kept {', '.join(sp.describe_value(v) for v in untried)}, "
                    "never tried in the coarse stage"
                )
            continue
        chosen_values = values(name, chosen)
        if not chosen_values:
            ranges[name] = r
            continue
        pos = r.scale
        width = pos(r.high) - pos(r.low)
        unit = 1.0 if r.log else sp.LINEAR_DECADE * width  # one "decade" on this axis
        span = values(name, within)
        if sigma is not None and span and len(within) > 1:
            if pos(max(span)) - pos(min(span)) >= FLAT_SHARE * width:
                flat.append(name)
        lo_p = max(pos(r.low) - extend * unit, pos(min(chosen_values)) - margin * unit)
        hi_p = min(pos(r.high) + extend * unit, pos(max(chosen_values)) + margin * unit)
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
        ranges[name] = new
        if said:
            extended[name] = "extended " + " and ".join(said)
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
    for name in flat:
        r = coarse[name]
        span = values(name, within)
        axis = "decades" if r.log else "of its width"
        measured = (
            f"{r.scale(max(span)) - r.scale(min(span)):.1f} of the coarse range's "
            f"{r.scale(r.high) - r.scale(r.low):.1f} decades"
            if r.log
            else f"{(max(span) - min(span)) / (r.high - r.low):.0%} {axis}"
        )
        notes.append(
            f"{name}: flat within noise (sigma {sigma:.4f}) over {measured}; any value there "
            "is as good as the best within the seed noise, and the fine range stays wide"
        )
    return Narrowing(ranges, sigma, within, chosen, flat, extended, notes, dropped)
