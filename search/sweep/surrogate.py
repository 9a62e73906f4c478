"""A model of the landscape: a Gaussian process over every run a stage made.

A configuration's mean over its runs is a poor estimate when it has one or two
runs: the best of many noisy means is the luckiest, not the best (the winner's
curse). The model pools every run of a stage, the runs of neighbouring
configurations included: a Gaussian process over the searched parameters (each
on its own axis, scaled to [0, 1] over its range; a choice as one column per
level) with a Matern kernel, a length scale per parameter and a white-noise
term fitted to the runs, so the seed noise is estimated from all of them.

A run that diverged counts as the worst value any run reached: it trained nothing
usable, and the model learns that its neighbourhood is risky (an eta_max just
below where training diverges is predicted lower than its own lucky runs say),
without the kink a value at chance would put into the surface. Runs stopped by
the pruner are left out: their final value is unknown.

:func:`fit` returns None when there is too little to fit (fewer than
:data:`MIN_RUNS` runs, or all equal); callers then fall back to the means.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from optuna.trial import FrozenTrial, TrialState

from search.config import space as sp

MIN_RUNS = 4
MIN_LENGTH_SCALE = 0.1  # of a range's width (the unit cube's side)


def is_diverged(t: FrozenTrial) -> bool:
    return t.state == TrialState.PRUNED and bool(t.user_attrs.get("diverged"))


def encoder(space: Mapping[str, sp.Range]):
    """A function from a trial's params to a point of the unit cube (choices one-hot)."""
    ranges = list(space.values())

    def encode(params: Mapping[str, Any]) -> list[float]:
        x: list[float] = []
        for r in ranges:
            v = params.get(r.name)
            if r.kind == "choice":
                codes = [sp.encode(c) for c in r.choices]
                x += [float(v == c or v == code) for c, code in zip(r.choices, codes, strict=True)]
                continue
            lo, hi = r.scale(r.low), r.scale(r.high)
            if v is None or not isinstance(v, int | float) or (r.log and v <= 0):
                x.append(0.5)  # not searched in this run: the middle
                continue
            x.append((r.scale(float(v)) - lo) / (hi - lo) if hi > lo else 0.5)
        return x

    return encode


def random_points(space: Mapping[str, sp.Range], n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` points drawn uniformly over the unit cube :func:`encoder` maps ``space`` to:
    each number's axis uniform, each choice one level (its one-hot columns)."""
    cols = []
    for r in space.values():
        if r.kind == "choice":
            onehot = np.zeros((n, len(r.choices)))
            onehot[np.arange(n), rng.integers(len(r.choices), size=n)] = 1.0
            cols.append(onehot)
        else:
            cols.append(rng.random((n, 1)))
    return np.hstack(cols) if cols else np.zeros((n, 0))


@dataclass
class Surrogate:
    """A fitted model: :meth:`predict` gives the posterior mean and sd of a run's value."""

    gp: Any
    encode: Any
    noise_sd: float  # the fitted white noise: the seed noise of one run
    n_runs: int

    def predict(self, points: Sequence[Mapping[str, Any]]) -> tuple[np.ndarray, np.ndarray]:
        """(mean, sd) of the expected value (noise excluded) at each point's params."""
        if not points:
            return np.zeros(0), np.zeros(0)
        return self.predict_encoded(np.array([self.encode(p) for p in points], dtype=float))

    def predict_encoded(self, X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """:meth:`predict` at points of the unit cube (rows of ``X``, as :func:`encoder`)."""
        mu, sd = self.gp.predict(X, return_std=True)
        # sklearn's sd includes the white noise: take it out, leaving the mean's uncertainty.
        var = np.maximum(np.asarray(sd) ** 2 - self.noise_sd**2, 0.0)
        return np.asarray(mu, dtype=float), np.sqrt(var)


def observations(trials: Sequence[FrozenTrial]) -> tuple[list[dict[str, Any]], list[float]]:
    """(params, value) of every finished run: complete ones, and diverged ones at the floor."""
    done = [t for t in trials if t.state == TrialState.COMPLETE and t.value is not None]
    values = [float(t.value) for t in done if math.isfinite(float(t.value))]  # type: ignore[arg-type]
    if not values:
        return [], []
    floor = min(values)
    params = [dict(t.params) for t in done if math.isfinite(float(t.value))]  # type: ignore[arg-type]
    diverged = [t for t in trials if is_diverged(t) and t.params]
    return params + [dict(t.params) for t in diverged], values + [floor] * len(diverged)


def n_val_of(study: Any) -> int | None:
    """The number of validation examples a study's runs were scored on, if it recorded it."""
    sizes = study.user_attrs.get("data_sizes") or {}
    return sizes.get("val")


def noise_floor(values: Sequence[float], n_val: int | None) -> float:
    """The least variance of one run's validation accuracy: the binomial variance of an
    accuracy near the best run's measured on ``n_val`` examples, 0 when unknown.

    The runs of a stage share a seed, so the model cannot learn the seed noise from
    them alone; and a validation set of n examples scores a network that is right on
    a share p of all images with an sd of sqrt(p (1 - p) / n), the part of a lucky
    run that does not carry over to the test set.
    """
    if not n_val or not values or not all(0.0 <= v <= 1.0 for v in values):
        return 0.0
    p = max(values)  # the noise where the choice is made
    return p * (1 - p) / n_val


def fit(
    trials: Sequence[FrozenTrial], space: Mapping[str, sp.Range], *, n_val: int | None = None
) -> Surrogate | None:
    """The model of the runs in ``trials`` over ``space``, or None with too little to fit.

    ``n_val``: the validation set's size, which bounds the fitted noise from below
    (:func:`noise_floor`).
    """
    params, values = observations(trials)
    if len(values) < MIN_RUNS or max(values) - min(values) <= 0 or not space:
        return None
    from sklearn.exceptions import ConvergenceWarning
    from sklearn.gaussian_process import GaussianProcessRegressor
    from sklearn.gaussian_process.kernels import ConstantKernel, Matern, WhiteKernel

    encode = encoder(space)
    X = np.array([encode(p) for p in params], dtype=float)
    y = np.array(values, dtype=float)
    d = X.shape[1]
    # normalize_y divides by the values' sd: the noise bounds are in that unit.
    floor = max(1e-4, noise_floor(values, n_val) / float(np.var(y)))
    # Length scales of at least a tenth of a range: a landscape of hyperparameters bends
    # slowly on these axes, and shorter ones would fit the noise of single runs.
    kernel = ConstantKernel(1.0, (1e-3, 1e3)) * Matern(
        length_scale=[0.3] * d, length_scale_bounds=(MIN_LENGTH_SCALE, 30.0), nu=2.5
    ) + WhiteKernel(max(0.1, floor), (floor, max(1.0, 2 * floor)))
    gp = GaussianProcessRegressor(kernel, normalize_y=True, n_restarts_optimizer=2, random_state=0)
    with warnings.catch_warnings():  # a bound reached is an answer here, not an error
        warnings.simplefilter("ignore", ConvergenceWarning)
        gp.fit(X, y)
    noise = float(gp.kernel_.k2.noise_level) * float(np.std(y)) ** 2  # normalize_y scales it
    return Surrogate(gp, encode, math.sqrt(noise), len(values))


@dataclass
class Ranked:
    """A configuration with the model's posterior mean and sd of its expected value."""

    config: Any  # search.sweep.replicates.Configuration
    mean: float
    sd: float


def rank(
    configs: Sequence[Any],
    trials: Sequence[FrozenTrial],
    space: Mapping[str, sp.Range],
    *,
    n_val: int | None = None,
    robust: bool = False,
    failures: Sequence[Mapping[str, Any]] = (),
    failure_space: Mapping[str, sp.Range] | None = None,
) -> tuple[list[Ranked], Surrogate | None]:
    """The configurations best first by the model's posterior mean (by their own means,
    with the standard error as sd, when there is no model); and the model. ``robust``:
    when a run diverged (``failures``: the parameters of every diverged run of the
    search, the coarse stage's included; by default those of ``trials``), the
    configurations whose posterior mean is within one run's seed noise of the best come
    first, the one furthest from the nearest diverged run first (distances in the unit
    cube of ``failure_space``, the coarse ranges; by default ``space``); each keeps its
    posterior mean, and the rest follow by it. A test seed moves a run by the seed noise,
    so these are alike in what they promise and differ in how close they sit to where
    training breaks down. With no run diverged, by the posterior mean alone (on a
    landscape without a cliff, keeping away from every slope gives up the best region
    when it is narrow or at a range's edge)."""
    model = fit(trials, space, n_val=n_val)
    if model is None:
        out = [Ranked(c, c.mean, c.sd / math.sqrt(c.n) if c.n > 1 else math.nan) for c in configs]
        score = [(0, r.mean) for r in out]
    else:
        points = [c.params for c in configs]
        mu, sd = model.predict(points)
        out = [Ranked(c, float(m), float(s)) for c, m, s in zip(configs, mu, sd, strict=True)]
        score = [(0, float(m)) for m in mu]
        broke = robust and (
            list(failures) or [dict(t.params) for t in trials if is_diverged(t) and t.params]
        )
        if broke:
            top = int(np.argmax(mu))
            encode = encoder(failure_space or space)
            F = np.array([encode(f) for f in broke], dtype=float)
            for i, p in enumerate(points):
                if mu[i] >= mu[top] - model.noise_sd:  # alike, one test seed apart
                    away = float(np.min(np.linalg.norm(F - np.array(encode(p)), axis=1)))
                    score[i] = (1, away)
    order = sorted(
        range(len(out)),
        key=lambda i: (score[i], out[i].config.n, -out[i].config.number),
        reverse=True,
    )
    return [out[i] for i in order], model


# ----------------------------------------------------------------------------- stopping

STOP_CANDIDATES = 2000  # random points where the bound looks for the best still possible
STOP_DELTA = 0.1  # the bound holds with probability 1 - delta (as Optuna's terminator)


def regret_bound(
    model: Surrogate,
    visited: Sequence[Mapping[str, Any]],
    space: Mapping[str, sp.Range],
    *,
    seed: int = 0,
) -> float:
    """How much better than the best configuration already run the best one anywhere in
    ``space`` can still be, by the model: the highest upper confidence bound over the
    space (random points and ``visited``) minus the highest lower confidence bound over
    ``visited`` (the runs' parameters).

    The bound of Makarova et al. (2022), which Optuna's terminator uses, with its beta:
    2 log(d t^2 pi^2 / (6 delta)) / 5 for d encoded dimensions and t runs. When it is
    below the seed noise of one run, no configuration left to find is expected to be
    told apart from the best one already run (:mod:`search.sweep.stopping`).
    """
    if not visited:
        return math.inf
    seen = np.array([model.encode(p) for p in visited], dtype=float)
    d, t = seen.shape[1], max(model.n_runs, 1)
    beta = 2.0 * math.log(max(d, 1) * t**2 * math.pi**2 / (6.0 * STOP_DELTA)) / 5.0
    z = math.sqrt(max(beta, 0.0))
    points = random_points(space, STOP_CANDIDATES, np.random.default_rng(seed))
    mu, sd = model.predict_encoded(np.vstack([points, seen]))
    mu_seen, sd_seen = mu[len(points) :], sd[len(points) :]
    return float(np.max(mu + z * sd) - np.max(mu_seen - z * sd_seen))
