"""The training-function contract, ``train(hp, data, report)``, and the user's own.

Every network the service tunes is such a function: the built-in one
(:mod:`search.sweep.builtin`) or one the user wrote, named in the study's
``[model]`` table with its own keys and their defaults::

    [model]
    train = "my_net.py:train"      # a file relative to the study file, or "package.module:train"
    layout = "d_by_n"              # X as features x samples (DD2424); default "n_by_d"

    [model.params]                 # the function's own keys, searchable like any other
    n_hidden = 50

The contract
------------
``train(hp, data, report)`` is called once per trial, in a worker process.

``hp`` (a new dict each call): the trial's hyperparameters, from the study's
``[training]`` table (and ``[fine.training]`` / ``[final.training]``) with the
searched values on top, the schedule resolved for this training set:

- ``l2_lambda``, ``batch_size``, ``seed``, ``schedule``;
- cyclical schedule: ``eta_min``, ``eta_max``, ``n_s`` (half-cycle, in update
  steps), ``n_cycles``; constant or step schedule: ``eta``, ``n_epochs`` (and
  ``decay`` for "step");
- ``total_steps`` (update steps of the whole run) and ``eval_every`` (update
  steps between two calls of ``report``, as the built-in network evaluates);
- every other TrainConfig field (``rho``, ``train_eval_size``, ...);
- the function's own keys: ``[model.params]``, the stage's ``[training]`` values of
  them, the searched values on top (a list as a list); for the built-in network, the
  ``[network]`` fields instead;
- in the final run, ``out_dir``: a directory for the run's files.

``seed`` is :func:`search.sweep.objective.trial_seed`'s, as for the built-in
network (shared by a stage's search trials by default, another for each
replicate; one per ``[final] seeds`` in the final run): seed the initial weights
and the shuffling with it. Replicates are never pruned.

``data``: a :class:`Data` with ``train``, ``val`` and (in ``search.final`` only)
``test``, each a :class:`Part` with

- ``X``: float32, ``(N, d)`` with ``layout = "n_by_d"`` or ``(d, N)`` with
  ``layout = "d_by_n"``, normalised with the training set's mean and std;
- ``Y``: the labels one-hot, float32, ``(N, K)`` or ``(K, N)`` in the same layout;
- ``y``: the labels as integers ``0..K-1``, int64, ``(N,)``.

Every array is read-only. In the searches ``X`` is a memory map of the one
prepared copy every worker shares (``(d, N)`` is a transposed view of it, no
copy); writing to it raises ``ValueError``. Copy what you must change (copying
the whole of ``X`` costs each worker its own copy of the data). In the final run
``train`` is training + validation data minus a holdout (``[final] holdout``).

``report(step, val_acc, **metrics)``: call it at every evaluation point, with
``step`` the number of update steps (mini-batches) done so far, increasing,
``val_acc`` the validation accuracy and any other numbers by name
(``train_loss``, ``val_loss``, ``train_cost``, ``val_cost``, ``train_acc`` are
drawn in the report's figures; an inf or NaN metric is kept as a gap). Each call
is ``trial.report``: the dashboard's learning curve, and the pruner's decision.
When the trial should stop,
``report`` raises ``optuna.TrialPruned``: let it pass (an ``except Exception``
around your training loop catches it; re-raise it). A function that catches it
anyway is still pruned when it returns. Pruning starts after ``warmup_cycles``
cycles (epochs for the other schedules) and never happens at ``total_steps``.
A function that never calls ``report`` still runs, without pruning or curves.

The function returns the final validation accuracy, a finite number, or a dict
of final metrics holding ``val_acc``. In ``search.final`` (called once per seed,
``data.test`` given, ``data.val`` the holdout) it returns a dict holding
``val_acc`` and ``test_acc`` (and ``test_loss`` if you have it): the test set is
yours to evaluate, once, at the end.

What the service does with misbehaving code: an exception fails the trial, with
the exception (user attr ``reason``) and its traceback (``traceback``) stored on
it, and the sweep goes on; a result that is NaN, inf or not a number fails it
with the reason; a file or function that cannot be found, or that does not take
``(hp, data, report)``, is refused before any trial with a
:class:`~search.config.study.StudyDefinitionError` naming the study file and the
entry. The module is imported (once per worker process, with its directory first
on ``sys.path`` so it can import its neighbours): keep script code under
``if __name__ == "__main__":``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import importlib.util
import inspect
import math
import numbers
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import optuna
from threadpoolctl import threadpool_limits

from model.data import Dataset, Splits
from model.errors import UsageError
from model.train import METRICS, History, TrainConfig
from search.config.study import StudyDefinitionError, StudySpec
from search.sweep import builtin

UserTrain = Callable[[dict[str, Any], "Data", "Reporter"], Any]


class UserResultError(UsageError):
    """The user's function returned (or reported) something that is not a usable result."""


class FinalDiverged(RuntimeError):
    """The final run of the chosen configuration diverged (its search runs did not)."""


class UserCodeFailed(RuntimeError):
    """The user's function raised outside a trial (in ``search.final``)."""


# ----------------------------------------------------------------------------- loading

_LOADED: dict[tuple[str, str], UserTrain] = {}


def _refuse(spec: StudySpec, message: str) -> StudyDefinitionError:
    return StudyDefinitionError(spec.path, "model.train", f"{spec.model.train!r}: {message}")


def _import_file(spec: StudySpec, file: Path) -> Any:
    """The module of a file, imported once per process under a name of its own."""
    digest = hashlib.sha256(str(file).encode()).hexdigest()[:10]
    name = f"c2f_user_{file.stem}_{digest}"
    if name in sys.modules:
        return sys.modules[name]
    # As when the file is run as a script: its neighbours are importable.
    if str(file.parent) not in sys.path:
        sys.path.insert(0, str(file.parent))
    module_spec = importlib.util.spec_from_file_location(name, file)
    if module_spec is None or module_spec.loader is None:
        raise _refuse(spec, f"{file} cannot be imported as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[name] = module
    try:
        module_spec.loader.exec_module(module)
    except (Exception, SystemExit) as exc:  # a script's sys.exit() at import, too
        del sys.modules[name]
        raise _refuse(spec, f"importing {file} raised {type(exc).__name__}: {exc}") from None
    return module


def _import_module(spec: StudySpec, dotted: str) -> Any:
    if str(spec.base_dir) not in sys.path:
        sys.path.insert(0, str(spec.base_dir))
    try:
        return importlib.import_module(dotted)
    except ModuleNotFoundError as exc:
        if not (exc.name and (dotted == exc.name or dotted.startswith(exc.name + "."))):
            raise _refuse(spec, f"importing {dotted} raised ModuleNotFoundError: {exc}") from None
        raise _refuse(
            spec,
            f"no module {exc.name!r} (looked for it beside the study file and on sys.path); "
            'name a file instead: train = "my_net.py:train"',
        ) from None
    except (Exception, SystemExit) as exc:
        raise _refuse(spec, f"importing {dotted} raised {type(exc).__name__}: {exc}") from None


def load_train(spec: StudySpec) -> UserTrain:
    """The study's training function, imported and checked; cached per process.

    Raises :class:`StudyDefinitionError` (file ``spec.path``, field ``model.train``)
    when the file, the module or the function is missing, when importing it
    raises, or when it cannot be called as ``train(hp, data, report)``.
    """
    where, name = spec.model.entry()
    if where.endswith(".py"):
        file = Path(where).expanduser()
        file = (file if file.is_absolute() else spec.base_dir / file).resolve()
        key = (str(file), name)
        if key in _LOADED:
            return _LOADED[key]
        if not file.is_file():
            raise _refuse(spec, f"no file {file} (a path relative to the study file)")
        module = _import_file(spec, file)
        source = str(file)
    else:
        key = (f"{spec.base_dir}:{where}", name)
        if key in _LOADED:
            return _LOADED[key]
        module = _import_module(spec, where)
        source = f"module {where}"
    function = getattr(module, name, None)
    if function is None:
        defined = sorted(
            k
            for k, v in vars(module).items()
            if inspect.isfunction(v) and v.__module__ == module.__name__ and not k.startswith("_")
        )
        raise _refuse(spec, f"{source} has no function {name!r}; it defines {defined}")
    if not callable(function):
        raise _refuse(spec, f"{name} = {function!r} in {source} is not a function")
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):  # a builtin without a signature: trust it
        signature = None
    if signature is not None:
        try:
            signature.bind(None, None, None)
        except TypeError:
            raise _refuse(
                spec,
                f"{name}{signature} must take three arguments, train(hp, data, report); "
                "see search/sweep/user_train.py or the README",
            ) from None
    _LOADED[key] = function
    return function


def check(spec: StudySpec) -> None:
    """Refuse a study whose training function cannot be used, before any trial runs."""
    if spec.model.train:
        load_train(spec)


# ----------------------------------------------------------------------------- data


@dataclass(frozen=True, eq=False)
class Part:
    """One split as the user's function sees it (read-only arrays).

    X: float32, (N, d) in layout "n_by_d", (d, N) in layout "d_by_n".
    Y: one-hot labels, float32, (N, K) or (K, N), the same layout as X.
    y: integer labels 0..K-1, int64, (N,).
    """

    X: np.ndarray
    Y: np.ndarray
    y: np.ndarray

    @property
    def n(self) -> int:
        """Number of samples."""
        return int(self.y.shape[0])


@dataclass(frozen=True, eq=False)
class Data:
    """What the user's function trains on: ``train``, ``val`` and, in the final run, ``test``."""

    train: Part
    val: Part
    test: Part | None
    layout: str
    n_classes: int
    label_names: tuple[str, ...] = ()

    @property
    def d(self) -> int:
        """Number of features."""
        return int(self.train.X.shape[1 if self.layout == "n_by_d" else 0])


def _read_only(a: np.ndarray) -> np.ndarray:
    view = a.view()
    view.flags.writeable = False
    return view


def _part(ds: Dataset, layout: str) -> Part:
    Y = np.zeros((ds.n, ds.n_classes), dtype=np.float32)
    Y[np.arange(ds.n), ds.y] = 1.0
    if layout == "d_by_n":
        # A transposed view of the shared memory map, not a copy.
        return Part(_read_only(ds.X.T), _read_only(np.ascontiguousarray(Y.T)), _read_only(ds.y))
    return Part(_read_only(ds.X), _read_only(Y), _read_only(ds.y))


def user_data(splits: Splits, layout: str, *, test: bool) -> Data:
    """The splits in the layout the study asks for; ``test`` only when ``test`` is True."""
    return Data(
        train=_part(splits.train, layout),
        val=_part(splits.val, layout),
        test=_part(splits.test, layout) if test else None,
        layout=layout,
        n_classes=splits.train.n_classes,
        label_names=tuple(splits.train.label_names),
    )


# ----------------------------------------------------------------------------- hyperparameters


def hyperparameters(
    spec: StudySpec, stage: str, params: dict[str, Any], *, seed: int, n_train: int
) -> dict[str, Any]:
    """The ``hp`` dict of one call: the schedule resolved for ``n_train`` images (``n_s``
    and ``eval_every`` in steps, ``total_steps``), every other TrainConfig field, and the
    network's fields (the built-in network) or the function's own keys ([model.params]),
    with the searched ``params`` on top."""
    config = spec.train_config(stage, {**params, "seed": seed})
    hp: dict[str, Any] = {
        "l2_lambda": config.l2_lambda,
        "batch_size": config.batch_size,
        "seed": seed,
        "schedule": config.schedule,
    }
    if config.schedule == "cyclical":
        hp |= {
            "eta_min": config.eta_min,
            "eta_max": config.eta_max,
            "n_s": config.resolved_n_s(n_train),
            "n_cycles": config.n_cycles,
        }
    else:
        hp |= {"eta": config.eta, "n_epochs": config.n_epochs}
        if config.schedule == "step":
            hp["decay"] = config.decay
    hp["total_steps"] = config.total_steps(n_train)
    hp["eval_every"] = config.eval_interval(n_train)
    # Every other TrainConfig field, but not the rates of another schedule unless the
    # study file sets them (a cyclical run has no eta).
    other = {"cyclical": ("eta", "n_epochs", "decay")}.get(
        config.schedule, ("eta_min", "eta_max", "n_s", "n_cycles", "evals_per_cycle")
    )
    given = spec.stage_training(stage)
    for f in dataclasses.fields(config):
        if f.name != "n_s_epochs" and (f.name not in other or f.name in given):
            hp.setdefault(f.name, getattr(config, f.name))
    if spec.model.train:
        hp |= spec.own_params(stage, params)
    else:
        hp |= dataclasses.asdict(spec.network_for(params))
    return hp


def train_function(spec: StudySpec) -> UserTrain:
    """The study's ``train(hp, data, report)``: the user's (``[model] train``) or the
    built-in network's (:func:`search.sweep.builtin.train`)."""
    return load_train(spec) if spec.model.train else builtin.train


def layout_of(spec: StudySpec) -> str:
    return spec.model.layout if spec.model.train else "n_by_d"


def entry_of(spec: StudySpec) -> str:
    """The training function's name in messages."""
    return spec.model.train or "the built-in network"


# ----------------------------------------------------------------------------- report


def _number(what: str, value: Any) -> float:
    """A real number as a float; anything else is a :class:`UserResultError`."""
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Real):
        if isinstance(value, np.ndarray):
            raise UserResultError(
                f"{what} must be a number, got an array of shape {value.shape}; "
                "return float(...) of it"
            )
        raise UserResultError(f"{what} must be a number, got {value!r}")
    return float(value)


def _step(value: Any) -> int:
    if isinstance(value, bool | np.bool_) or not isinstance(value, numbers.Integral):
        raise UserResultError(f"step must be an integer (update steps done so far), got {value!r}")
    if value < 1:
        raise UserResultError(f"step must be >= 1 (update steps done so far), got {value}")
    return int(value)


class Reporter:
    """The ``report(step, val_acc, **metrics)`` callback given to the user's function.

    It keeps the curves (``step``, ``epoch``, ``eta``, ``val_acc`` and every metric
    reported; None where a metric was not given), reports each validation accuracy
    to the trial and prunes by the built-in objective's rule (the same warm-up,
    never at the last step). What it raises is remembered: :meth:`check` raises it
    again when the user's function caught it and returned.
    """

    def __init__(
        self,
        entry: str,
        config: TrainConfig,
        n_train: int,
        *,
        trial: optuna.Trial | None = None,
        window: tuple[float, int] = (math.inf, 0),
        prunes: bool = False,
        log: Callable[[str], None] | None = None,
    ) -> None:
        self.entry = entry
        self.trial = trial
        self.warmup, self.last = window
        self.prunes = prunes and trial is not None
        self.per_epoch = config.steps_per_epoch(n_train)
        self.epochs_planned = config.total_steps(n_train) / self.per_epoch
        self.schedule = config.make_schedule(n_train)
        self.log = log
        self.curves: dict[str, list[Any]] = {"step": [], "epoch": [], "eta": [], "val_acc": []}
        self.raised: Exception | None = None

    @property
    def calls(self) -> int:
        return len(self.curves["step"])

    @property
    def epochs_run(self) -> float | None:
        """Epochs up to the last report (None: never reported)."""
        return self.curves["step"][-1] / self.per_epoch if self.calls else None

    def __call__(self, step: int, val_acc: float, **metrics: float) -> None:
        if self.raised is not None:  # the function caught it and went on: stop it again
            raise self.raised
        try:
            self._report(step, val_acc, metrics)
        except Exception as exc:
            self.raised = exc
            raise

    def _report(self, step: Any, val_acc: Any, metrics: dict[str, Any]) -> None:
        # The bad value is in each reason below; not every argument, so that trials that
        # failed alike read alike (c2f status counts them as one reason).
        where = f"{self.entry} called report()"
        try:
            step = _step(step)
            if self.calls and step <= self.curves["step"][-1]:
                raise UserResultError(
                    f"steps must increase, got {step} after step {self.curves['step'][-1]}"
                )
            value = _number("val_acc", val_acc)
            if not math.isfinite(value):
                raise UserResultError(f"val_acc must be a finite number, got {value}")
            row = {
                "epoch": step / self.per_epoch,
                "eta": self.schedule.lr_at(step - 1),
                "val_acc": value,
                **{name: _number(name, v) for name, v in metrics.items()},
            }
        except UserResultError as exc:
            raise UserResultError(f"{where}: {exc}") from None
        n = self.calls
        self.curves["step"].append(step)
        for name, v in row.items():
            # A diverged loss (inf, NaN) is a gap in the curve: the curves are stored as JSON.
            self.curves.setdefault(name, [None] * n).append(v if math.isfinite(v) else None)
        for values in self.curves.values():
            if len(values) == n:  # a metric reported before, not this time
                values.append(None)
        if self.log is not None:
            extra = "".join(f" {k} {v:.4g}" for k, v in row.items() if k not in ("epoch", "eta"))
            self.log(f"step {step:>6} epoch {row['epoch']:6.2f}{extra}")
        if self.trial is not None:
            self.trial.report(value, step)
            if self.prunes and self.warmup <= step < self.last and self.trial.should_prune():
                raise optuna.TrialPruned(f"pruned at step {step}: val_acc {value:.4f}")

    def check(self) -> None:
        """Raise again what ``report`` raised, if the user's function caught it."""
        if self.raised is not None:
            raise self.raised

    def history(self, wall_time: float) -> History:
        """The curves as a :class:`model.train.History` (NaN where a metric was not reported;
        metrics beyond the built-in ones are kept too)."""
        n = self.calls
        h = History(
            step=list(self.curves["step"]),
            epoch=list(self.curves["epoch"]),
            eta=list(self.curves["eta"]),
        )
        own = ("step", "epoch", "eta", *METRICS)
        names = [*METRICS, *(k for k in self.curves if k not in own)]
        h.metrics = {
            m: [math.nan if v is None else v for v in self.curves.get(m, [None] * n)]
            for m in names
        }
        h.wall_time = wall_time
        h.epochs_run = self.epochs_run or 0.0
        return h


def parse_result(
    entry: str, result: Any, *, final: bool = False
) -> tuple[float, dict[str, float]]:
    """(val_acc, the dict's metrics) of what the user's function returned."""
    if isinstance(result, Mapping):
        if "val_acc" not in result:
            raise UserResultError(
                f"{entry} returned a dict without 'val_acc' (keys {sorted(map(str, result))}); "
                "return the final validation accuracy or a dict holding 'val_acc'"
            )
        try:
            metrics = {str(k): _number(f"{k!r}", v) for k, v in result.items()}
        except UserResultError as exc:
            raise UserResultError(f"{entry} returned a dict whose {exc}") from None
        value = metrics["val_acc"]
    else:
        try:
            value = _number("the result", result)
        except UserResultError as exc:
            raise UserResultError(
                f"{entry} returned {result!r}: {exc}; return the final validation accuracy "
                "(or a dict holding 'val_acc')"
            ) from None
        metrics = {}
    if not math.isfinite(value):
        raise UserResultError(
            f"{entry} returned val_acc={value}: not a finite number (did the training diverge? "
            "try a smaller eta or a larger lambda)"
        )
    if final and "test_acc" not in metrics:
        raise UserResultError(
            f"{entry} returned {result!r} in the final run: with data.test given it must "
            "return a dict holding 'val_acc' and 'test_acc' (and 'test_loss' if you have it)"
        )
    return value, metrics


# ----------------------------------------------------------------------------- warnings


_WARNED: set[str] = set()


def warn_once(key: str, line: str, log: Callable[[str], None]) -> None:
    if key not in _WARNED:
        _WARNED.add(key)
        log(line)


# ----------------------------------------------------------------------------- final


@dataclass
class FinalRun:
    """One final training: its curves and its results."""

    hp: dict[str, Any]
    history: History
    val_acc: float
    test: dict[str, float | None]
    metrics: dict[str, float] = field(default_factory=dict)
    wall_time: float = 0.0


def run_final(
    spec: StudySpec,
    params: dict[str, Any],
    splits: Splits,
    *,
    seed: int,
    out_dir: Path | None = None,
    log: Callable[[str], None] | None = None,
    blas_threads: int | None = 1,
) -> FinalRun:
    """Train the study's function once with the final config; ``splits.test`` is given to it.

    ``splits`` is what the final run trains on (training + validation minus the
    holdout). ``out_dir``: given to the function as ``hp["out_dir"]`` (the built-in
    network saves itself there). Exceptions of a user's function are raised as
    :class:`UserCodeFailed` (the original traceback chained); a bad result is a
    :class:`UserResultError`. ``blas_threads``: as for :func:`model.train.fit` (one by
    default, the measured choice on a shared machine; None keeps the caller's limits).
    """
    train = train_function(spec)
    entry = entry_of(spec)
    n_train = splits.train.n
    config = spec.train_config("final", {**params, "seed": seed})
    hp = hyperparameters(spec, "final", params, seed=seed, n_train=n_train)
    if out_dir is not None:
        hp["out_dir"] = str(out_dir)
    reporter = Reporter(entry, config, n_train, log=log)
    data = user_data(splits, layout_of(spec), test=True)
    limit = (
        contextlib.nullcontext()
        if blas_threads is None
        else threadpool_limits(limits=blas_threads, user_api="blas")
    )
    t0 = time.perf_counter()
    try:
        with limit:
            result = train(dict(hp), data, reporter)
        reporter.check()
    except UserResultError:
        raise
    except (Exception, SystemExit) as exc:  # a sys.exit() in the function must not end final
        import traceback

        from search.sweep.standing import raised_at

        where = raised_at("".join(traceback.format_exception(exc)))
        at = f" (at {where})" if where else ""
        raise UserCodeFailed(
            f"{entry} raised {type(exc).__name__}: {exc}{at}; fix it and run final again"
        ) from exc
    wall = time.perf_counter() - t0
    value, metrics = parse_result(entry, result, final=True)
    return FinalRun(
        hp=hp,
        history=reporter.history(wall),
        val_acc=value,
        test={"accuracy": metrics["test_acc"], "loss": metrics.get("test_loss")},
        metrics=metrics,
        wall_time=wall,
    )
