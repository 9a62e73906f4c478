"""The k-layer perceptron: parameters, forward with caches, backward, batch norm, L2 cost.

Cost = mean cross-entropy + l2_lambda * sum of squared weights (W only: not the
biases, not gamma or beta), as in DD2424. Arrays are samples x features.

Parameters live in a flat dict ``params`` (``W1, b1, gamma1, beta1, ..., WL, bL``)
and their gradients in a dict with the same keys prefixed by ``d``. Batch-norm
running statistics live apart in ``bn_state`` (``mean1, var1, ...``): they are
not trained. A layer followed by batch norm has no bias, since the mean
subtraction cancels it and beta takes its place; the last layer always has one.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
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
        self.params: dict[str, np.ndarray] = {}
        self.bn_state: dict[str, np.ndarray] = {}
        sizes = [self.d_in, *self.hidden, self.n_classes]
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
            if self._has_bn(l):
                self.params[f"gamma{l}"] = np.ones(fan_out, dtype=self.dtype)
                self.params[f"beta{l}"] = np.zeros(fan_out, dtype=self.dtype)
                self.bn_state[f"mean{l}"] = np.zeros(fan_out, dtype=self.dtype)
                self.bn_state[f"var{l}"] = np.ones(fan_out, dtype=self.dtype)
            else:
                self.params[f"b{l}"] = np.zeros(fan_out, dtype=self.dtype)
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
        for l in range(1, self.n_layers + 1):
            out = self._buf(f"S{l}", (n, p[f"W{l}"].shape[1])) if reuse_buffers else None
            S, aff_cache = layers.affine_forward(H, p[f"W{l}"], p.get(f"b{l}"), out=out)
            if l == self.n_layers:
                caches.append((aff_cache, None, None))
                return S, caches
            bn_cache = None
            if self._has_bn(l):
                # In place over S: batch norm keeps S_hat, not its input.
                S, bn_cache = layers.batchnorm_forward(
                    S,
                    p[f"gamma{l}"],
                    p[f"beta{l}"],
                    train=train,
                    running_mean=self.bn_state[f"mean{l}"],
                    running_var=self.bn_state[f"var{l}"],
                    out=S if reuse_buffers else None,
                    S_hat_out=self._buf(f"S_hat{l}", S.shape) if reuse_buffers else None,
                )
            # ReLU in place over S: its pre-activation is not needed by backward.
            H, relu_cache = layers.relu_forward(S, out=S)
            caches.append((aff_cache, bn_cache, relu_cache))
        raise AssertionError("unreachable")  # pragma: no cover

    def _buf(self, name: str, shape: tuple[int, ...]) -> np.ndarray:
        return self._buffers.get(name, shape, self.dtype)

    # ----------------------------------------------------------------- backward

    def backward(
        self,
        dscores: np.ndarray,
        caches: list[tuple],
        *,
        l2_lambda: float = 0.0,
        reuse_buffers: bool = False,
    ) -> dict[str, np.ndarray]:
        """Gradients of the cost for every parameter (keys ``dW1, db1, dgamma1, ...``).

        dscores: (N, n_classes), the gradient of the mean loss w.r.t. the scores.
        The L2 term adds 2 * l2_lambda * W to each dW.
        """
        p = self.params
        grads: dict[str, np.ndarray] = {}
        dH = dscores
        for l in range(self.n_layers, 0, -1):
            aff_cache, bn_cache, relu_cache = caches[l - 1]
            if l < self.n_layers:
                dS = layers.relu_backward(dH, relu_cache, inplace=reuse_buffers)
                if bn_cache is not None:
                    dS, grads[f"dgamma{l}"], grads[f"dbeta{l}"] = layers.batchnorm_backward(
                        dS, bn_cache, out=dS if reuse_buffers else None
                    )
            else:
                dS = dH
            W = p[f"W{l}"]
            dW_out = self._buf(f"dW{l}", W.shape) if reuse_buffers else None
            dX_out = None
            if reuse_buffers and l > 1:
                dX_out = self._buf(f"dH{l - 1}", (dS.shape[0], W.shape[0]))
            dX, dW, db = layers.affine_backward(
                dS, aff_cache, need_dX=l > 1, dW_out=dW_out, dX_out=dX_out
            )
            # None only for the first layer, after which the loop ends.
            dH = cast(np.ndarray, dX)
            if l2_lambda:
                tmp = self._buf(f"l2tmp{l}", W.shape) if reuse_buffers else None
                dW += np.multiply(W, 2.0 * l2_lambda, out=tmp)
            grads[f"dW{l}"] = dW
            if db is not None:
                grads[f"db{l}"] = db
        return grads

    def update_running_stats(self, caches: list[tuple]) -> None:
        """Fold the batch statistics of a training forward pass into ``bn_state``.

        The first update takes the batch statistics as they are, so evaluation
        early in training does not use the initial zeros and ones.
        """
        if not self.batch_norm:
            return
        a = 0.0 if self.bn_updates == 0 else self.bn_alpha
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
        """(loss, cost, grads) on one batch without touching ``bn_state``.

        loss is the mean cross-entropy, cost adds l2_lambda * sum of squared W.
        Used by the gradient check; the trainer uses :meth:`train_step`.
        """
        scores, caches = self.forward(X, train=train)
        loss, dscores, _ = layers.softmax_cross_entropy(scores, y)
        dscores = cast(np.ndarray, dscores)  # need_grad=True: never None
        grads = self.backward(dscores, caches, l2_lambda=l2_lambda)
        return loss, loss + l2_lambda * self.l2_penalty(), grads

    def train_step(
        self, X: np.ndarray, y: np.ndarray, *, l2_lambda: float, grad_scale: float = 1.0
    ) -> tuple[float, dict[str, np.ndarray]]:
        """Forward and backward on one batch in training mode, updating ``bn_state``.

        Returns the batch's mean cross-entropy and the gradients times
        ``grad_scale``; the gradient arrays are reused by the next call, so apply
        them before calling again. Every gradient is linear in dscores, so the
        trainer passes the learning rate as ``grad_scale`` and scales a (N, K)
        array instead of every (d_in, d_out) one.
        """
        scores, caches = self.forward(X, train=True, reuse_buffers=True)
        loss, dscores, _ = layers.softmax_cross_entropy(scores, y)
        dscores = cast(np.ndarray, dscores)  # need_grad=True: never None
        if grad_scale != 1.0:
            dscores *= grad_scale
        grads = self.backward(dscores, caches, l2_lambda=l2_lambda, reuse_buffers=True)
        self.update_running_stats(caches)
        return loss, grads

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
        loss, _, pred = layers.softmax_cross_entropy(scores, y, need_grad=False)
        return {
            "loss": loss,
            "cost": loss + l2_lambda * self.l2_penalty(),
            "accuracy": float(np.mean(pred == y)),
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
            target[name] = value.astype(net.dtype)
        net.bn_updates = int(meta.get("bn_updates", 0))
        return net, meta["config"]
