"""Numerical gradients by centred differences, compared with the analytic ones.

``python -m model.gradcheck --hidden 50,50 --bn`` prints, for each layer and
parameter, the relative error ||a - n|| / max(||a|| + ||n||, eps) over the whole
array (see :func:`relative_errors` for why not entry by entry), and exits 1 if
the largest is above 1e-6.
"""

from __future__ import annotations

import argparse
import re
from collections.abc import Sequence

import numpy as np

from model import layers
from model.errors import SettingError
from model.network import Network


def numerical_gradients(
    net: Network, X: np.ndarray, y: np.ndarray, *, l2_lambda: float, h: float = 1e-6
) -> dict[str, np.ndarray]:
    """Centred-difference gradients of the cost for every parameter (keys ``dW1``...).

    The five-point stencil (-f(x+2h) + 8f(x+h) - 8f(x-h) + f(x-2h)) / 12h has an
    truncation error of order h^4; with h = 1e-6 in float64 the rounding noise
    (about ulp(cost) / h) stays near 1e-10 and few perturbations cross a ReLU kink.

    Uses training-mode batch norm (batch statistics), like the analytic gradients;
    ``bn_state`` is not touched. Use a float64 network: float32 cannot resolve h.
    """

    def cost() -> float:
        # The forward pass only: the analytic gradients are not needed 4 times a parameter.
        scores, _ = net.forward(X, train=True)
        loss, _ = layers.softmax_cross_entropy(scores, y, need_grad=False)
        return loss + l2_lambda * net.l2_penalty()

    grads: dict[str, np.ndarray] = {}
    for key, P in net.params.items():
        g = np.zeros_like(P)
        flat_p, flat_g = P.reshape(-1), g.reshape(-1)
        for i in range(flat_p.size):
            old = flat_p[i]
            c = []
            for k in (2, 1, -1, -2):
                flat_p[i] = old + k * h
                c.append(cost())
            flat_p[i] = old
            flat_g[i] = (-c[0] + 8 * c[1] - 8 * c[2] + c[3]) / (12 * h)
        grads["d" + key] = g
    return grads


def relative_errors(
    analytic: dict[str, np.ndarray], numeric: dict[str, np.ndarray], *, eps: float = 1e-12
) -> dict[str, float]:
    """Relative error ||a - n|| / max(||a|| + ||n||, eps) per parameter (keys ``W1``...).

    Taken over the whole array rather than entry by entry: an entry whose true
    gradient is ~0 (a dead ReLU, a bias cancelled by batch norm) has only
    rounding noise of order ulp(cost) / h in its numerical gradient, and its
    entry-wise "relative error" would measure that noise, not the code.
    """
    out = {}
    for key, a in analytic.items():
        n = numeric[key]
        num = float(np.linalg.norm(a - n))
        den = max(float(np.linalg.norm(a) + np.linalg.norm(n)), eps)
        out[key[1:]] = num / den
    return out


def check_network(
    hidden: Sequence[int],
    *,
    batch_norm: bool,
    l2_lambda: float = 0.01,
    d_in: int = 20,
    n_samples: int = 10,
    n_classes: int = 10,
    seed: int = 0,
    h: float = 1e-6,
) -> dict[str, float]:
    """Relative errors for a float64 network on random data (small, so it is quick)."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n_samples, d_in))
    y = rng.integers(0, n_classes, size=n_samples)
    net = Network(d_in, hidden, n_classes, batch_norm=batch_norm, dtype=np.float64, seed=rng)
    # Random gamma/beta so the check does not sit on the special point gamma=1, beta=0.
    for key, P in net.params.items():
        if key.startswith(("gamma", "beta")):
            P[...] = rng.normal(1.0 if key.startswith("gamma") else 0.0, 0.3, P.shape)
    _, _, analytic = net.loss(X, y, l2_lambda=l2_lambda)
    analytic = {k: v.copy() for k, v in analytic.items()}
    numeric = numerical_gradients(net, X, y, l2_lambda=l2_lambda, h=h)
    return relative_errors(analytic, numeric)


def format_table(errors: dict[str, float]) -> str:
    """A table with one row per layer and one column per parameter kind."""
    kinds = ("W", "b", "gamma", "beta")
    layers = sorted({int(re.sub(r"^[a-zA-Z]+", "", k)) for k in errors})
    lines = [f"{'layer':>5} " + " ".join(f"{k:>10}" for k in kinds)]
    for l in layers:
        cells = [
            f"{errors[f'{k}{l}']:10.2e}" if f"{k}{l}" in errors else f"{'-':>10}" for k in kinds
        ]
        lines.append(f"{l:>5} " + " ".join(cells))
    return "\n".join(lines)


def main(argv: list[str] | None = None, *, prog: str = "python -m model.gradcheck") -> int:
    """The command line; ``prog`` is how it was started (``c2f gradcheck``), for --help."""
    p = argparse.ArgumentParser(
        prog=prog,
        description="Compare analytic and numerical gradients of a k-layer network.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--hidden", default="50,50", help="hidden sizes, e.g. 50 or 50,30,20")
    p.add_argument("--bn", action="store_true", help="with batch normalisation")
    p.add_argument("--lambda", dest="l2_lambda", type=float, default=0.01)
    p.add_argument("--d-in", type=int, default=20, help="input dimensions of the random data")
    p.add_argument("--samples", type=int, default=10)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    try:
        hidden = [int(s) for s in args.hidden.split(",") if s.strip()]
    except ValueError:
        p.error(f"--hidden takes sizes separated by commas, like 50,50; got {args.hidden!r}")
    if args.l2_lambda < 0:
        p.error(f"--lambda must be >= 0, got {args.l2_lambda}")
    # Batch norm over one sample normalises every unit to 0: both gradients are noise.
    least = 2 if args.bn else 1
    if args.samples < least:
        p.error(
            f"--samples must be >= {least}{' with --bn' if args.bn else ''}, got {args.samples}"
        )
    try:
        errors = check_network(
            hidden,
            batch_norm=args.bn,
            l2_lambda=args.l2_lambda,
            d_in=args.d_in,
            n_samples=args.samples,
            seed=args.seed,
        )
    except SettingError as exc:  # a size the network refuses: --hidden 0, --d-in 0
        p.error(str(exc))
    print(
        f"gradient check: {args.d_in}-{'-'.join(map(str, hidden))}-10"
        f"{' with BN' if args.bn else ''}, lambda={args.l2_lambda}, float64"
    )
    print(format_table(errors))
    worst = max(errors.values())
    print(f"max relative error {worst:.2e} ({'ok' if worst < 1e-6 else 'TOO LARGE'})")
    return 0 if worst < 1e-6 else 1


if __name__ == "__main__":
    raise SystemExit(main())
