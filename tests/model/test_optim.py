import numpy as np
import pytest

from model import blas, layers, optim
from model.network import Network

SHAPES = [([], False), ([16, 8], False), ([16, 8], True), ([12, 10, 8, 6], True)]
GEMMS = ["blas", "numpy"]


def textbook_step(net, X, y, *, eta, l2_lambda, rho, v):
    """v <- rho v - eta g, P <- P + v with g the true gradient of the cost (Network.backward)."""
    _, _, grads = net.loss(X, y, l2_lambda=l2_lambda)
    for k, P in net.params.items():
        v[k] = rho * v[k] - eta * grads["d" + k]
        P += v[k]


@pytest.fixture(params=GEMMS)
def gemm(request, monkeypatch):
    """Each test of the step runs with NumPy's BLAS gemm and with the NumPy fallback."""
    if request.param == "numpy":
        monkeypatch.setattr(blas, "_GEMM", {})
    elif not blas.AVAILABLE:  # pragma: no cover - NumPy built on another BLAS
        pytest.skip("NumPy's BLAS has no scipy_cblas_?gemm64_")
    return request.param


@pytest.mark.parametrize("rho", [0.0, 0.9])
@pytest.mark.parametrize("hidden,bn", SHAPES)
def test_fused_step_is_the_textbook_step(rng, hidden, bn, rho, gemm):
    """The fused step (eta in dscores, the gemm into W1, one call for the rest) is SGD."""
    net = Network(20, hidden, 5, batch_norm=bn, dtype=np.float64, seed=3)
    ref = Network(20, hidden, 5, batch_norm=bn, dtype=np.float64, seed=3)
    velocity = optim.init_velocity(net) if rho else None
    v = {k: np.zeros_like(P) for k, P in ref.params.items()}
    for step in range(4):
        X, y = rng.standard_normal((30, 20)), rng.integers(0, 5, 30)
        eta = 0.1 / (step + 1)
        loss, n_correct = optim.sgd_step(
            net, X, y, eta=eta, l2_lambda=0.05, rho=rho, velocity=velocity
        )
        assert loss == pytest.approx(ref.loss(X, y)[0], rel=1e-12)
        assert n_correct == np.count_nonzero(ref.forward(X, train=True)[0].argmax(axis=1) == y)
        ref.update_running_stats(ref.forward(X, train=True)[1])  # statistics before the step
        textbook_step(ref, X, y, eta=eta, l2_lambda=0.05, rho=rho, v=v)
    for k in ref.params:
        np.testing.assert_allclose(net.params[k], ref.params[k], rtol=0, atol=1e-12, err_msg=k)
    for k in ref.bn_state:
        np.testing.assert_allclose(net.bn_state[k], ref.bn_state[k], rtol=0, atol=1e-12)
    # The step moved every parameter: the comparison above is not of two untouched nets.
    fresh = Network(20, hidden, 5, batch_norm=bn, dtype=np.float64, seed=3)
    assert all(not np.allclose(net.params[k], fresh.params[k]) for k in ref.params)


def test_fused_step_updates_weights_in_place(rng):
    net = Network(20, [8], 3, seed=0)
    arrays = {k: P for k, P in net.params.items()}
    X, y = rng.standard_normal((10, 20)).astype(np.float32), rng.integers(0, 3, 10)
    optim.sgd_step(net, X, y, eta=0.1, l2_lambda=0.01)
    assert all(net.params[k] is P for k, P in arrays.items())
    # Views into one flat array: the optimiser steps all but W1 with one call.
    assert all(P.base is net.flat_params for P in net.params.values())


def test_momentum_needs_a_velocity(rng):
    net = Network(4, [3], 2)
    X, y = rng.standard_normal((5, 4)).astype(np.float32), rng.integers(0, 2, 5)
    with pytest.raises(ValueError, match="init_velocity"):
        optim.sgd_step(net, X, y, eta=0.1, rho=0.9)


def test_weight_decay_is_on_weights_only(rng):
    """The L2 term adds 2 lambda W to each dW and nothing to b, gamma or beta."""
    net = Network(6, [4], 3, batch_norm=True, dtype=np.float64, seed=rng)
    X, y = rng.standard_normal((8, 6)), rng.integers(0, 3, 8)
    _, _, grads = net.loss(X, y, l2_lambda=0.0)
    _, _, grads_l2 = net.loss(X, y, l2_lambda=0.5)
    for k, P in net.params.items():
        extra = grads_l2["d" + k] - grads["d" + k]
        expected = 2 * 0.5 * P if k.startswith("W") else np.zeros_like(P)
        np.testing.assert_allclose(extra, expected, atol=1e-12, err_msg=k)


def test_softmax_gradient_is_scaled_and_written_in_place(rng):
    scores = rng.standard_normal((6, 4))
    y = rng.integers(0, 4, 6)
    loss, d = layers.softmax_cross_entropy(scores, y)
    p = np.exp(scores) / np.exp(scores).sum(axis=1, keepdims=True)
    assert loss == pytest.approx(-np.log(p[np.arange(6), y]).mean())
    np.testing.assert_allclose(d, (p - np.eye(4)[y]) / 6)
    copy = scores.copy()
    loss2, d2 = layers.softmax_cross_entropy(copy, y, grad_scale=0.3, overwrite=True)
    assert d2 is copy and loss2 == pytest.approx(loss)
    np.testing.assert_allclose(d2, 0.3 * d)


def test_batchnorm_backward_matches_numerical(rng):
    """The layer alone: d/dS, d/dgamma, d/dbeta of sum(dout * BN(S)) by centred differences."""
    S, dout = rng.standard_normal((7, 5)), rng.standard_normal((7, 5))
    gamma, beta = rng.normal(1, 0.3, 5), rng.normal(0, 0.3, 5)
    kw = {"train": True, "running_mean": np.zeros(5), "running_var": np.ones(5)}

    def f(S, gamma, beta):
        return float((dout * layers.batchnorm_forward(S, gamma, beta, **kw)[0]).sum())

    _, cache = layers.batchnorm_forward(S, gamma, beta, **kw)
    dS, dgamma, dbeta = layers.batchnorm_backward(dout.copy(), cache)
    for arr, grad in ((S, dS), (gamma, dgamma), (beta, dbeta)):
        num = np.zeros_like(arr)
        for i in np.ndindex(arr.shape):
            old = arr[i]
            arr[i] = old + 1e-6
            hi = f(S, gamma, beta)
            arr[i] = old - 1e-6
            lo = f(S, gamma, beta)
            arr[i] = old
            num[i] = (hi - lo) / 2e-6
        np.testing.assert_allclose(grad, num, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("alpha,beta", [(-1.0, 0.999), (-1.0, 1.0), (0.5, 0.0), (2.0, 0.9)])
def test_gemm_update_is_alpha_at_b_plus_beta_c(rng, gemm, dtype, alpha, beta):
    A = rng.standard_normal((30, 12)).astype(dtype)
    B = rng.standard_normal((30, 7)).astype(dtype)
    C = rng.standard_normal((12, 7)).astype(dtype)
    expected = alpha * (A.astype(np.float64).T @ B) + beta * C
    target = C
    blas.gemm_update(C, A, B, alpha=alpha, beta=beta)
    assert C is target  # in place
    tol = 1e-12 if dtype == np.float64 else 1e-4
    np.testing.assert_allclose(C, expected, rtol=0, atol=tol)


def test_gemm_update_refuses_what_blas_would_misread(rng):
    A, B = rng.standard_normal((6, 4)), rng.standard_normal((6, 3))
    with pytest.raises(ValueError, match="contiguous"):
        blas.gemm_update(np.zeros((3, 4)).T, A, B, alpha=1.0, beta=0.0)
    with pytest.raises(ValueError, match="shapes"):
        blas.gemm_update(np.zeros((3, 4)), A, B, alpha=1.0, beta=0.0)
    with pytest.raises(ValueError, match="dtype"):
        blas.gemm_update(np.zeros((4, 3), np.float32), A, B, alpha=1.0, beta=0.0)


@pytest.mark.parametrize("rho", [0.0, 0.9])
def test_blas_and_numpy_steps_give_the_same_weights(rng, monkeypatch, rho):
    """The gemm into W1 and the three NumPy passes it replaces agree in float64."""
    if not blas.AVAILABLE:  # pragma: no cover - NumPy built on another BLAS
        pytest.skip("NumPy's BLAS has no scipy_cblas_?gemm64_")
    nets = [Network(40, [10, 6], 4, batch_norm=True, dtype=np.float64, seed=5) for _ in "ab"]
    velocities = [optim.init_velocity(n) for n in nets]
    batches = [(rng.standard_normal((25, 40)), rng.integers(0, 4, 25)) for _ in range(3)]
    for i, (net, v) in enumerate(zip(nets, velocities, strict=True)):
        if i:
            monkeypatch.setattr(blas, "_GEMM", {})
        for X, y in batches:
            optim.sgd_step(net, X, y, eta=0.05, l2_lambda=0.01, rho=rho, velocity=v)
    np.testing.assert_allclose(nets[0].flat_params, nets[1].flat_params, rtol=0, atol=1e-12)
