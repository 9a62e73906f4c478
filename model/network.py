"""The k-layer perceptron: parameters, forward with caches, backward, batch norm, L2 cost.

Cost = mean cross-entropy + l2_lambda * sum of squared weights (W only: not the
biases, not gamma or beta), as in DD2424. Arrays are samples x features.

Parameters live in a flat dict ``params`` (``W1, b1, gamma1, beta1, ..., WL, bL``)
and their gradients in a dict with the same keys prefixed by ``d``. Batch-norm
running statistics live apart in ``bn_state`` (``mean1, var1, ...``): they are
not trained. A layer followed by batch norm has no bias, since the mean
subtraction cancels it and beta takes its place; the last layer always has one.

Every parameter is a view into one flat array ``Network.flat_params``: first every
W (W1, W2, ..., WL), then every vector (b, gamma and beta, layer by layer). The
training pass writes its gradients into ``Network.flat_grads``, laid out alike, and
its batch statistics into one flat array laid out like the running ones, so an
optimiser steps every parameter after the first layer's W, and folds in every
batch statistic, with one call each whatever the depth. Update parameters in place
(``params[k][...] = ...``), never by assigning a new array to the key.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import numpy as np

from model import layers
from model.errors import SettingError, UsageError

INITS = ("he", "xavier", "sigma")


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
            raise SettingError(f"d_in must be >= 1, got {d_in=}", field="d_in")
        if n_classes < 2:
            raise SettingError(f"n_classes must be >= 2, got {n_classes=}", field="n_classes")
        if any(h < 1 for h in hidden):
            raise SettingError(f"hidden sizes must all be >= 1, got {hidden=}", field="hidden")
        if init not in INITS:
            raise SettingError(f"init must be one of {INITS}, got {init=}", field="init")
        if init == "sigma" and (sigma is None or not sigma > 0):
            raise SettingError(f"init='sigma' needs sigma > 0, got {sigma=}", field="sigma")
        if not 0.0 <= bn_alpha < 1.0:
            raise SettingError(f"bn_alpha must be in [0, 1), got {bn_alpha=}", field="bn_alpha")
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.dtype(np.float32), np.dtype(np.float64)):
            raise SettingError(f"dtype must be float32 or float64, got {dtype=}", field="dtype")
        self.d_in = int(d_in)
        self.hidden = tuple(hidden)
        self.n_classes = int(n_classes)
        self.batch_norm = bool(batch_norm)
        self.init = init
        self.sigma = sigma
        self.bn_alpha = float(bn_alpha)
        rng = seed if isinstance(seed, np.random.Generator) else np.random.default_rng(seed)
        sizes = [self.d_in, *self.hidden, self.n_classes]
        layer_ids = range(1, len(sizes))
        n_weights = sum(sizes[l - 1] * sizes[l] for l in layer_ids)
        n_vec = sum(2 * sizes[l] if self._has_bn(l) else sizes[l] for l in layer_ids)
        n_bn = sum(2 * sizes[l] for l in layer_ids if self._has_bn(l))
        self.flat_params = np.zeros(n_weights + n_vec, dtype=self.dtype)
        self.flat_grads = np.zeros_like(self.flat_params)
        #: Entries of W1 (the start of the flat arrays) and of all the weights.
        self.n_first_weights = sizes[0] * sizes[1]
        self.n_weights = n_weights
        self._bn_flat = np.zeros(n_bn, dtype=self.dtype)
        self._batch_stats = np.zeros(n_bn, dtype=self.dtype)
        self.params: dict[str, np.ndarray] = {}
        self.bn_state: dict[str, np.ndarray] = {}
        self._grad_views: dict[str, np.ndarray] = {}
        # Per layer l (index l - 1): the views of its running statistics, of its batch
        # statistics in the flat array, and its parameter keys.
        self._layers: list[tuple[str, str | None, str | None, str | None]] = []
        self._stat_views: list[tuple[np.ndarray, np.ndarray] | None] = []
        w_at, vec_at, bn_at = 0, n_weights, 0
        for l in layer_ids:
            fan_in, fan_out = sizes[l - 1], sizes[l]
            # Never None: init="sigma" with sigma=None was refused above.
            std = cast(
                float,
                {"he": np.sqrt(2.0 / fan_in), "xavier": np.sqrt(1.0 / fan_in)}.get(init, sigma),
            )
            # Drawn in float64 so float32 and float64 networks of one seed match.
            W = rng.standard_normal((fan_in, fan_out)) * std
            self._add_param(f"W{l}", w_at, (fan_in, fan_out))
            self.params[f"W{l}"][...] = W
            w_at += fan_in * fan_out
            names = ("gamma", "beta") if self._has_bn(l) else ("b",)
            for name in names:
                self._add_param(f"{name}{l}", vec_at, (fan_out,))
                vec_at += fan_out
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
                self._layers.append((f"W{l}", None, f"gamma{l}", f"beta{l}"))
            else:
                self._stat_views.append(None)
                self._layers.append((f"W{l}", f"b{l}", None, None))
        self.bn_updates = 0
        self._train_passes: dict[int, _TrainPass] = {}

    def _add_param(self, key: str, at: int, shape: tuple[int, ...]) -> None:
        size = int(np.prod(shape))
        self.params[key] = self.flat_params[at : at + size].reshape(shape)
        self._grad_views[key] = self.flat_grads[at : at + size].reshape(shape)

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

    def forward(self, X: np.ndarray, *, train: bool) -> tuple[np.ndarray, list[tuple]]:
        """Scores (N, n_classes) for X (N, d_in), and the caches of every layer.

        ``train`` picks batch statistics (True) or running averages (False) in
        batch norm. Fresh arrays throughout: this is the reference pass (gradient
        checks, ``loss``, evaluation); a training step goes through
        :meth:`train_gradients`.
        """
        if X.ndim != 2 or X.shape[1] != self.d_in:
            raise UsageError(f"X must have shape (N, {self.d_in}), got {X.shape}")
        p = self.params
        caches: list[tuple] = []
        H = X
        last = self.n_layers
        for l, (kW, kb, kgamma, kbeta) in enumerate(self._layers, 1):
            S, aff_cache = layers.affine_forward(H, p[kW], None if kb is None else p[kb])
            if l == last:
                caches.append((aff_cache, None, None))
                return S, caches
            bn_cache = None
            if kgamma is not None:
                S, bn_cache = layers.batchnorm_forward(
                    S,
                    p[kgamma],
                    p[cast(str, kbeta)],
                    train=train,
                    running_mean=self.bn_state[f"mean{l}"],
                    running_var=self.bn_state[f"var{l}"],
                    out=S,
                )
            # ReLU in place over S: its pre-activation is not needed by backward.
            H, relu_cache = layers.relu_forward(S, out=S)
            caches.append((aff_cache, bn_cache, relu_cache))
        raise AssertionError("unreachable")  # pragma: no cover

    # ----------------------------------------------------------------- backward

    def backward(
        self, dscores: np.ndarray, caches: list[tuple], *, l2_lambda: float = 0.0
    ) -> dict[str, np.ndarray]:
        """True gradients of the cost for every parameter (keys ``dW1, db1, dgamma1, ...``).

        dscores: (N, n_classes), the gradient of the mean loss w.r.t. the scores.
        Cost = mean cross-entropy + l2_lambda * sum of squared W, so each dW is
        X_l^T dS_l + 2 * l2_lambda * W_l; biases, gamma and beta have no L2 term.
        """
        grads: dict[str, np.ndarray] = {}
        dH = dscores
        for l in range(self.n_layers, 0, -1):
            kW, kb, kgamma, _ = self._layers[l - 1]
            aff_cache, bn_cache, relu_cache = caches[l - 1]
            dS = dH
            if l < self.n_layers:
                dS = layers.relu_backward(dH, relu_cache)
                if bn_cache is not None:
                    dS, grads[f"dgamma{l}"], grads[f"dbeta{l}"] = layers.batchnorm_backward(
                        dS, bn_cache
                    )
            dX, dW, db = layers.affine_backward(dS, aff_cache, need_dX=l > 1)
            dW = cast(np.ndarray, dW)  # need_dW=True: never None
            if l2_lambda:
                dW += 2.0 * l2_lambda * self.params[kW]
            grads["d" + kW] = dW
            if kb is not None:
                grads["d" + kb] = cast(np.ndarray, db)
            # None only for the first layer, after which the loop ends.
            dH = cast(np.ndarray, dX)
        return {"d" + k: grads["d" + k] for k in self.params}

    def train_gradients(
        self, X: np.ndarray, y: np.ndarray, *, grad_scale: float = 1.0
    ) -> tuple[float, int, np.ndarray]:
        """One training pass on the batch X (N, d_in), y (N,): (loss, n_correct, dS1).

        loss is the batch's mean cross-entropy and n_correct how many of its N
        samples the scores of this pass classify right (argmax; batch norm on the
        batch's own statistics, as the pass itself). ``flat_grads`` receives ``grad_scale``
        times the gradient of the mean loss (no L2 term) for every parameter except
        W1; W1's is X^T dS1 with dS1 (N, d_1) returned, left for the optimiser to fold
        into its step (one gemm, :func:`model.blas.gemm_update`). Batch norm uses and
        records the batch statistics; :meth:`fold_batch_stats` moves them into
        ``bn_state``. The returned array and the gradients are overwritten by the next
        call. X must be C-contiguous and of the network's dtype.
        """
        n = X.shape[0]
        train_pass = self._train_passes.get(n)
        if train_pass is None:
            train_pass = self._train_passes[n] = _TrainPass(self, n)
        return train_pass.run(X, y, grad_scale)

    def fold_batch_stats(self) -> None:
        """Fold the batch statistics of the last :meth:`train_gradients` into ``bn_state``.

        The first update takes the batch statistics as they are, so evaluation
        early in training does not use the initial zeros and ones.
        """
        if not self.batch_norm:
            return
        a = 0.0 if self.bn_updates == 0 else self.bn_alpha
        # Every layer's statistics sit in one flat array laid out like the running
        # ones: one update for all.
        self._bn_flat *= a
        self._bn_flat += (1.0 - a) * self._batch_stats
        self.bn_updates += 1

    def update_running_stats(self, caches: list[tuple]) -> None:
        """Fold the batch statistics of a training :meth:`forward` (its caches) into
        ``bn_state``, as :meth:`fold_batch_stats` does after :meth:`train_gradients`."""
        if not self.batch_norm:
            return
        for l in range(1, self.n_layers):
            batch_mu, batch_var = cast(tuple, self._stat_views[l - 1])
            batch_mu[...], batch_var[...] = caches[l - 1][1][-2:]
        self.fold_batch_stats()

    # -------------------------------------------------------------- cost / eval

    def l2_penalty(self) -> float:
        """Sum of squared weights over all W (not biases, gamma or beta)."""
        W = self.flat_params[: self.n_weights]
        return float(np.einsum("i,i->", W, W, dtype=np.float64))

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

    def predict_scores(self, X: np.ndarray, *, chunk: int = 500) -> np.ndarray:
        """Scores (N, n_classes) in evaluation mode, computed in chunks of rows.

        Chunks of a few hundred rows: on 5,000 CIFAR-10 images through 3072 x 50, with one
        BLAS thread, 250-1000 rows a product took a median 8-10% less time than one product
        of all 5,000 (paired, interleaved runs on the 2-core machine), and no more memory
        than the chunk's activations.
        """
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
        self.check_labels(y)
        scores = self.predict_scores(X)
        accuracy = float(np.mean(scores.argmax(axis=1) == y))
        loss, _ = layers.softmax_cross_entropy(scores, y, need_grad=False, overwrite=True)
        return {
            "loss": loss,
            "cost": loss + l2_lambda * self.l2_penalty(),
            "accuracy": accuracy,
        }

    def check_labels(self, y: np.ndarray, what: str = "labels") -> None:
        """A :class:`SettingError` unless every label is a class of this network: the loss
        reads the score at each label, and one out of range would read another row's."""
        y = np.asarray(y)
        if y.size and (y.min() < 0 or y.max() >= self.n_classes):
            bad = int(y.min()) if y.min() < 0 else int(y.max())
            raise SettingError(
                f"{what} must be classes 0..{self.n_classes - 1} of this network "
                f"(n_classes={self.n_classes}), got {bad}: build the network with as many "
                "classes as the data has",
                field="n_classes",
            )

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
            raise UsageError(f"{path}: not a network saved by Network.save ({exc})") from exc
        net = cls(**meta["architecture"])
        for key, value in arrays.items():
            kind, name = key.split("/", 1)
            target = net.params if kind == "param" else net.bn_state
            if name not in target or target[name].shape != value.shape:
                raise UsageError(f"{path}: array {key} does not fit the saved architecture")
            # In place: the vectors and statistics are views into flat arrays.
            target[name][...] = value
        net.bn_updates = int(meta.get("bn_updates", 0))
        return net, meta["config"]


class _TrainPass:
    """The training pass of one network for batches of ``n`` rows.

    Every array the pass writes is allocated once here and reused from one step to the
    next (a batch of 100 x 3072 float32 is above glibc's mmap threshold, and fresh
    arrays on every step cost more than the arithmetic of the small layers), and each
    layer's parameter and gradient views are looked up once, so a deep network pays
    little Python per layer.
    """

    def __init__(self, net: Network, n: int) -> None:
        dtype = net.dtype
        sizes = [net.d_in, *net.hidden, net.n_classes]
        p, g = net.params, net._grad_views
        self.layers: list[tuple] = []
        for l, (kW, kb, kgamma, kbeta) in enumerate(net._layers, 1):
            m = sizes[l]
            bn = None
            if kgamma is not None:
                mu_out, var_out = cast(tuple, net._stat_views[l - 1])
                bn = {
                    "gamma": p[kgamma],
                    "beta": p[cast(str, kbeta)],
                    "running_mean": net.bn_state[f"mean{l}"],
                    "running_var": net.bn_state[f"var{l}"],
                    "mu_out": mu_out,
                    "var_out": var_out,
                    "C_out": np.empty((n, m), dtype),
                }
                bn_grads = {
                    "dgamma_out": g[kgamma],
                    "dbeta_out": g[cast(str, kbeta)],
                    "work": np.empty((n, m), dtype),
                }
            self.layers.append(
                (
                    p[kW],
                    None if kb is None else p[kb],
                    # S: the layer's output (its ReLU in place over the pre-activation).
                    np.empty((n, m), dtype),
                    bn,
                    bn_grads if bn is not None else None,
                    # The ReLU's mask, and the gradient for the layer below.
                    np.empty((n, m), bool) if l < len(sizes) - 1 else None,
                    g[kW] if l > 1 else None,
                    None if kb is None else g[kb],
                    np.empty((n, sizes[l - 1]), dtype) if l > 1 else None,
                )
            )

    def run(
        self, X: np.ndarray, y: np.ndarray, grad_scale: float
    ) -> tuple[float, int, np.ndarray]:
        """See :meth:`Network.train_gradients`."""
        *hidden, last = self.layers
        bn_caches: list[tuple] = []
        H = X
        for W, b, S, bn, _, _, _, _, _ in hidden:
            layers.affine_forward(H, W, b, out=S)
            if bn is not None:
                # In place over S: batch norm keeps the centred S, not its input.
                bn_caches.append(layers.batchnorm_forward(S, train=True, out=S, **bn)[1])
            # ReLU in place: its pre-activation is not needed by backward.
            layers.relu_forward(S, out=S)
            H = S
        W, b, scores = last[:3]
        layers.affine_forward(H, W, b, out=scores)
        # The argmax the loss needs anyway: the batch's accuracy costs one comparison.
        predicted = scores.argmax(axis=1)
        n_correct = int(np.count_nonzero(predicted == y))
        loss, dscores = layers.softmax_cross_entropy(
            scores, y, grad_scale=grad_scale, overwrite=True, argmax=predicted
        )
        dS = cast(np.ndarray, dscores)  # need_grad=True: never None
        for i in range(len(self.layers) - 1, -1, -1):
            W, b, S, bn, bn_grads, mask, dW, db, dX = self.layers[i]
            if mask is not None:
                # dS holds dH here, the gradient w.r.t. this layer's output.
                layers.relu_backward(dS, S, inplace=True, mask_out=mask)
                if bn is not None:
                    layers.batchnorm_backward(dS, bn_caches.pop(), out=dS, **bn_grads)
            H_below = self.layers[i - 1][2] if i else X
            layers.affine_backward(
                dS,
                (H_below, W, b is not None),
                need_dX=dX is not None,
                need_dW=dW is not None,
                dX_out=dX,
                dW_out=dW,
                db_out=db,
            )
            if dX is None:
                return loss, n_correct, dS
            dS = dX
        raise AssertionError("unreachable")  # pragma: no cover
