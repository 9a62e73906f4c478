"""The optimiser step: SGD with momentum, weight decay on W only, in one function.

On the cost J = mean cross-entropy + l2_lambda * sum of squared W (not biases, not
gamma or beta), with g = dJ/dP the true gradient of a parameter P (as
``Network.backward`` returns it: 2 * l2_lambda * W is part of each dW), one step is

    v <- rho v - eta g,   P <- P + v          (rho = 0: P <- P - eta g).

:func:`sgd_step` takes that step on one batch and computes the same numbers in
fewer passes over memory, which is its own business:

- eta is folded into dscores (every gradient is linear in dscores), so one
  (N, K) array is scaled instead of every (d_in, d_out) one;
- the weight decay is applied to W itself, as W <- (1 - 2 eta l2_lambda) W - X^T (eta dS)
  without momentum and v <- rho v - X^T (eta dS) - 2 eta l2_lambda W, W <- W + v
  with it, so the true dW (data term plus 2 l2_lambda W) is never formed;
- every vector (b, gamma, beta) is stepped by one call over ``Network.vectors``.

Measured against a BLAS gemm with beta (SciPy's ``sgemm`` with ``overwrite_c``, the
fused W <- (1 - 2 eta l2_lambda) W - X^T (eta dS)): on this project's machine
SciPy's OpenBLAS was 5-15% slower than NumPy's for these shapes, more than the two
passes it saves (W is in cache right after the gemm: about 20 us a step for
3072 x 50), and a second BLAS thread pool competes with NumPy's whenever more than
one thread is allowed. So the weight step is NumPy's matmul into a kept buffer
followed by the decay and the subtraction in place, with no temporaries.
"""

from __future__ import annotations

from typing import cast

import numpy as np

from model import layers
from model.network import Network


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
            _weight_step(net, W, X_l, dS, decay=decay, buffer="d" + key)
        else:
            v = velocity[key]
            _momentum_step(net, W, v, X_l, dS, rho=rho, decay=decay, buffer="d" + key)
    if velocity is None:
        net.vectors -= net.vector_grads
    else:
        v = velocity["vectors"]
        v *= rho
        v -= net.vector_grads
        net.vectors += v
    net.update_running_stats(caches)
    return loss


def _weight_step(
    net: Network, W: np.ndarray, X: np.ndarray, dS: np.ndarray, *, decay: float, buffer: str
) -> None:
    """W <- (1 - decay) W - X^T dS in place. W: (d, m), X: (N, d), dS: (N, m) (eta in dS).

    X^T dS goes into the network's kept array ``buffer`` (one per layer: a fresh
    3072 x 50 array on every step would cost more than the passes over it)."""
    dW = np.matmul(X.T, dS, out=net.buffer(buffer, W.shape))
    if decay:
        W *= 1.0 - decay
    W -= dW


def _momentum_step(
    net: Network,
    W: np.ndarray,
    v: np.ndarray,
    X: np.ndarray,
    dS: np.ndarray,
    *,
    rho: float,
    decay: float,
    buffer: str,
) -> None:
    """v <- rho v - X^T dS - decay W, W <- W + v in place (eta in dS and in decay)."""
    dW = np.matmul(X.T, dS, out=net.buffer(buffer, W.shape))
    v *= rho
    v -= dW
    if decay:
        v -= np.multiply(W, decay, out=dW)
    W += v
