"""The optimiser step: SGD with momentum, weight decay on W only, in one function.

On the cost J = mean cross-entropy + l2_lambda * sum of squared W (not biases, not
gamma or beta), with g = dJ/dP the true gradient of a parameter P (as
``Network.backward`` returns it: 2 * l2_lambda * W is part of each dW), one step is

    v <- rho v - eta g,   P <- P + v          (rho = 0: P <- P - eta g).

:func:`sgd_step` takes that step on one batch and computes the same numbers in
fewer passes over memory, which is its own business:

- eta is folded into dscores (every gradient is linear in dscores), so one
  (N, K) array is scaled instead of every (d_in, d_out) one;
- the first layer's W (3072 x 50 on CIFAR-10, nearly all of the parameters) is
  stepped by one gemm that accumulates into it, W1 <- (1 - 2 eta l2_lambda) W1 -
  X^T (eta dS1) (:func:`model.blas.gemm_update`), so its gradient is never stored
  and W1 is read and written once; with momentum the gemm accumulates into v1;
- every other parameter (the smaller W, every b, gamma and beta) is stepped by one
  call over the flat arrays of the network, and the decay of the smaller W by one
  more, whatever the depth.
"""

from __future__ import annotations

import numpy as np

from model import blas
from model.errors import UsageError
from model.network import Network


def init_velocity(net: Network) -> np.ndarray:
    """Zero momentum for ``net``, laid out like ``net.flat_params`` (every W, then
    every b, gamma and beta)."""
    return np.zeros_like(net.flat_params)


def sgd_step(
    net: Network,
    X: np.ndarray,
    y: np.ndarray,
    *,
    eta: float,
    l2_lambda: float = 0.0,
    rho: float = 0.0,
    velocity: np.ndarray | None = None,
) -> tuple[float, int]:
    """One step of SGD (with momentum ``rho`` > 0) on the cost for the batch X (N, d_in), y (N,).

    Updates ``net.params`` in place, folds the batch statistics into ``net.bn_state``
    and returns (loss, n_correct): the batch's mean cross-entropy before the step and
    how many of its samples the network classified right before the step (in
    training mode: batch norm on the batch's statistics). ``velocity`` (from
    :func:`init_velocity`) is needed when ``rho`` > 0 and is updated in place. A
    non-finite loss still takes the step: the caller stops training on it.
    """
    if rho and velocity is None:
        raise UsageError(f"rho={rho} needs a velocity; create one with init_velocity(net)")
    X = np.ascontiguousarray(X, dtype=net.dtype)
    loss, n_correct, dS1 = net.train_gradients(X, y, grad_scale=eta)
    # dS1 and flat_grads are eta times the true gradients of the loss.
    decay = 2.0 * eta * l2_lambda
    P, G = net.flat_params, net.flat_grads
    n1, n_w = net.n_first_weights, net.n_weights
    W1 = net.params["W1"]
    if velocity is None or not rho:
        blas.gemm_update(W1, X, dS1, alpha=-1.0, beta=1.0 - decay)
        if decay and n_w > n1:
            P[n1:n_w] *= 1.0 - decay
        P[n1:] -= G[n1:]
    else:
        blas.gemm_update(velocity[:n1].reshape(W1.shape), X, dS1, alpha=-1.0, beta=rho)
        v = velocity[n1:]
        v *= rho
        v -= G[n1:]
        if decay:
            # G's weights are spent: they hold decay * W for the subtraction.
            velocity[:n_w] -= np.multiply(P[:n_w], decay, out=G[:n_w])
        P += velocity
    net.fold_batch_stats()
    return loss, n_correct
