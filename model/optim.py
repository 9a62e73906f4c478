"""The optimiser step: SGD with momentum, weight decay on W only, in one function.

On the cost J = mean cross-entropy + l2_lambda * sum of squared W (not biases, not
gamma or beta), with g = dJ/dP the true gradient of a parameter P (as
``Network.backward`` returns it: 2 * l2_lambda * W is part of each dW), one step is

    v <- rho v - eta g,   P <- P + v          (rho = 0: P <- P - eta g).

:func:`sgd_step` takes that step on one batch and computes the same numbers in
fewer passes over memory, which is its own business:

- eta is folded into dscores (every gradient is linear in dscores), so one
  (N, K) array is scaled instead of every (d_in, d_out) one;
- each weight is stepped by one BLAS gemm with beta, so dW is never stored:
  W <- (1 - 2 eta l2_lambda) W - X^T (eta dS) without momentum and
  v <- rho v - X^T (eta dS), then v <- v - 2 eta l2_lambda W, W <- W + v with it;
- every vector (b, gamma, beta) is stepped by one call over ``Network.vectors``.

SciPy's BLAS wrappers provide the gemm with beta when SciPy is installed (it is a
dependency of the project); without it the step falls back to NumPy with the
same result. It is imported with this module, not at the first step, so thread
limits set (``threadpoolctl``) after importing ``model`` cover its BLAS too.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, cast

import numpy as np

from model import layers
from model.network import Network

try:  # Optional: model/ needs NumPy only; SciPy saves a pass over each W.
    from scipy.linalg import blas as _scipy_blas
except ImportError:  # pragma: no cover - SciPy is installed with the project
    _scipy_blas = None


def init_velocity(net: Network) -> dict[str, np.ndarray]:
    """Zero momentum for ``net``: one array per weight (``W1, ...``) and ``vectors``
    for every b, gamma and beta (laid out like ``net.vectors``)."""
    velocity = {k: np.zeros_like(P) for k, P in net.params.items() if k.startswith("W")}
    velocity["vectors"] = np.zeros_like(net.vectors)
    return velocity


def sgd_step(
    net: Network,
    X: np.ndarray,
    y: np.ndarray,
    *,
    eta: float,
    l2_lambda: float = 0.0,
    rho: float = 0.0,
    velocity: dict[str, np.ndarray] | None = None,
) -> float:
    """One step of SGD (with momentum ``rho`` > 0) on the cost for the batch X (N, d_in), y (N,).

    Updates ``net.params`` in place, folds the batch statistics into ``net.bn_state``
    and returns the batch's mean cross-entropy before the step. ``velocity`` (from
    :func:`init_velocity`) is needed when ``rho`` > 0 and is updated in place. A
    non-finite loss still takes the step: the caller stops training on it.
    """
    if rho and velocity is None:
        raise ValueError(f"rho={rho} needs a velocity; create one with init_velocity(net)")
    scores, caches = net.forward(X, train=True, reuse_buffers=True)
    loss, dscores = layers.softmax_cross_entropy(scores, y, grad_scale=eta, overwrite=True)
    dscores = cast(np.ndarray, dscores)  # need_grad=True: never None
    decay = 2.0 * eta * l2_lambda
    params = net.params
    for l, X_l, dS in net.backprop(dscores, caches, reuse_buffers=True):
        # dS is eta times the true gradient: X_l^T dS is eta dW of the loss.
        key = f"W{l}"
        W = params[key]
        if velocity is None:
            _gemm_update(net, W, X_l, dS, beta=1.0 - decay)
        else:
            v = velocity[key]
            _gemm_update(net, v, X_l, dS, beta=rho)
            if decay:
                _axpy(net, -decay, W, v)
            W += v
    if velocity is None:
        net.vectors -= net.vector_grads
    else:
        v = velocity["vectors"]
        v *= rho
        v -= net.vector_grads
        net.vectors += v
    net.update_running_stats(caches)
    return loss


def _blas(dtype: np.dtype, name: str) -> Callable[..., Any] | None:
    if _scipy_blas is None or dtype not in _PREFIX:
        return None
    return getattr(_scipy_blas, _PREFIX[dtype] + name)


_PREFIX = {np.dtype(np.float32): "s", np.dtype(np.float64): "d"}


def _gemm_update(
    net: Network, C: np.ndarray, X: np.ndarray, dS: np.ndarray, *, beta: float
) -> None:
    """C <- beta C - X^T dS in place. C: (d, m) C-contiguous, X: (N, d), dS: (N, m)."""
    gemm = _blas(C.dtype, "gemm")
    if gemm is not None and C.flags.c_contiguous:
        # BLAS is column-major: there C (d, m) is C^T (m, d) = beta C^T - dS^T X.
        res = gemm(-1.0, dS.T, X.T, beta=beta, c=C.T, trans_b=1, overwrite_c=1)
        if not np.may_share_memory(res, C):  # pragma: no cover - f2py copied C
            C[...] = res.T
        return
    tmp = np.matmul(X.T, dS, out=net.buffer("gemm", C.shape))
    if beta != 1.0:
        C *= beta
    C -= tmp


def _axpy(net: Network, a: float, X: np.ndarray, Y: np.ndarray) -> None:
    """Y <- Y + a X in place, for two C-contiguous arrays of one shape."""
    axpy = _blas(Y.dtype, "axpy")
    if axpy is not None and X.flags.c_contiguous and Y.flags.c_contiguous:
        res = axpy(X.reshape(-1), Y.reshape(-1), a=a)
        if not np.may_share_memory(res, Y):  # pragma: no cover - f2py copied Y
            Y[...] = res.reshape(Y.shape)
        return
    Y += np.multiply(X, a, out=net.buffer("axpy", X.shape))
