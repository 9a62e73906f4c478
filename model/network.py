"""The k-layer perceptron: parameters, forward with caches, backward, batch norm, L2 cost.

Cost = mean cross-entropy + l2_lambda * sum of squared weights (W only: not the
biases, not gamma or beta), as in DD2424. Arrays are samples x features.

Parameters live in a flat dict ``params`` (``W1, b1, gamma1, beta1, ..., WL, bL``)
and their gradients in a dict with the same keys prefixed by ``d``. Batch-norm
running statistics live apart in ``bn_state`` (``mean1, var1, ...``): they are
not trained. A layer followed by batch norm has no bias, since the mean
subtraction cancels it and beta takes its place; the last layer always has one.

The vectors (every b, gamma and beta) are views into one flat array
``Network.vectors``, and the running statistics views into one flat array too, so
an optimiser steps all the vectors, and a training step folds in all the batch
statistics, with one call each whatever the depth. Update them in place
(``params[k][...] = ...``), never by assigning a new array to the key.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np

from model import layers

INITS = ("he", "xavier", "sigma")


class _Buffers:
    """Arrays reused from one training step to the next, keyed by name."""

    def __init__(self) -> None:
        self._arrays: dict[str, np.ndarray] = {}

    def get(self, name: str, shape: tuple[int, ...], dtype: np.dtype) -> np.ndarray:
        arr = self._arrays.get(name)
        if arr is None or arr.shape != shape or arr.dtype != dtype:
            arr = np.empty(shape, dtype=dtype)
            self._arrays[name] = arr
        return arr


class Network:
    """A fully connected ReLU network with optional batch norm before each ReLU.

    ``Network(3072, [50, 50], 10, batch_norm=True)`` builds 3072-50-50-10.
    ``init`` is "he" (normal with variance 2/d_in, the default), "xavier"
    (variance 1/d_in) or "sigma" (normal(0, sigma^2) with the given ``sigma``).
    ``bn_alpha`` weighs the old value in the running averages:
    ``mean = alpha * mean + (1 - alpha) * batch_mean``.
    """

    def __init__(
        self,
        d_in: int,
        hidden: Sequence[int],
        n_classes: int = 10,
        *,
        batch_norm: bool = False,
        init: str = "he",
        sigma: float | None = None,
        bn_alpha: float = 0.9,
        dtype: Any = np.float32,
        seed: int | np.random.Generator = 0,
    ) -> None:
        hidden = [int(h) for h in hidden]
        if d_in < 1:
            raise ValueError(f"d_in must be >= 1, got {d_in=}")
        if n_classes < 2:
            raise ValueError(f"n_classes must be >= 2, got {n_classes=}")
        if any(h < 1 for h in hidden):
            raise ValueError(f"hidden sizes must all be >= 1, got {hidden=}")
        if init not in INITS:
            raise ValueError(f"init must be one of {INITS}, got {init=}")
        if init == "sigma" and (sigma is None or not sigma > 0):
            raise ValueError(f"init='sigma' needs sigma > 0, got {sigma=}")
        if not 0.0 <= bn_alpha < 1.0:
            raise ValueError(f"bn_alpha must be in [0, 1), got {bn_alpha=}")
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise ValueError(f"dtype must be float32 or float64, got {dtype=}")
        self.d_in = int(d_in)
        self.hidden = tuple(hidden)
        self.n_classes = int(n_classes)
        self.batch_norm = bool(batch_norm)
        self.init = init
        self.sigma = sigma
        self.bn_alpha = float(bn_alpha)
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        sizes = [self.d_in, *self.hidden, self.n_classes]
        n_vec = sum(2 * m if self._has_bn(l) else m for l, m in enumerate(sizes[1:], 1))
        n_bn = sum(2 * m for l, m in enumerate(sizes[1:], 1) if self._has_bn(l))
        self.vectors = np.zeros(n_vec, dtype=self.dtype)
        self.vector_grads = np.zeros(n_vec, dtype=self.dtype)
        self._bn_flat = np.zeros(n_bn, dtype=self.dtype)
        self._batch_stats = np.zeros(n_bn, dtype=self.dtype)
        self.params: dict[str, np.ndarray] = {}
        self.bn_state: dict[str, np.ndarray] = {}
        self._vector_grad_views: dict[str, np.ndarray] = {}
        # Per layer: (W, b, gamma, beta, mean, var) keys and the views that the
        # training pass writes its batch statistics and vector gradients into.
        self._layer_keys: list[tuple[str, ...]] = [()]
        self._stat_views: list[tuple[np.ndarray, np.ndarray] | None] = [None]
        self._grad_views: list[tuple[np.ndarray, ...]] = [()]
        vec_at = bn_at = 0
        for l in range(1, len(sizes)):
            fan_in, fan_out = sizes[l - 1], sizes[l]
            # Never None: init="sigma" with sigma=None was refused above.
            std = cast(
                float,
                {"he": np.sqrt(2.0 / fan_in), "xavier": np.sqrt(1.0 / fan_in)}.get(init, sigma),
            )
            # Drawn in float64 so float32 and float64 networks of one seed match.
            W = rng.standard_normal((fan_in, fan_out)) * std
            self.params[f"W{l}"] = W.astype(self.dtype)
            names = ("gamma", "beta") if self._has_bn(l) else ("b",)
            for name in names:
                key = f"{name}{l}"
                self.params[key] = self.vectors[vec_at : vec_at + fan_out]
                self._vector_grad_views[key] = self.vector_grads[vec_at : vec_at + fan_out]
                vec_at += fan_out
            self._grad_views.append(tuple(self._vector_grad_views[f"{n}{l}"] for n in names))
            if self._has_bn(l):
                self.params[f"gamma{l}"][...] = 1.0
                mean = self._bn_flat[bn_at : bn_at + fan_out]
                var = self._bn_flat[bn_at + fan_out : bn_at + 2 * fan_out]
                var[...] = 1.0
                self.bn_state[f"mean{l}"], self.bn_state[f"var{l}"] = mean, var
                self._stat_views.append(
                    (
                        self._batch_stats[bn_at : bn_at + fan_out],
                        self._batch_stats[bn_at + fan_out : bn_at + 2 * fan_out],
                    )
                )
                bn_at += 2 * fan_out
            else:
                self._stat_views.append(None)
            self._layer_keys.append(
                (
                    f"W{l}",
                    f"b{l}",
                    f"gamma{l}",
                    f"beta{l}",
                    f"mean{l}",
                    f"var{l}",
                    f"S{l}",
                    f"S_hat{l}",
                )
            )
        self.bn_updates = 0
        self._buffers = _Buffers()

    @property
    def n_layers(self) -> int:
        """Number of affine layers (hidden layers + 1)."""
        return len(self.hidden) + 1

    def _has_bn(self, l: int) -> bool:
        return self.batch_norm and l < self.n_layers

    def architecture(self) -> dict[str, Any]:
        """The constructor arguments, enough to rebuild the network (JSON-able)."""
        return {
            "d_in": self.d_in,
            "hidden": list(self.hidden),
            "n_classes": self.n_classes,
            "batch_norm": self.batch_norm,
            "init": self.init,
            "sigma": self.sigma,
            "bn_alpha": self.bn_alpha,
            "dtype": self.dtype.name,
        }

    # ------------------------------------------------------------------ forward

    def forward(
        self, X: np.ndarray, *, train: bool, reuse_buffers: bool = False
    ) -> tuple[np.ndarray, list[tuple]]:
        """Scores (N, n_classes) for X (N, d_in), and the caches of every layer.

        ``train`` picks batch statistics (True) or running averages (False) in
        batch norm. ``reuse_buffers`` writes activations into arrays kept from
        the previous call: the returned arrays are overwritten by the next call.
        """
        if X.ndim != 2 or X.shape[1] != self.d_in:
            raise ValueError(f"X must have shape (N, {self.d_in}), got {X.shape}")
        p = self.params
        caches: list[tuple] = []
        H = X
        n = X.shape[0]
        last = self.n_layers
        buf = self._buffers.get
        dtype = self.dtype
        for l in range(1, last + 1):
            kW, kb, kgamma, kbeta, kmean, kvar, kS, kS_hat = self._layer_keys[l]
            W = p[kW]
            out = buf(kS, (n, W.shape[1]), dtype) if reuse_buffers else None
            S, aff_cache = layers.affine_forward(H, W, p.get(kb), out=out)
            if l == last:
                caches.append((aff_cache, None, None))
                return S, caches
            bn_cache = None
            stats = self._stat_views[l]
            if stats is not None:
                into_flat = reuse_buffers and train
                # In place over S: batch norm keeps S_hat, not its input.
                S, bn_cache = layers.batchnorm_forward(
                    S,
                    p[kgamma],
                    p[kbeta],
                    train=train,
                    running_mean=self.bn_state[kmean],
                    running_var=self.bn_state[kvar],
                    out=S if reuse_buffers else None,
                    S_hat_out=buf(kS_hat, S.shape, dtype) if reuse_buffers else None,
                    mu_out=stats[0] if into_flat else None,
                    var_out=stats[1] if into_flat else None,
                )
            # ReLU in place over S: its pre-activation is not needed by backward.
            H, relu_cache = layers.relu_forward(S, out=S)
            caches.append((aff_cache, bn_cache, relu_cache))
        raise AssertionError("unreachable")  # pragma: no cover

    def buffer(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        """A scratch array of the network's dtype kept under ``name`` from one call to the next."""
        return self._buffers.get(name, shape, self.dtype)

    # ----------------------------------------------------------------- backward

    def backprop(
        self, dscores: np.ndarray, caches: list[tuple], *, reuse_buffers: bool = False
    ) -> Iterator[tuple[int, np.ndarray, np.ndarray]]:
        """Back-propagate dscores (N, n_classes) through the layers, last to first.

        Yields ``(l, X_l, dS_l)`` for each affine layer l: its input X_l (N, d_{l-1})
        and the gradient of the loss w.r.t. its output S_l = X_l W_l + b_l (N, d_l),
        so that dW_l = X_l^T dS_l. The gradient for the layer below is computed
        before each yield, so the consumer may update W_l in place at once. The
        gradients of the vectors (b, gamma, beta) are written into
        ``self.vector_grads`` (the layout of ``self.vectors``), complete once the
        generator is exhausted and overwritten by the next backprop.
        """
        dH = dscores
        for l in range(self.n_layers, 0, -1):
            aff_cache, bn_cache, relu_cache = caches[l - 1]
            grad_views = self._grad_views[l]
            if l < self.n_layers:
                dS = layers.relu_backward(dH, relu_cache, inplace=reuse_buffers)
                if bn_cache is not None:
                    dS, _, _ = layers.batchnorm_backward(
                        dS,
                        bn_cache,
                        out=dS,
                        dgamma_out=grad_views[0],
                        dbeta_out=grad_views[1],
                    )
            else:
                dS = dH
            X_l, W = aff_cache[0], aff_cache[1]
            dX_out = None
            if reuse_buffers and l > 1:
                dX_out = self._buffers.get(f"dH{l - 1}", (dS.shape[0], W.shape[0]), self.dtype)
            dX, _, _ = layers.affine_backward(
                dS,
                aff_cache,
                need_dX=l > 1,
                need_dW=False,
                dX_out=dX_out,
                db_out=grad_views[0] if bn_cache is None else None,
            )
            yield l, X_l, dS
            # None only for the first layer, after which the loop ends.
            dH = cast(np.ndarray, dX)

    def backward(
        self, dscores: np.ndarray, caches: list[tuple], *, l2_lambda: float = 0.0
    ) -> dict[str, np.ndarray]:
        """True gradients of the cost for every parameter (keys ``dW1, db1, dgamma1, ...``).

        dscores: (N, n_classes), the gradient of the mean loss w.r.t. the scores.
        Cost = mean cross-entropy + l2_lambda * sum of squared W, so each dW is
        X_l^T dS_l + 2 * l2_lambda * W_l; biases, gamma and beta have no L2 term.
        """
        grads: dict[str, np.ndarray] = {}
        for l, X_l, dS in self.backprop(dscores, caches):
            W = self.params[f"W{l}"]
            dW = X_l.T @ dS
            if l2_lambda:
                dW += 2.0 * l2_lambda * W
            grads[f"dW{l}"] = dW
        for key, view in self._vector_grad_views.items():
            grads["d" + key] = view.copy()
        return {"d" + k: grads["d" + k] for k in self.params}

    def update_running_stats(self, caches: list[tuple]) -> None:
        """Fold the batch statistics of a training forward pass into ``bn_state``.

        The first update takes the batch statistics as they are, so evaluation
        early in training does not use the initial zeros and ones.
        """
        if not self.batch_norm:
            return
        a = 0.0 if self.bn_updates == 0 else self.bn_alpha
        if caches[0][1][3].base is self._batch_stats:
            # A forward pass with reuse_buffers wrote every layer's statistics into
            # one flat array laid out like the running ones: one update for all.
            self._bn_flat *= a
            self._bn_flat += (1.0 - a) * self._batch_stats
        else:
            for l in range(1, self.n_layers):
                bn_cache = caches[l - 1][1]
                mu, var = bn_cache[3], bn_cache[4]
                for key, value in ((f"mean{l}", mu), (f"var{l}", var)):
                    state = self.bn_state[key]
                    state *= a
                    state += (1.0 - a) * value
        self.bn_updates += 1

    # -------------------------------------------------------------- cost / eval

    def l2_penalty(self) -> float:
        """Sum of squared weights over all W (not biases, gamma or beta)."""
        return float(
            sum(
                np.einsum("ij,ij->", W, W, dtype=np.float64)
                for k, W in self.params.items()
                if k.startswith("W")
            )
        )

    def loss(
        self, X: np.ndarray, y: np.ndarray, *, l2_lambda: float = 0.0, train: bool = True
    ) -> tuple[float, float, dict[str, np.ndarray]]:
        """(loss, cost, grads) on one batch X (N, d_in), y (N,) without touching ``bn_state``.

        loss is the mean cross-entropy, cost adds l2_lambda * sum of squared W, and
        grads are the true gradients of the cost. Used by the gradient check and as
        the textbook reference; the trainer steps through :func:`model.optim.sgd_step`.
        """
        scores, caches = self.forward(X, train=train)
        loss, dscores = layers.softmax_cross_entropy(scores, y)
        dscores = cast(np.ndarray, dscores)  # need_grad=True: never None
        grads = self.backward(dscores, caches, l2_lambda=l2_lambda)
        return loss, loss + l2_lambda * self.l2_penalty(), grads

    def predict_scores(self, X: np.ndarray, *, chunk: int = 5000) -> np.ndarray:
        """Scores (N, n_classes) in evaluation mode, computed in chunks of rows."""
        out = np.empty((X.shape[0], self.n_classes), dtype=self.dtype)
        for start in range(0, X.shape[0], chunk):
            out[start : start + chunk] = self.forward(X[start : start + chunk], train=False)[0]
        return out

    def predict(self, X: np.ndarray) -> np.ndarray:
        """Predicted labels (N,) for X (N, d_in)."""
        return self.predict_scores(X).argmax(axis=1)

    def evaluate(
        self, X: np.ndarray, y: np.ndarray, *, l2_lambda: float = 0.0
    ) -> dict[str, float]:
        """Loss, cost and accuracy on (X, y) in evaluation mode."""
        scores = self.predict_scores(X)
        accuracy = float(np.mean(scores.argmax(axis=1) == y))
        loss, _ = layers.softmax_cross_entropy(scores, y, need_grad=False, overwrite=True)
        return {
            "loss": loss,
            "cost": loss + l2_lambda * self.l2_penalty(),
            "accuracy": accuracy,
        }

    # ------------------------------------------------------------- persistence

    def save(self, path: str | Path, *, config: dict[str, Any] | None = None) -> Path:
        """Write weights, BN statistics, architecture and an optional config to ``.npz``."""
        path = Path(path)
        meta = {
            "architecture": self.architecture(),
            "config": config or {},
            "bn_updates": self.bn_updates,
        }
        arrays = {f"param/{k}": v for k, v in self.params.items()}
        arrays.update({f"bn/{k}": v for k, v in self.bn_state.items()})
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "wb") as f:
            # The stub reads **arrays as possibly allow_pickle (bool); the keys never clash.
            np.savez(f, meta=np.array(json.dumps(meta)), **arrays)  # type: ignore[arg-type]
        return path

    @classmethod
    def load(cls, path: str | Path) -> tuple[Network, dict[str, Any]]:
        """Read a network written by :meth:`save`; returns (network, config)."""
        path = Path(path)
        try:
            with np.load(path, allow_pickle=False) as f:
                meta = json.loads(str(f["meta"]))
                arrays = {k: f[k] for k in f.files if k != "meta"}
        except (OSError, ValueError, KeyError) as exc:
            raise ValueError(f"{path}: not a network saved by Network.save ({exc})") from exc
        net = cls(**meta["architecture"])
        for key, value in arrays.items():
            kind, name = key.split("/", 1)
            target = net.params if kind == "param" else net.bn_state
            if name not in target or target[name].shape != value.shape:
                raise ValueError(f"{path}: array {key} does not fit the saved architecture")
            # In place: the vectors and statistics are views into flat arrays.
            target[name][...] = value
        net.bn_updates = int(meta.get("bn_updates", 0))
        return net, meta["config"]
