"""A two-layer network written the way a DD2424 assignment-2 report writes it.

Plain NumPy in a file of its own; nothing of coarse2fine is imported. The
shapes are the course's: X is d x N (one image per column), Y is K x N one-hot,
y holds the N labels, W1 is m x d, W2 is K x m, b1 is m x 1, b2 is K x 1.
Mini-batch gradient descent with a cyclical learning rate (Smith 2015).

coarse2fine calls one function, :func:`train` at the bottom, as the study file
says (``[model] train = "my_net.py:train"``, ``layout = "d_by_n"``). Run this
file alone (``python my_net.py``) for the gradient check.
"""

import numpy as np


def InitializeParameters(d, m, K, rng, dtype=np.float32):
    """W1 (m, d), W2 (K, m) with std 1/sqrt(fan-in); zero biases."""
    W1 = (rng.standard_normal((m, d)) / np.sqrt(d)).astype(dtype)
    W2 = (rng.standard_normal((K, m)) / np.sqrt(m)).astype(dtype)
    b1 = np.zeros((m, 1), dtype=dtype)
    b2 = np.zeros((K, 1), dtype=dtype)
    return [W1, W2], [b1, b2]


def EvaluateClassifier(X, W, b):
    """H = max(0, W1 X + b1) (m, N); P = softmax(W2 H + b2) (K, N)."""
    H = np.maximum(0, W[0] @ X + b[0])
    S = W[1] @ H + b[1]
    S = S - S.max(axis=0)  # the same softmax, without overflow
    P = np.exp(S)
    P /= P.sum(axis=0)
    return H, P


def ComputeCost(X, Y, W, b, lam):
    """(loss, cost): mean cross-entropy, and loss + lam * (||W1||^2 + ||W2||^2)."""
    _, P = EvaluateClassifier(X, W, b)
    with np.errstate(divide="ignore"):  # a diverged network: loss inf, not a warning
        loss = float(-np.sum(np.log(np.sum(Y * P, axis=0))) / X.shape[1])
    cost = loss + lam * float(sum(np.sum(Wl * Wl) for Wl in W))
    return loss, cost


def ComputeAccuracy(X, y, W, b):
    _, P = EvaluateClassifier(X, W, b)
    return float(np.mean(np.argmax(P, axis=0) == y))


def ComputeGradients(X, Y, H, P, W, lam):
    """Gradients of the cost for the batch X (d, n), Y (K, n) from the forward pass H, P."""
    n = X.shape[1]
    G = P - Y
    grad_W2 = G @ H.T / n + 2 * lam * W[1]
    grad_b2 = G.sum(axis=1, keepdims=True) / n
    G = W[1].T @ G
    G = G * (H > 0)
    grad_W1 = G @ X.T / n + 2 * lam * W[0]
    grad_b1 = G.sum(axis=1, keepdims=True) / n
    return [grad_W1, grad_W2], [grad_b1, grad_b2]


def CyclicalEta(t, eta_min, eta_max, n_s):
    """The triangular learning rate at update step t (half-cycle n_s steps)."""
    t = t % (2 * n_s)
    if t < n_s:
        return eta_min + t / n_s * (eta_max - eta_min)
    return eta_max - (t - n_s) / n_s * (eta_max - eta_min)


def MiniBatchGD(X, Y, GDparams, W, b, lam, rng, on_evaluate):
    """Mini-batch GD, reshuffled each epoch; ``on_evaluate(t, W, b)`` every ``eval_every``
    update steps and at the last one. Returns the trained W, b."""
    n = X.shape[1]
    n_batch = GDparams["n_batch"]
    steps_per_epoch = n // n_batch
    order = None
    for t in range(GDparams["total_steps"]):
        if t % steps_per_epoch == 0:
            order = rng.permutation(n)
        j = order[(t % steps_per_epoch) * n_batch : (t % steps_per_epoch + 1) * n_batch]
        Xb, Yb = X[:, j], Y[:, j]
        H, P = EvaluateClassifier(Xb, W, b)
        grad_W, grad_b = ComputeGradients(Xb, Yb, H, P, W, lam)
        eta = CyclicalEta(t, GDparams["eta_min"], GDparams["eta_max"], GDparams["n_s"])
        W = [Wl - eta * gl for Wl, gl in zip(W, grad_W, strict=True)]
        b = [bl - eta * gl for bl, gl in zip(b, grad_b, strict=True)]
        if (t + 1) % GDparams["eval_every"] == 0 or t + 1 == GDparams["total_steps"]:
            on_evaluate(t + 1, W, b)
    return W, b


def train(hp, data, report):
    """What coarse2fine calls: train with ``hp``, report each evaluation, return the result.

    ``report`` raises optuna.TrialPruned when the search stops this run early;
    nothing here catches it.
    """
    rng = np.random.default_rng(hp["seed"])
    X, Y = data.train.X, data.train.Y
    Xv, Yv, yv = data.val.X, data.val.Y, data.val.y
    lam = hp["l2_lambda"]
    # float32 like X: float64 weights would make NumPy convert X to float64 at every product.
    W, b = InitializeParameters(X.shape[0], hp["n_hidden"], Y.shape[0], rng)
    # Training cost on the first train_eval_size images only, if the study says so.
    m = hp.get("train_eval_size") or X.shape[1]
    GDparams = {
        "n_batch": hp["batch_size"],
        "eta_min": hp["eta_min"],
        "eta_max": hp["eta_max"],
        "n_s": hp["n_s"],
        "total_steps": hp["total_steps"],
        "eval_every": hp["eval_every"],
    }

    def on_evaluate(t, W, b):
        train_loss, train_cost = ComputeCost(X[:, :m], Y[:, :m], W, b, lam)
        val_loss, val_cost = ComputeCost(Xv, Yv, W, b, lam)
        report(
            t,
            ComputeAccuracy(Xv, yv, W, b),
            train_loss=train_loss,
            train_cost=train_cost,
            val_loss=val_loss,
            val_cost=val_cost,
            train_acc=ComputeAccuracy(X[:, :m], data.train.y[:m], W, b),
        )

    W, b = MiniBatchGD(X, Y, GDparams, W, b, lam, rng, on_evaluate)
    result = {"val_acc": ComputeAccuracy(Xv, yv, W, b)}
    if data.test is not None:  # the final run: the test set, once, at the end
        result["test_acc"] = ComputeAccuracy(data.test.X, data.test.y, W, b)
        result["test_loss"] = ComputeCost(data.test.X, data.test.Y, W, b, lam)[0]
    return result


def ComputeGradsNumSlow(X, Y, W, b, lam, h=1e-5):
    """Centred differences of the cost, one entry at a time (for small problems)."""
    grads = []
    for params in (W, b):
        for p in params:
            g = np.zeros_like(p)
            for i in np.ndindex(p.shape):
                old = p[i]
                p[i] = old - h
                c1 = ComputeCost(X, Y, W, b, lam)[1]
                p[i] = old + h
                c2 = ComputeCost(X, Y, W, b, lam)[1]
                p[i] = old
                g[i] = (c2 - c1) / (2 * h)
            grads.append(g)
    return grads


def gradcheck():
    """Analytic against numerical gradients on a small random problem (float64):
    {parameter: max relative error}. The service's report shows it (report --all)."""
    rng = np.random.default_rng(0)
    d, m, K, n = 20, 10, 5, 8
    X = rng.standard_normal((d, n))
    y = rng.integers(0, K, n)
    Y = np.eye(K)[:, y]
    W, b = InitializeParameters(d, m, K, rng, dtype=np.float64)
    H, P = EvaluateClassifier(X, W, b)
    grad_W, grad_b = ComputeGradients(X, Y, H, P, W, 0.01)
    analytic = grad_W + grad_b
    numeric = ComputeGradsNumSlow(X, Y, W, b, 0.01)
    errors = {}
    for name, ga, gn in zip(("W1", "W2", "b1", "b2"), analytic, numeric, strict=True):
        errors[name] = float(
            np.abs(ga - gn).max() / max(1e-12, np.abs(ga).max() + np.abs(gn).max())
        )
    return errors


if __name__ == "__main__":
    for name, rel in gradcheck().items():
        print(f"{name}: max relative error {rel:.2e}")
