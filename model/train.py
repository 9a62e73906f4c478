"""Mini-batch training: learning-rate schedules, evaluation points, history, divergence.

``fit(net, splits, config, on_evaluate=...)`` trains ``net`` on ``splits.train``,
evaluates the validation set at regular points, takes the training metrics there
(from the mini-batches since the previous point, or from a full evaluation: see
:class:`TrainConfig`'s ``train_metrics``), and calls ``on_evaluate(step, metrics)``
at each one (the search package prunes through it). The step itself (SGD with
momentum, weight decay on W only) is :func:`model.optim.sgd_step`. The test set is
never touched here.

Run ``python -m model.train --help`` to train one network from the command line.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import numbers
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any

import numpy as np

from model import optim
from model.errors import SettingError, check_out_dir
from model.network import Network
from model.schedules import Constant, Cyclical, StepDecay

SCHEDULES = ("constant", "step", "cyclical")
TRAIN_METRICS = ("running", "full")
METRICS = (
    "train_loss",
    "train_cost",
    "train_acc",
    "val_loss",
    "val_cost",
    "val_acc",
)

OnEvaluate = Callable[[int, dict[str, float]], None]


class TrainingDiverged(RuntimeError):
    """The training loss became non-finite; raised at once, with where it happened."""

    def __init__(self, *, step: int, eta: float, loss: float, history: History) -> None:
        super().__init__(
            f"training diverged at step {step} (eta={eta:.3g}, loss={loss}); "
            "try a smaller learning rate or stronger regularisation"
        )
        self.step = step
        self.eta = eta
        self.loss = loss
        self.history = history


@dataclass(frozen=True)
class TrainConfig:
    """How to train: regularisation, batches, schedule, momentum, evaluation points.

    The field names are the names of the search parameters (``l2_lambda``,
    ``eta_max``, ...), so a trial's params build a config directly.

    - ``schedule="cyclical"``: triangular between ``eta_min`` and ``eta_max`` with
      half-cycle ``n_s`` steps, or ``n_s_epochs`` epochs of the training set at hand
      (rounded to steps; neither: 2 epochs, 2 * floor(N / batch_size)), for
      ``n_cycles`` cycles; ``evals_per_cycle`` evaluation points per cycle.
    - ``schedule="constant"`` / ``"step"``: ``eta`` for ``n_epochs`` epochs, multiplied
      by ``decay`` after each epoch for "step"; one evaluation point per epoch.
    - ``eval_every`` (steps) overrides the evaluation rate of either.
    - ``rho``: momentum (0 = plain gradient descent).
    - ``train_metrics``: where the training curve comes from. "running" (the
      default): the mean loss and the accuracy of the mini-batches trained on since
      the previous evaluation point, as each batch's training pass computed them
      before its step, at no extra cost; cost is that loss plus the L2 term of the
      weights at the point. They are measured in training mode (batch norm on each
      batch's own statistics) and while the weights move, so they trail a full
      evaluation of the network at the point: early in training the running loss
      is higher, and with batch norm the two differ by the batch statistics.
      "full": a forward pass in evaluation mode over the training set (or its first
      ``train_eval_size`` samples) at every point, exact and costly (an evaluation
      of 10,000 images takes as long as about 50 training steps of 100).
    - ``train_eval_size``: with ``train_metrics="full"``, evaluate the training
      metrics on the first this-many training samples instead of all of them
      (None: all). "running" metrics cover every batch and ignore it.

    The validation set is evaluated in full, in evaluation mode, at every point.
    """

    l2_lambda: float = 0.0
    batch_size: int = 100
    schedule: str = "cyclical"
    eta: float = 0.01
    eta_min: float = 1e-5
    eta_max: float = 1e-1
    n_s: int | None = None
    n_s_epochs: float | None = None
    n_cycles: int = 2
    n_epochs: int = 10
    decay: float = 1.0
    rho: float = 0.0
    evals_per_cycle: int = 10
    eval_every: int | None = None
    train_metrics: str = "running"
    train_eval_size: int | None = None
    seed: int = 0

    def __post_init__(self) -> None:
        self._check_types()
        if not self.l2_lambda >= 0:
            raise SettingError(
                f"l2_lambda must be >= 0, got l2_lambda={self.l2_lambda!r}", field="l2_lambda"
            )
        if self.batch_size < 1:
            raise SettingError(
                f"batch_size must be >= 1, got batch_size={self.batch_size!r}", field="batch_size"
            )
        if self.schedule not in SCHEDULES:
            raise SettingError(
                f"schedule must be one of {SCHEDULES}, got {self.schedule!r}", field="schedule"
            )
        if not 0 <= self.rho < 1:
            raise SettingError(f"rho must be in [0, 1), got rho={self.rho!r}", field="rho")
        if self.n_s is not None and self.n_s < 1:
            raise SettingError(f"n_s must be >= 1 or None, got n_s={self.n_s!r}", field="n_s")
        if self.n_s_epochs is not None:
            if self.n_s is not None:
                raise SettingError(
                    f"give n_s (steps) or n_s_epochs, not both, got n_s={self.n_s!r} and "
                    f"n_s_epochs={self.n_s_epochs!r}",
                    field=None,
                )
            if not (self.n_s_epochs > 0 and math.isfinite(self.n_s_epochs)):
                raise SettingError(
                    f"n_s_epochs must be > 0 epochs, got n_s_epochs={self.n_s_epochs!r}",
                    field="n_s_epochs",
                )
        for name in ("n_cycles", "n_epochs"):
            if getattr(self, name) < 1:
                raise SettingError(
                    f"{name} must be >= 1, got {name}={getattr(self, name)}", field=name
                )
        if self.evals_per_cycle < 1:
            raise SettingError(
                f"evals_per_cycle must be >= 1, got {self.evals_per_cycle!r}",
                field="evals_per_cycle",
            )
        if self.eval_every is not None and self.eval_every < 1:
            raise SettingError(
                f"eval_every must be >= 1 or None, got {self.eval_every!r}", field="eval_every"
            )
        if self.train_metrics not in TRAIN_METRICS:
            raise SettingError(
                f"train_metrics must be one of {TRAIN_METRICS}, got {self.train_metrics!r}",
                field="train_metrics",
            )
        if self.train_eval_size is not None and self.train_eval_size < 1:
            raise SettingError(
                "train_eval_size must be >= 1 (training samples evaluated) or None (all), "
                f"got train_eval_size={self.train_eval_size!r}",
                field="train_eval_size",
            )
        if self.seed < 0:
            raise SettingError(f"seed must be >= 0, got seed={self.seed!r}", field="seed")
        # Build the schedule once to validate its numbers (eta > 0, eta_max > eta_min...).
        self.make_schedule(n_train=max(self.batch_size, 1))

    def _check_types(self) -> None:
        """Every field has its annotated type: an int field an integer (1.5 cycles or a batch
        of 50.5 would train something else than asked), a float field a finite number."""
        for f in fields(self):
            value = getattr(self, f.name)
            kind = str(f.type)
            if value is None and "None" in kind:
                continue
            if kind.startswith("int"):
                if isinstance(value, bool) or not isinstance(value, numbers.Integral):
                    raise SettingError(
                        f"{f.name} must be an integer, got {f.name}={value!r}"
                        + (" (or leave it out)" if "None" in kind else ""),
                        field=f.name,
                    )
            elif kind.startswith("float"):
                if isinstance(value, bool) or not isinstance(value, numbers.Real):
                    raise SettingError(
                        f"{f.name} must be a number, got {f.name}={value!r}", field=f.name
                    )
                if not math.isfinite(value):
                    raise SettingError(
                        f"{f.name} must be a finite number, got {f.name}={value!r}", field=f.name
                    )
            elif kind.startswith("str") and not isinstance(value, str):
                raise SettingError(
                    f"{f.name} must be a string, got {f.name}={value!r}", field=f.name
                )

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> TrainConfig:
        """Build from a dict, rejecting unknown keys by name."""
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(values) - known)
        if unknown:
            raise SettingError(
                f"unknown TrainConfig fields {unknown}; allowed: {sorted(known)}", field=None
            )
        return cls(**values)

    def steps_per_epoch(self, n_train: int) -> int:
        """Full batches per epoch; the remainder is dropped (reshuffled next epoch)."""
        steps = n_train // self.batch_size
        if steps < 1:
            raise SettingError(
                f"batch_size={self.batch_size} is larger than the training set ({n_train})",
                field="batch_size",
            )
        return steps

    def resolved_n_s(self, n_train: int) -> int:
        """The half-cycle in steps for a training set of ``n_train`` images."""
        if self.n_s is not None:
            return self.n_s
        epochs = 2.0 if self.n_s_epochs is None else self.n_s_epochs
        return max(1, round(epochs * self.steps_per_epoch(n_train)))

    def total_steps(self, n_train: int) -> int:
        if self.schedule == "cyclical":
            return 2 * self.resolved_n_s(n_train) * self.n_cycles
        return self.n_epochs * self.steps_per_epoch(n_train)

    def eval_interval(self, n_train: int) -> int:
        if self.eval_every is not None:
            return self.eval_every
        if self.schedule == "cyclical":
            return max(1, (2 * self.resolved_n_s(n_train)) // self.evals_per_cycle)
        return self.steps_per_epoch(n_train)

    def make_schedule(self, n_train: int) -> Constant | StepDecay | Cyclical:
        if self.schedule == "cyclical":
            return Cyclical(self.eta_min, self.eta_max, self.resolved_n_s(n_train))
        if self.schedule == "step":
            return StepDecay(self.eta, self.decay, self.steps_per_epoch(n_train))
        return Constant(self.eta)


@dataclass
class History:
    """Metrics at every evaluation point: ``step``, ``epoch``, ``eta`` and METRICS.

    ``step`` counts the updates done; ``eta`` is the rate the last of them used,
    ``schedule.lr_at(step - 1)`` (update k, from 0, uses ``lr_at(k)``): at step n_s
    of a cyclical schedule that is one update short of eta_max, and the schedule's own
    values (``lr_at(0) = eta_min``, ``lr_at(n_s) = eta_max``) are exact."""

    step: list[int] = field(default_factory=list)
    epoch: list[float] = field(default_factory=list)
    eta: list[float] = field(default_factory=list)
    metrics: dict[str, list[float]] = field(default_factory=lambda: {m: [] for m in METRICS})
    wall_time: float = 0.0
    epochs_run: float = 0.0

    def append(self, step: int, epoch: float, eta: float, values: dict[str, float]) -> None:
        self.step.append(step)
        self.epoch.append(epoch)
        self.eta.append(eta)
        for m in METRICS:
            self.metrics[m].append(values[m])

    def __len__(self) -> int:
        return len(self.step)

    @property
    def best_val_acc(self) -> float:
        return max(self.metrics["val_acc"], default=float("nan"))

    @property
    def final(self) -> dict[str, float]:
        """Metrics at the last evaluation point."""
        return {m: v[-1] for m, v in self.metrics.items() if v}

    def to_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "epoch": self.epoch,
            "eta": self.eta,
            **self.metrics,
            "wall_time": self.wall_time,
            "epochs_run": self.epochs_run,
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> History:
        h = cls(step=list(d["step"]), epoch=list(d["epoch"]), eta=list(d["eta"]))
        h.metrics = {m: list(d[m]) for m in METRICS}
        h.wall_time = float(d.get("wall_time", 0.0))
        h.epochs_run = float(d.get("epochs_run", 0.0))
        return h


@np.errstate(over="ignore", invalid="ignore")  # a diverging run raises TrainingDiverged
def fit(
    net: Network,
    splits: Any,
    config: TrainConfig,
    *,
    on_evaluate: OnEvaluate | None = None,
    log: Callable[[str], None] | None = None,
    blas_threads: int | None = 1,
) -> History:
    """Train ``net`` in place on ``splits.train``; evaluate ``splits.val`` at every point.

    ``splits`` needs ``.train`` and ``.val`` with ``X (N, d)`` and ``y (N,)``.
    Batches are drawn from a fresh permutation each epoch (seeded by
    ``config.seed``); the remainder of N / batch_size is dropped each epoch.
    The training metrics of a point are running or full (``config.train_metrics``).
    ``on_evaluate(step, metrics)`` is called at each evaluation point and may raise
    to stop training (the exception propagates). A non-finite batch loss raises
    :class:`TrainingDiverged` at once. ``log`` receives one line per evaluation.

    ``blas_threads`` limits the BLAS thread pools while training (through
    threadpoolctl when it is installed); None leaves them as the caller set them.
    The default, one thread, is the measured choice for these shapes (batches of
    100 through layers of at most a few hundred units), from the Python API as
    from the commands: on this project's 2-core machine, the CIFAR subset for 8
    epochs took 0.78-0.85 s with two threads against 0.99-1.05 s with one while
    another process kept one core busy, and 5.9 s against 1.1 s for [50] once
    three did; an epoch of 45,000 images gained at most 1.3x on an idle machine
    (``python -m bench.train_speed --threads 2``). Two threads win little when
    they win and lose several times over when the other core is taken, as it is
    whenever a search runs a worker per core.
    """
    if blas_threads is not None and blas_threads < 1:
        raise SettingError(
            f"blas_threads must be >= 1 or None, got {blas_threads=}", field="blas_threads"
        )
    net.check_labels(splits.train.y, "training labels")
    net.check_labels(splits.val.y, "validation labels")
    with _blas_thread_limit(blas_threads):
        return _fit(net, splits, config, on_evaluate=on_evaluate, log=log)


def _blas_thread_limit(n: int | None) -> contextlib.AbstractContextManager[Any]:
    """A context limiting every loaded BLAS to n threads; a no-op for None or without
    threadpoolctl (optional: model/ needs NumPy only)."""
    if n is None:
        return contextlib.nullcontext()
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:  # pragma: no cover - threadpoolctl is installed with the project
        return contextlib.nullcontext()
    return threadpool_limits(limits=n, user_api="blas")


def _fit(
    net: Network,
    splits: Any,
    config: TrainConfig,
    *,
    on_evaluate: OnEvaluate | None,
    log: Callable[[str], None] | None,
) -> History:
    X, y = splits.train.X, splits.train.y
    Xv, yv = splits.val.X, splits.val.y
    if X.dtype != net.dtype:
        raise SettingError(
            f"training data is {X.dtype} but the network is {net.dtype}; "
            "load the data with the network's dtype",
            field=None,
        )
    n = X.shape[0]
    B = config.batch_size
    steps_per_epoch = config.steps_per_epoch(n)
    total = config.total_steps(n)
    interval = config.eval_interval(n)
    schedule = config.make_schedule(n)
    rng = np.random.default_rng(config.seed)
    m_train = n if config.train_eval_size is None else min(n, config.train_eval_size)
    running = config.train_metrics == "running"
    lam = config.l2_lambda

    history = History()
    velocity = optim.init_velocity(net) if config.rho else None
    Xb = np.empty((B, X.shape[1]), dtype=X.dtype)
    yb = np.empty(B, dtype=y.dtype)
    t0 = time.perf_counter()
    step = 0
    # The mini-batches since the last evaluation point: the running training metrics.
    loss_sum, n_correct_sum, n_batches = 0.0, 0, 0
    order = np.empty(0, dtype=np.intp)
    while step < total:
        pos = step % steps_per_epoch
        if pos == 0:
            order = rng.permutation(n)
        idx = order[pos * B : (pos + 1) * B]
        # mode="clip": with the default mode="raise" NumPy buffers ``out`` and the
        # gather takes twice as long; idx is a slice of a permutation, always in range.
        np.take(X, idx, axis=0, out=Xb, mode="clip")
        np.take(y, idx, out=yb, mode="clip")
        eta = schedule.lr_at(step)
        loss, n_correct = optim.sgd_step(
            net, Xb, yb, eta=eta, l2_lambda=lam, rho=config.rho, velocity=velocity
        )
        if not math.isfinite(loss):
            history.wall_time = time.perf_counter() - t0
            history.epochs_run = step / steps_per_epoch
            raise TrainingDiverged(step=step, eta=eta, loss=loss, history=history)
        step += 1
        loss_sum += loss
        n_correct_sum += n_correct
        n_batches += 1
        if step % interval == 0 or step == total:
            if running:
                train_loss = loss_sum / n_batches
                tr = {
                    "loss": train_loss,
                    "cost": train_loss + lam * net.l2_penalty(),
                    "accuracy": n_correct_sum / (n_batches * B),
                }
            else:
                tr = net.evaluate(X[:m_train], y[:m_train], l2_lambda=lam)
            loss_sum, n_correct_sum, n_batches = 0.0, 0, 0
            va = net.evaluate(Xv, yv, l2_lambda=lam)
            values = {
                "train_loss": tr["loss"],
                "train_cost": tr["cost"],
                "train_acc": tr["accuracy"],
                "val_loss": va["loss"],
                "val_cost": va["cost"],
                "val_acc": va["accuracy"],
            }
            if not math.isfinite(tr["loss"]):
                raise TrainingDiverged(step=step, eta=eta, loss=tr["loss"], history=history)
            epoch = step / steps_per_epoch
            history.append(step, epoch, eta, values)
            history.wall_time = time.perf_counter() - t0
            history.epochs_run = epoch
            if log is not None:
                log(
                    f"step {step:>6}/{total} epoch {epoch:6.2f} eta {eta:.2e} "
                    f"loss {values['train_loss']:.4f} cost {values['train_cost']:.4f} "
                    f"train acc {values['train_acc']:.4f} val acc {values['val_acc']:.4f}"
                )
            if on_evaluate is not None:
                on_evaluate(step, values)
    return history


# ------------------------------------------------------------------------- CLI


def _parse_hidden(text: str) -> list[int]:
    try:
        sizes = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"--hidden takes sizes separated by commas, like 50,50; got {text!r}"
        ) from None
    return sizes


def build_parser(prog: str = "python -m model.train") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description="Train one k-layer network and write its curves.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    p.add_argument("--dataset", default="digits", help="cifar10, digits or fashion_mnist")
    p.add_argument("--data-dir", default=None, help="directory of the dataset files")
    p.add_argument("--split", default="batch1", help="cifar10: batch1 or all")
    from model.data import n_val_arg

    p.add_argument(
        "--n-val",
        type=n_val_arg,
        default=None,
        help="validation images held out, or a fraction such as 0.1",
    )
    p.add_argument("--hidden", type=_parse_hidden, default=[50], help="e.g. 50 or 50,50")
    p.add_argument("--bn", action="store_true", help="batch normalisation before each ReLU")
    p.add_argument(
        "--init", default="he", choices=["he", "xavier", "sigma"], help="initialisation"
    )
    p.add_argument("--sigma", type=float, default=None, help="std of init='sigma'")
    p.add_argument("--lambda", dest="l2_lambda", type=float, default=0.0, help="L2 penalty")
    p.add_argument("--schedule", default="cyclical", choices=list(SCHEDULES))
    p.add_argument("--eta", type=float, default=0.01, help="constant/step learning rate")
    p.add_argument("--eta-min", type=float, default=1e-5, help="cyclical: lowest rate")
    p.add_argument("--eta-max", type=float, default=1e-1, help="cyclical: highest rate")
    p.add_argument("--n-s", type=int, default=None, help="half-cycle steps (default 2N/B)")
    p.add_argument("--cycles", type=int, default=2, help="cyclical: cycles")
    p.add_argument("--epochs", type=int, default=10, help="constant/step schedules")
    p.add_argument("--decay", type=float, default=1.0, help="step decay factor per epoch")
    p.add_argument("--rho", type=float, default=0.0, help="momentum")
    p.add_argument("--batch-size", type=int, default=100, help="mini-batch size")
    p.add_argument("--evals-per-cycle", type=int, default=10, help="evaluation points")
    p.add_argument(
        "--train-metrics",
        default="running",
        choices=list(TRAIN_METRICS),
        help="training curve: running (the mini-batches since the last point, free) or "
        "full (an evaluation pass over the training set at every point)",
    )
    p.add_argument("--seed", type=int, default=0, help="initialisation and batch order")
    p.add_argument(
        "--out", default="runs/train", help="directory for network.npz and history.json"
    )
    p.add_argument("--quiet", action="store_true", help="no line per evaluation point")
    return p


def main(argv: list[str] | None = None, *, prog: str = "python -m model.train") -> int:
    """The command line; ``prog`` is how it was started (``c2f train``), for --help."""
    from model import data as data_mod

    parser = build_parser(prog)
    args = parser.parse_args(argv)
    # Flags that would otherwise be ignored without a word.
    if args.sigma is not None and args.init != "sigma":
        parser.error(f"--sigma is used with --init sigma only (got --init {args.init})")
    if args.n_val is not None and args.dataset == "cifar10" and args.split != "all":
        parser.error(
            f"--n-val applies to --split all (with --split {args.split} the validation set "
            "is data_batch_2)"
        )
    loaded = None
    try:
        check_out_dir(args.out, "--out")  # before the training whose network it keeps
        config = TrainConfig(
            l2_lambda=args.l2_lambda,
            batch_size=args.batch_size,
            schedule=args.schedule,
            eta=args.eta,
            eta_min=args.eta_min,
            eta_max=args.eta_max,
            n_s=args.n_s,
            n_cycles=args.cycles,
            n_epochs=args.epochs,
            decay=args.decay,
            rho=args.rho,
            evals_per_cycle=args.evals_per_cycle,
            train_metrics=args.train_metrics,
            seed=args.seed,
        )
        splits = loaded = data_mod.load(
            args.dataset, args.data_dir, split=args.split, n_val=args.n_val, seed=args.seed
        )
        net = Network(
            splits.train.d,
            args.hidden,
            splits.train.n_classes,
            batch_norm=args.bn,
            init=args.init,
            sigma=args.sigma,
            seed=args.seed,
        )
        steps = config.total_steps(splits.train.n)  # a batch larger than the set: refused
    except ValueError as exc:
        sizes = ""
        if loaded is not None and "training set" in str(exc):
            held, n = loaded.val.n, loaded.train.n + loaded.val.n
            sizes = f" ({held} of the {n} images are held out for validation; fewer: --n-val)"
        print(f"error: {exc}{sizes}", file=sys.stderr)
        return 2
    log = None if args.quiet else (lambda line: print(line, flush=True))
    print(
        f"training {args.dataset}: {splits.train.n} train / {splits.val.n} val, "
        f"network {net.d_in}-{'-'.join(map(str, net.hidden))}-{net.n_classes}"
        f"{' with BN' if net.batch_norm else ''}, {steps} steps",
        flush=True,
    )
    try:
        history = fit(net, splits, config, log=log)
    except TrainingDiverged as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
    val = net.evaluate(splits.val.X, splits.val.y, l2_lambda=config.l2_lambda)
    test = net.evaluate(splits.test.X, splits.test.y, l2_lambda=config.l2_lambda)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    net.save(out / "network.npz", config=asdict(config))
    (out / "history.json").write_text(json.dumps(history.to_dict()))
    print(f"validation accuracy {val['accuracy']:.4f}")
    print(f"test accuracy {test['accuracy']:.4f}")
    print(
        f"wrote {out / 'network.npz'}, {out / 'history.json'} (the curves, per evaluation point)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
