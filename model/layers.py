"""Layers as forward/backward pairs (samples x features).

Every ``*_forward`` returns ``(out, cache)`` and every ``*_backward`` takes the
upstream gradient and that cache, so each layer can be gradient-checked alone.
``out=`` arguments let the trainer reuse preallocated buffers: a batch of
100 x 3072 float32 is above glibc's mmap threshold, and allocating it afresh on
every step costs more than the arithmetic of the small layers.
"""

from __future__ import annotations

import functools

import numpy as np

BN_EPS = 1e-5


def affine_forward(
    X: np.ndarray, W: np.ndarray, b: np.ndarray | None, *, out: np.ndarray | None = None
) -> tuple[np.ndarray, tuple]:
    """S = X W + b.

    X: (N, d_in), W: (d_in, d_out), b: (d_out,) or None (a layer followed by batch
    norm has no bias: beta does its job). Returns S: (N, d_out).
    """
    S = np.matmul(X, W, out=out)
    if b is not None:
        S += b
    return S, (X, W, b is not None)


def affine_backward(
    dS: np.ndarray,
    cache: tuple,
    *,
    need_dX: bool = True,
    need_dW: bool = True,
    dX_out: np.ndarray | None = None,
    dW_out: np.ndarray | None = None,
    db_out: np.ndarray | None = None,
) -> tuple[np.ndarray | None, np.ndarray | None, np.ndarray | None]:
    """Gradients of S = X W + b: dX = dS W^T (N, d_in), dW = X^T dS (d_in, d_out), db (d_out,).

    dS: (N, d_out). dX is None without ``need_dX``, dW None without ``need_dW``, db
    None for a layer without bias. The first layer needs no dX; skipping it saves a
    third of its work, which is almost all of the network's work on CIFAR-10. An
    optimiser that folds dW into its step (see ``model.optim``) asks for no dW.
    """
    X, W, has_bias = cache
    dW = np.matmul(X.T, dS, out=dW_out) if need_dW else None
    # A sum over rows as a matrix-vector product: several times faster than .sum(axis=0).
    db = np.dot(_ones(dS.shape[0], dS.dtype), dS, out=db_out) if has_bias else None
    dX = np.matmul(dS, W.T, out=dX_out) if need_dX else None
    return dX, dW, db


@functools.lru_cache(maxsize=64)
def _ones(n: int, dtype: np.dtype) -> np.ndarray:
    """A read-only vector of n ones: ``_ones(N, dtype) @ A`` sums the N rows of A (N, m)."""
    ones = np.ones(n, dtype=dtype)
    ones.flags.writeable = False
    return ones


def relu_forward(S: np.ndarray, *, out: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
    """H = max(S, 0). S and H: (N, m). The cache is H itself."""
    H = np.maximum(S, 0, out=out)
    return H, H


def relu_backward(
    dH: np.ndarray,
    cache: np.ndarray,
    *,
    inplace: bool = False,
    mask_out: np.ndarray | None = None,
) -> np.ndarray:
    """dS = dH where the unit was active, else 0. ``inplace`` overwrites dH;
    ``mask_out`` (N, m) bool receives the mask instead of a fresh array."""
    H = cache
    # A multiply by the mask is several times faster than dH[H <= 0] = 0 on small arrays.
    # 0.0, not 0: a float scalar halves the cost of the comparison on small arrays.
    return np.multiply(dH, np.greater(H, 0.0, out=mask_out), out=dH if inplace else None)


def batchnorm_forward(
    S: np.ndarray,
    gamma: np.ndarray,
    beta: np.ndarray,
    *,
    train: bool,
    running_mean: np.ndarray,
    running_var: np.ndarray,
    eps: float = BN_EPS,
    out: np.ndarray | None = None,
    C_out: np.ndarray | None = None,
    mu_out: np.ndarray | None = None,
    var_out: np.ndarray | None = None,
) -> tuple[np.ndarray, tuple]:
    """Batch normalisation of S (N, m) followed by the scale gamma (m,) and shift beta (m,).

    Out = gamma (S - mu) / sigma + beta with sigma = sqrt(var + eps). In training the
    batch's mean and (biased) variance are used and returned in the cache as
    ``cache[-2:]`` (written into ``mu_out`` and ``var_out`` (m,) when given) so the
    caller can update its running averages; at evaluation time ``running_mean`` and
    ``running_var`` are used. Nothing here mutates state, so the same forward pass can
    be repeated for a gradient check. ``out`` (N, m) receives the result and may be S
    itself. In training ``C_out`` (N, m) receives the centred S - mu, kept in the cache
    for backward, and must not be ``out``; at evaluation time nothing is kept (the
    cache is empty) and ``C_out`` is not used.
    """
    n = S.shape[0]
    if not train:
        res = np.subtract(S, running_mean, out=out)
        res *= gamma / np.sqrt(running_var + eps)
        res += beta
        return res, ()
    mean_row = _mean_row(n, S.dtype)
    mu = np.dot(mean_row, S, out=mu_out)
    C = np.subtract(S, mu, out=C_out)
    # The squares go where the result will be: S is no longer needed.
    var = np.dot(mean_row, np.multiply(C, C, out=out), out=var_out)
    sigma = np.sqrt(var + eps)
    a = gamma / sigma
    res = np.multiply(C, a, out=out)
    res += beta
    return res, (C, a, sigma, mu, var)


@functools.lru_cache(maxsize=64)
def _mean_row(n: int, dtype: np.dtype) -> np.ndarray:
    """A read-only vector of n entries 1/n: ``_mean_row(N, dtype) @ A`` is the row mean of A."""
    row = np.full(n, 1.0 / n, dtype=dtype)
    row.flags.writeable = False
    return row


def batchnorm_backward(
    dout: np.ndarray,
    cache: tuple,
    *,
    out: np.ndarray | None = None,
    dgamma_out: np.ndarray | None = None,
    dbeta_out: np.ndarray | None = None,
    work: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Gradients of batch norm in training mode: dS (N, m), dgamma (m,), dbeta (m,).

    With C = S - mu, S_hat = C / sigma over a batch of N and g = dL/dS_hat = dout * gamma,
    dL/dS = (1 / (N sigma)) (N g - sum_i g_i - S_hat sum_i g_i * S_hat_i),
    the closed form of DD2424's BatchNormBackPass. Since dbeta = sum_i dout_i and
    dgamma = sum_i dout_i * S_hat_i, this is, with a = gamma / sigma,
    dL/dS = a (dout - dbeta / N - C dgamma / (N sigma)), computed in ``out`` (which
    may be dout itself). ``dgamma_out`` and ``dbeta_out`` (m,) receive those, and
    ``work`` (N, m) is scratch (a fresh array without it).
    """
    C, a, sigma = cache[0], cache[1], cache[2]
    n = dout.shape[0]
    ones = _ones(n, dout.dtype)
    dbeta = np.dot(ones, dout, out=dbeta_out)
    prod = np.multiply(dout, C, out=work)
    dgamma = np.dot(ones, prod, out=dgamma_out)
    dgamma /= sigma
    np.multiply(C, dgamma / (n * sigma), out=prod)
    dS = np.subtract(dout, prod, out=out)
    dS -= dbeta / n
    dS *= a
    return dS, dgamma, dbeta


def softmax_cross_entropy(
    scores: np.ndarray,
    y: np.ndarray,
    *,
    need_grad: bool = True,
    grad_scale: float = 1.0,
    overwrite: bool = False,
    argmax: np.ndarray | None = None,
) -> tuple[float, np.ndarray | None]:
    """Mean cross-entropy of softmax(scores) against integer labels, and its gradient.

    scores: (N, K), y: (N,) ints in [0, K). Returns (loss, dscores (N, K) or None):
    dscores = grad_scale * (softmax(scores) - onehot(y)) / N, the gradient of the
    mean loss times ``grad_scale`` (an optimiser folds its learning rate in here:
    every gradient of the network is linear in dscores). With ``overwrite`` dscores
    is written over ``scores``; otherwise ``scores`` is not modified. ``argmax``
    (N,) is ``scores.argmax(axis=1)`` when the caller has it already (the training
    pass counts the batch's correct predictions with it).
    """
    n, k = scores.shape
    starts = _row_starts(n, k)
    flat_y = np.add(starts, y)
    # The row maxima picked by argmax: the same numbers as np.max(scores, axis=1),
    # which on 10 columns is several times slower (its loop runs once per row).
    if argmax is None:
        argmax = scores.argmax(axis=1)
    top = scores.reshape(-1)[np.add(starts, argmax)]
    inplace = overwrite and scores.flags.c_contiguous
    shifted = np.subtract(scores, top[:, None], out=scores if inplace else None)
    # log p_y = s_y - max - log(sum exp): stable even when p_y underflows to 0.
    log_p = shifted.reshape(-1)[flat_y]
    np.exp(shifted, out=shifted)
    # Row sums as a matrix-vector product: several times faster than .sum(axis=1).
    sums = np.dot(shifted, _ones(k, shifted.dtype))
    log_p -= np.log(sums)
    # The ufunc itself: .sum() adds a Python wrapper, a fifth of the call on 100 values.
    loss = -float(np.add.reduce(log_p, dtype=np.float64)) / n
    if not need_grad:
        return loss, None
    coef = grad_scale / n
    np.divide(coef, sums, out=sums)
    shifted *= sums[:, None]
    shifted.reshape(-1)[flat_y] -= coef
    return loss, shifted


@functools.lru_cache(maxsize=64)
def _row_starts(n: int, k: int) -> np.ndarray:
    """Flat index of the first entry of each row of an (n, k) array; add y to pick (i, y_i)."""
    starts = np.arange(0, n * k, k)
    starts.flags.writeable = False
    return starts
