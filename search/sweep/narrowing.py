"""Fine ranges from coarse configurations, respecting the seed noise.

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
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from search.sweep.replicates import Configuration, pooled_sd

FLAT_SHARE = 2 / 3


@dataclass
class Narrowing:
    ranges: dict[str, tuple[float, float]]
    sigma: float | None  # the seed noise of one run (pooled sd), None without replicates
    within: list[Configuration]  # within noise of the best (the best included)
    chosen: list[Configuration]  # what the ranges cover: within noise + the top_k means
    flat: list[str] = field(default_factory=list)  # parameters flat within noise
    extended: dict[str, str] = field(default_factory=dict)  # parameter -> what was done
    notes: list[str] = field(default_factory=list)

    def as_dict(self) -> dict:
        """What the fine study records (user attr ``narrowing``), for status and report."""
        return {
            "sigma": self.sigma,
            "within": [c.number for c in self.within],
            "chosen": [c.number for c in self.chosen],
            "flat": self.flat,
            "extended": self.extended,
            "notes": self.notes,
        }


def within_noise(configs: Sequence[Configuration], sigma: float) -> list[Configuration]:
    """The configurations whose mean is within one standard error of the first one's
    (the best: :func:`search.sweep.replicates.configurations` order)."""
    best = configs[0]
    return [c for c in configs if best.mean - c.mean <= sigma * math.sqrt(1 / best.n + 1 / c.n)]


def narrow(
    configs: Sequence[Configuration],
    coarse: dict[str, tuple[float, float]],
    *,
    margin: float,
    top_k: int,
    extend: float = 1.0,
    mode: str = "noise",
    valid: Callable[[dict[str, float]], bool] = lambda point: True,
) -> Narrowing:
    """The fine ranges around ``configs`` (best first, as ranked by
    :func:`search.sweep.replicates.configurations`) inside ``coarse``.

    ``valid(point)`` says whether a corner of the new ranges can be trained (an
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
    f = 10.0**margin
    ranges: dict[str, tuple[float, float]] = {}
    flat, extended = [], {}
    for name, (lo, hi) in coarse.items():
        values = [c.params[name] for c in chosen if name in c.params]
        if not values:
            ranges[name] = (lo, hi)
            continue
        vmin, vmax = min(values), max(values)
        span = [c.params[name] for c in within if name in c.params]
        decades = math.log10(hi / lo)
        if sigma is not None and span and len(within) > 1:
            if math.log10(max(span) / min(span)) >= FLAT_SHARE * decades:
                flat.append(name)
        floor, ceiling = lo / 10.0**extend, hi * 10.0**extend
        new_lo, new_hi = max(floor, vmin / f), min(ceiling, vmax * f)
        said = []
        if new_lo < lo:
            said.append(f"below the coarse range's lower edge {lo:.2e} to {new_lo:.2e}")
        if new_hi > hi:
            said.append(f"above the coarse range's upper edge {hi:.2e} to {new_hi:.2e}")
        if new_hi <= new_lo:  # one value at a bound with margin 0
            new_lo, new_hi = new_lo / 1.01, new_hi * 1.01
        ranges[name] = (new_lo, new_hi)
        if said:
            extended[name] = "extended " + " and ".join(said)
    # Each extension on its own: one that makes a corner invalid is given up, not the others.
    extended_ranges = dict(ranges)
    for name in extended:
        lo, hi = coarse[name]
        ranges[name] = (max(lo, ranges[name][0]), min(hi, ranges[name][1]))
    for name in list(extended):
        trial = {**ranges, name: extended_ranges[name]}
        if _corners_valid(trial, valid):
            ranges = trial
        else:
            extended[name] = "kept at the coarse edge: past it the training settings are invalid"
    for name in flat:
        lo, hi = coarse[name]
        span = [c.params[name] for c in within]
        notes.append(
            f"{name}: flat within noise (sigma {sigma:.4f}) over "
            f"{math.log10(max(span) / min(span)):.1f} of the coarse range's "
            f"{math.log10(hi / lo):.1f} decades; any value there is as good as the best "
            "within the seed noise, and the fine range stays wide"
        )
    return Narrowing(ranges, sigma, within, chosen, flat, extended, notes)


def _corners_valid(
    ranges: dict[str, tuple[float, float]], valid: Callable[[dict[str, float]], bool]
) -> bool:
    import itertools

    names = sorted(ranges)
    return all(
        valid(dict(zip(names, corner, strict=True)))
        for corner in itertools.product(*(ranges[n] for n in names))
    )
