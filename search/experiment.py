"""The DD2424 experiments as grid studies: ``python -m search.experiment FILE``.

An experiment file (``studies/experiments/*.toml``) is a study file plus two tables::

    [experiment]  kind = "curves" | "lambda" | "overfit", title, n_train, n_s_epochs
    [grid]        parameter = [values, ...]   (network fields or TrainConfig fields)

Every point of the grid (the product of the lists) is one trial of one Optuna
study, ``<name>-grid``, in the study file's storage; the dashboard shows them
like any sweep. The command queues one WAITING trial per grid point that is not
finished or queued yet and runs the queue, so a killed run resumes where it
stopped and a finished experiment trains nothing when run again. Each trial
stores the curves, wall time, epochs, whether it diverged, and the test
accuracy ("test_acc") of the trained network.

- ``n_train``: train on the first this-many training images (the overfitting check).
- ``n_s_epochs``: the half-cycle n_s = n_s_epochs * floor(N_train / batch_size), so
  one file keeps the assignment's n_s on whatever data it runs on.

The same file runs on other data without editing: ``--cifar DIR`` (CIFAR-10,
split "all", a tenth of the images, at most 5,000, for validation unless
``--n-val``), or ``--dataset``,
``--data-dir``, ``--split``, ``--n-val``; ``--n-s`` fixes n_s. Runs on other data
belong in another database (``--storage``): a study refuses data it was not
created with.

For the report: :func:`draw` (a markdown section and PNGs per experiment),
:func:`list_experiments`, :func:`gradcheck_section`.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import hashlib
import itertools
import json
import math
import os
import sys
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, cast

import optuna
from optuna.distributions import BaseDistribution, CategoricalDistribution, FloatDistribution
from optuna.trial import TrialState

from model.data import Dataset, Splits, cifar10_train_size
from model.train import TrainConfig
from search import study as st
from search.cli import guarded
from search.objective import build_network, fit_and_record
from search.prepared import Prepared
from search.spec import NetworkSpec, StudyDefinitionError, StudySpec, parse_spec, read_toml
from search.storage import sqlite_path, with_retries

KINDS = ("curves", "lambda", "overfit")
STAGE = "grid"
NETWORK_FIELDS = tuple(f.name for f in fields(NetworkSpec))
TRAIN_FIELDS = tuple(f.name for f in fields(TrainConfig))
EXPERIMENT_KEYS = ("kind", "title", "n_train", "n_s_epochs")
# The networks of the gradient check: the same as tests/model/test_network.py.
GRADCHECK_HIDDEN = {2: [50], 3: [50, 50], 4: [50, 30, 20], 9: [50, 30, 20, 20, 10, 10, 10, 10]}
GRADCHECK_LAMBDA = 0.01

# Grid parameters drawn (and given to Optuna) on a log scale.
LOG_SCALE = ("l2_lambda", "sigma", "eta", "eta_min", "eta_max")


# ----------------------------------------------------------------------------- the file


@dataclass(frozen=True, eq=False)
class Experiment:
    """A validated experiment file: the study it runs in and the grid it walks.

    ``raw`` is the study document without ``[grid]`` and ``[experiment]`` (with any
    command-line overrides); each grid point is merged into it and validated by
    :func:`search.spec.parse_spec`, so a point is checked like a study file.
    """

    spec: StudySpec
    raw: dict[str, Any]
    grid: dict[str, list[Any]]
    kind: str = "curves"
    title: str = ""
    n_train: int | None = None
    n_s_epochs: float | None = None

    @property
    def name(self) -> str:
        return self.spec.name

    @property
    def study_name(self) -> str:
        return st.study_name(self.spec, STAGE)

    def points(self) -> list[dict[str, Any]]:
        """Every combination of the grid values, in file order (one point if no grid)."""
        return grid_points(self.grid)

    def distributions(self) -> dict[str, BaseDistribution]:
        """Optuna distributions of the encoded grid values.

        Float grids become float distributions (log for lambda, sigma and the
        learning rates, so the dashboard draws them on log axes; by name, not by
        the values, because a study refuses a parameter whose log setting changes
        when the grid is edited); the rest are categorical, hidden sizes as strings
        like "50-50".
        """
        out: dict[str, BaseDistribution] = {}
        for name, values in self.grid.items():
            encoded = [encode(name, v) for v in values]
            if len(encoded) > 1 and all(type(v) is float for v in encoded):
                lo, hi = min(encoded), max(encoded)
                out[name] = FloatDistribution(lo, hi, log=name in LOG_SCALE and lo > 0)
            else:
                out[name] = CategoricalDistribution(encoded)
        return out

    def params(self, point: dict[str, Any]) -> dict[str, Any]:
        """A grid point as trial params (encoded)."""
        return {name: encode(name, v) for name, v in point.items()}

    def point(self, params: dict[str, Any]) -> dict[str, Any]:
        """Trial params back to a grid point (decoded), in grid order."""
        return {name: decode(name, params[name]) for name in self.grid if name in params}

    def spec_for(self, point: dict[str, Any]) -> StudySpec:
        """The study spec of one grid point: its values merged into [network]/[training]."""
        return parse_spec(merge(self.raw, point), self.spec.path)

    def train_config(self, point: dict[str, Any], n_train: int, *, seed: int) -> TrainConfig:
        """The point's TrainConfig; n_s from n_s_epochs and the training set size."""
        extra: dict[str, Any] = {"seed": seed}
        if self.n_s_epochs is not None and "n_s" not in point:
            batch = self.spec_for(point).train_config("coarse").batch_size
            extra["n_s"] = max(1, int(self.n_s_epochs * (n_train // batch)))
        return self.spec_for(point).train_config("coarse", extra)


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The product of the grid's value lists as dicts, in file order."""
    combos = itertools.product(*grid.values())
    return [dict(zip(grid, combo, strict=True)) for combo in combos]


def encode(name: str, value: Any) -> Any:
    """A grid value as an Optuna parameter value (hidden sizes: "50-30-20")."""
    if name == "hidden":
        return "-".join(str(h) for h in value)
    return value


def decode(name: str, value: Any) -> Any:
    if name == "hidden":
        return tuple(int(h) for h in str(value).split("-"))
    return value


def merge(raw: dict[str, Any], point: dict[str, Any]) -> dict[str, Any]:
    """The study document with a grid point's values put in [network] or [training]."""
    doc = copy.deepcopy(raw)
    for name, value in point.items():
        section = "network" if name in NETWORK_FIELDS else "training"
        doc.setdefault(section, {})[name] = list(value) if name == "hidden" else value
    return doc


def _check_grid(path: Path, raw: dict[str, Any], grid_raw: Any) -> dict[str, list[Any]]:
    if not isinstance(grid_raw, dict):
        raise StudyDefinitionError(path, "grid", f"must be a table, got {grid_raw!r}")
    grid: dict[str, list[Any]] = {}
    for name, values in grid_raw.items():
        where = f"grid.{name}"
        if name not in NETWORK_FIELDS + TRAIN_FIELDS:
            raise StudyDefinitionError(
                path,
                where,
                f"is not a parameter; allowed: network fields {list(NETWORK_FIELDS)} "
                f"or training fields {list(TRAIN_FIELDS)}",
            )
        section = "network" if name in NETWORK_FIELDS else "training"
        if name in raw.get(section, {}):
            raise StudyDefinitionError(
                path, where, f"is also set in [{section}]; keep it in one place"
            )
        if not isinstance(values, list) or not values:
            raise StudyDefinitionError(path, where, f"must be a non-empty list, got {values!r}")
        if name == "hidden":
            if not all(isinstance(v, list) and v for v in values):
                raise StudyDefinitionError(
                    path, where, f"must be a list of lists of layer sizes, got {values!r}"
                )
            values = [tuple(v) for v in values]
        elif not all(isinstance(v, bool | int | float | str) for v in values):
            raise StudyDefinitionError(path, where, f"values must be scalars, got {values!r}")
        if len(set(values)) != len(values):
            raise StudyDefinitionError(path, where, f"has repeated values: {values!r}")
        grid[name] = values
    return grid


def _check_experiment(path: Path, table: Any) -> dict[str, Any]:
    if not isinstance(table, dict):
        raise StudyDefinitionError(path, "experiment", f"must be a table, got {table!r}")
    unknown = sorted(set(table) - set(EXPERIMENT_KEYS))
    if unknown:
        raise StudyDefinitionError(
            path, "experiment", f"unknown keys {unknown}; allowed: {list(EXPERIMENT_KEYS)}"
        )
    kind = table.get("kind", "curves")
    if kind not in KINDS:
        raise StudyDefinitionError(
            path, "experiment.kind", f"must be one of {list(KINDS)}, got {kind!r}"
        )
    n_train = table.get("n_train")
    if n_train is not None and (
        not isinstance(n_train, int) or isinstance(n_train, bool) or n_train < 1
    ):
        raise StudyDefinitionError(
            path, "experiment.n_train", f"must be an integer >= 1, got {n_train!r}"
        )
    n_s_epochs = table.get("n_s_epochs")
    if n_s_epochs is not None and (
        not isinstance(n_s_epochs, int | float) or isinstance(n_s_epochs, bool) or n_s_epochs <= 0
    ):
        raise StudyDefinitionError(
            path, "experiment.n_s_epochs", f"must be a number > 0, got {n_s_epochs!r}"
        )
    title = table.get("title", "")
    if not isinstance(title, str):
        raise StudyDefinitionError(path, "experiment.title", f"must be a string, got {title!r}")
    return {"kind": kind, "title": title, "n_train": n_train, "n_s_epochs": n_s_epochs}


def load_experiment(
    path: str | Path,
    *,
    data: dict[str, Any] | None = None,
    n_s: int | None = None,
    storage: str | None = None,
    workers: int | None = None,
) -> Experiment:
    """Read and validate an experiment file, with optional overrides.

    ``data`` replaces keys of [data] (name, dir, split, n_val); ``n_s`` fixes the
    half-cycle (and turns n_s_epochs off); ``storage``/``workers`` as in [optuna].
    """
    path = Path(path)
    raw = read_toml(path, missing="no such file; see studies/experiments/")
    grid_raw = raw.pop("grid", {})
    options = _check_experiment(path, raw.pop("experiment", {}))
    if data:
        raw["data"] = {**raw.get("data", {}), **data}
        if raw["data"].get("name") != "cifar10":
            raw["data"].pop("split", None)
    grid = _check_grid(path, raw, grid_raw)
    if n_s is not None:
        if "n_s" in grid:
            raise ValueError(f"--n-s {n_s} conflicts with the grid over n_s in {path}")
        raw.setdefault("training", {})["n_s"] = n_s
        options["n_s_epochs"] = None
    if options["n_s_epochs"] is not None and "n_s" in raw.get("training", {}):
        raise StudyDefinitionError(
            path, "experiment.n_s_epochs", "n_s is also set in [training]; keep one"
        )
    if options["kind"] == "lambda" and "l2_lambda" not in grid:
        raise StudyDefinitionError(
            path, "experiment.kind", "kind = 'lambda' needs l2_lambda in [grid]"
        )
    points = grid_points(grid)
    for point in points:
        try:
            parse_spec(merge(raw, point), path)
        except StudyDefinitionError as exc:
            raise StudyDefinitionError(path, "grid", f"at point {point}: {exc}") from None
    spec = parse_spec(merge(raw, points[0]), path).with_overrides(storage=storage, workers=workers)
    return Experiment(spec=spec, raw=raw, grid=grid, **options)


def list_experiments(root: Path) -> list[Path]:
    """The experiment files under ``root`` (``studies/experiments``), sorted."""
    return sorted(Path(root).glob("*.toml"))


# ----------------------------------------------------------------------------- running


class _QueueGridSampler(optuna.samplers.GridSampler):
    """GridSampler whose grid is walked through the trial queue, not ``study.optimize``.

    GridSampler calls ``study.stop()`` once the grid is covered, which raises
    outside ``optimize``; here the empty queue is what ends a run.
    """

    def after_trial(self, study, trial, state, values) -> None:  # noqa: ANN001
        return None


def check_grid_change(experiment: Experiment, study: optuna.Study) -> None:
    """Refuse a grid whose categorical choices changed since the study ran.

    Optuna fixes a categorical parameter's choices in a study once a trial used
    them; the new points would all fail. Float grids may change freely.
    """
    recorded = study.user_attrs.get("experiment", {}).get("grid", {})
    used = {k for t in study.get_trials(deepcopy=False) for k in t.params}
    for name, dist in experiment.distributions().items():
        if not isinstance(dist, CategoricalDistribution) or name not in used:
            continue
        before = recorded.get(name)
        if before is not None and list(before) != list(dist.choices):
            raise ValueError(
                f"{experiment.spec.path}: [grid] {name} was {before} when study "
                f"{study.study_name} ran and is {list(dist.choices)} now; a study cannot "
                f"change the choices of {name!r}. Run the changed grid in another database "
                "(--storage sqlite:///path/other.db) or under another name"
            )


def open_study(experiment: Experiment, storage=None) -> optuna.Study:  # noqa: ANN001
    """Create the experiment's study, or load it (``load_if_exists``)."""
    storage = storage if storage is not None else st.storage_for(experiment.spec)
    search_space = {k: [encode(k, v) for v in vs] for k, vs in experiment.grid.items()}
    return with_retries(
        lambda: optuna.create_study(
            storage=storage,
            study_name=experiment.study_name,
            direction="maximize",
            sampler=_QueueGridSampler(search_space, seed=experiment.spec.optuna.seed),
            pruner=optuna.pruners.NopPruner(),
            load_if_exists=True,
        )
    )


def _key(params: dict[str, Any]) -> tuple:
    return tuple(sorted(params.items()))


def _trial_params(t: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """A trial's params, or for a WAITING one the params it was queued with."""
    return t.params or t.system_attrs.get("fixed_params", {})


def queue_grid(study: optuna.Study, experiment: Experiment) -> int:
    """Queue one WAITING trial per grid point not finished, running or queued; returns how many.

    Failed trials (an exception, not a divergence) do not count: their point is queued again.
    """
    have = {
        _key(_trial_params(t))
        for t in study.get_trials(deepcopy=False)
        if t.state in st.FINISHED + st.LIVE
    }
    queued = 0
    for point in experiment.points():
        params = experiment.params(point)
        if _key(params) in have:
            continue
        study.enqueue_trial(params)
        have.add(_key(params))
        queued += 1
    # The target counts finished trials, and trials of points since removed from
    # the grid stay finished: count them in, or the new points would never run.
    grid = {_key(experiment.params(p)) for p in experiment.points()}
    off_grid = sum(
        _key(t.params) not in grid for t in study.get_trials(deepcopy=False, states=st.FINISHED)
    )
    study.set_user_attr("target", len(grid) + off_grid)
    return queued


def restrict(splits: Splits, n_train: int | None) -> Splits:
    """The splits with the training set cut to its first ``n_train`` samples."""
    if n_train is None:
        return splits
    train = splits.train
    if n_train > train.n:
        raise ValueError(f"n_train={n_train} exceeds the {train.n} training samples")
    cut = Dataset(train.X[:n_train], train.y[:n_train], train.n_classes, train.label_names)
    return Splits(cut, splits.val, splits.test)


class GridObjective:
    """``GridObjective(experiment, splits)(trial) -> final validation accuracy``.

    The trial's params are a grid point; the network and TrainConfig come from the
    point merged into the study file. Every point uses the same seed, so the grid
    compares settings, not initialisations. A diverged run ends PRUNED with
    ``diverged`` set; a finished one also stores ``test_acc`` and ``test_loss``.
    """

    def __init__(self, experiment: Experiment, splits: Splits) -> None:
        self.experiment = experiment
        self.splits = restrict(splits, experiment.n_train)

    def __call__(self, trial: optuna.Trial) -> float:
        exp = self.experiment
        params: dict[str, Any] = {}
        for name, dist in exp.distributions().items():
            if isinstance(dist, FloatDistribution):
                params[name] = trial.suggest_float(name, dist.low, dist.high, log=dist.log)
            else:
                # distributions() makes only float and categorical distributions.
                choices = cast(CategoricalDistribution, dist).choices
                params[name] = trial.suggest_categorical(name, choices)
        point = exp.point(params)
        spec = exp.spec_for(point)
        seed = exp.spec.optuna.seed
        n_train = self.splits.train.n
        config = exp.train_config(point, n_train, seed=seed)
        net = build_network(spec, self.splits, seed)
        trial.set_user_attr("config", dataclasses.asdict(config))
        trial.set_user_attr("n_train", n_train)

        def on_evaluate(step: int, metrics: dict[str, float]) -> None:
            trial.report(metrics["val_acc"], step)

        history = fit_and_record(trial, net, self.splits, config, on_evaluate=on_evaluate)
        test = net.evaluate(self.splits.test.X, self.splits.test.y, l2_lambda=config.l2_lambda)
        if math.isfinite(test["accuracy"]):
            trial.set_user_attr("test_acc", float(test["accuracy"]))
            trial.set_user_attr("test_loss", float(test["loss"]))
        value = history.final["val_acc"]
        return value if math.isfinite(value) else 0.0


@dataclass(frozen=True, eq=False)
class _Job:
    """What one worker process needs (picklable)."""

    experiment: Experiment
    prepared_path: str
    checksum: str
    threads: int


def _worker(job: _Job) -> int:
    from threadpoolctl import threadpool_limits

    with threadpool_limits(limits=job.threads):
        prepared = Prepared(Path(job.prepared_path), job.checksum)
        study = open_study(job.experiment)
        return st.run_trials(study, GridObjective(job.experiment, prepared.open()))


def prepare_data(experiment: Experiment, *, log=print) -> Prepared:
    return st.prepare_for(experiment.spec, log=log)


def run(experiment: Experiment, *, log=print) -> optuna.Study:
    """Queue the missing grid points and run them with ``spec.optuna.workers`` processes."""
    spec = experiment.spec
    prepared = prepare_data(experiment, log=log)
    study = open_study(experiment)
    try:
        st.record_data(study, prepared)
    except st.DataMismatchError as exc:
        raise st.DataMismatchError(
            f"{exc}. To run this experiment on other data, give it its own database: "
            "--storage sqlite:///runs/experiments-<data>.db"
        ) from None
    check_grid_change(experiment, study)
    splits = prepared.open()
    cut = restrict(splits, experiment.n_train)
    study.set_user_attr(
        "experiment",
        {
            "kind": experiment.kind,
            "title": experiment.title,
            "file": str(spec.path),
            "dataset": spec.data.name,
            "n_train": cut.train.n,
            "n_val": cut.val.n,
            "n_test": cut.test.n,
            "grid": {k: [encode(k, v) for v in vs] for k, vs in experiment.grid.items()},
        },
    )
    queued = queue_grid(study, experiment)
    total = len(experiment.points())
    c = st.counts(study)
    # No more workers than trials to run: each extra one would only start up and leave.
    workers = max(1, min(spec.optuna.workers, c["WAITING"]))
    log(
        f"experiment {experiment.name}: study {study.study_name} in {spec.storage_url()}: "
        f"{total} grid points, {c['COMPLETE'] + c['PRUNED']} finished, {queued} newly queued, "
        f"{workers} worker(s), data {spec.data.name} ({cut.train.n} train / {cut.val.n} val / "
        f"{cut.test.n} test)"
    )
    progress = st.Progress(study, total)
    try:
        if c["WAITING"] + c["RUNNING"] == 0:
            return study
        _run_workers(experiment, prepared, splits, study, workers=workers, progress=progress)
    finally:
        progress()
        progress.close()
    return study


def _run_workers(
    experiment: Experiment,
    prepared: Prepared,
    splits: Splits,
    study: optuna.Study,
    *,
    workers: int,
    progress: st.Progress,
) -> None:
    from threadpoolctl import threadpool_limits

    threads = max(1, (os.cpu_count() or 1) // workers)
    if workers == 1:
        with threadpool_limits(limits=threads):
            st.run_trials(study, GridObjective(experiment, splits), on_trial_end=progress)
        return
    import threading

    from joblib import Parallel, delayed

    job = _Job(experiment, str(prepared.path), prepared.checksum, threads)
    done = threading.Event()
    errors: list[BaseException] = []

    def go() -> None:
        try:
            Parallel(n_jobs=workers, backend="loky")(delayed(_worker)(job) for _ in range(workers))
        except BaseException as exc:  # noqa: BLE001 - re-raised in the main thread
            errors.append(exc)
        finally:
            done.set()

    threading.Thread(target=go, daemon=True).start()
    while not done.wait(1.0):
        progress()
    if errors:
        raise errors[0]


# ----------------------------------------------------------------------------- results


@dataclass(frozen=True)
class Row:
    """One grid point and its finished trial (None if it has not run)."""

    point: dict[str, Any]
    trial: optuna.trial.FrozenTrial | None


def results(
    spec_path: str | Path, *, storage: str | None = None
) -> tuple[Experiment, optuna.Study, list[Row]]:
    """The experiment, its study and its grid points with their finished trials.

    Raises LookupError if the study is missing or has no finished trial.
    """
    experiment = load_experiment(spec_path, storage=storage)
    study = _finished_study(experiment, spec_path)
    return experiment, study, rows(experiment, study)


def _finished_study(experiment: Experiment, spec_path: str | Path) -> optuna.Study:
    hint = (
        f"experiment {experiment.name} has not been run; "
        f"run: python -m search.experiment {spec_path}"
    )
    url = experiment.spec.storage_url()
    db = sqlite_path(url)
    if db is not None and not db.exists():
        raise LookupError(hint)
    storage = st.storage_for(experiment.spec)
    names = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    if experiment.study_name not in names:
        raise LookupError(hint)
    study = optuna.load_study(study_name=experiment.study_name, storage=storage)
    if not study.get_trials(deepcopy=False, states=st.FINISHED):
        raise LookupError(hint)
    return study


def rows(experiment: Experiment, study: optuna.Study) -> list[Row]:
    """The grid points in file order, each with its latest finished trial."""
    by_key: dict[tuple, optuna.trial.FrozenTrial] = {}
    for t in study.get_trials(deepcopy=False, states=st.FINISHED):
        by_key[_key(t.params)] = t
    return [
        Row(point, by_key.get(_key(experiment.params(point)))) for point in experiment.points()
    ]


def label(name: str, value: Any) -> str:
    """A grid value as a legend label: "BN", "3-layer 50-50", "σ=1e-04", "ρ=0.9"."""
    if name == "batch_norm":
        return "BN" if value else "no BN"
    if name == "hidden":
        return f"{len(value) + 1}-layer {'-'.join(map(str, value))}"
    symbol = {"sigma": "σ", "l2_lambda": "λ", "rho": "ρ", "eta": "η", "eta_max": "η_max"}
    if isinstance(value, float):
        return f"{symbol.get(name, name)}={value:.3g}"
    return f"{symbol.get(name, name)}={value}"


def _cell(name: str, value: Any) -> str:
    if name == "batch_norm":
        return "yes" if value else "no"
    if name == "hidden":
        return "-".join(map(str, value))
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def _fmt(value: Any, spec: str) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "–"
    if isinstance(value, float) and abs(value) >= 1e4:
        return format(value, ".3g")  # a diverged loss: 6.7e+22, not 23 digits
    return format(value, spec)


def table(experiment: Experiment, table_rows: list[Row]) -> str:
    """A markdown table: grid params, final train/val loss, val and test accuracy, epochs."""
    names = list(experiment.grid)
    head = [*names, "train loss", "val loss", "train acc", "val acc", "test acc", "epochs"]
    head += ["diverged", "time s"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for row in table_rows:
        cells = [_cell(n, row.point[n]) for n in names]
        t = row.trial
        if t is None:
            cells += ["not run"] + [""] * (len(head) - len(names) - 1)
        else:
            curves = t.user_attrs.get("curves") or {}
            last = {m: (curves.get(m) or [None])[-1] for m in ("train_loss", "val_loss")}
            last |= {m: (curves.get(m) or [None])[-1] for m in ("train_acc", "val_acc")}
            diverged = bool(t.user_attrs.get("diverged"))
            cells += [
                _fmt(last["train_loss"], ".4f"),
                _fmt(last["val_loss"], ".4f"),
                _fmt(last["train_acc"], ".4f"),
                _fmt(last["val_acc"], ".4f"),
                _fmt(t.user_attrs.get("test_acc"), ".4f"),
                _fmt(t.user_attrs.get("epochs_run"), ".1f"),
                "**yes**" if diverged else "no",
                _fmt(t.user_attrs.get("wall_time"), ".1f"),
            ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def draw(
    spec_path: str | Path, out_dir: Path, *, storage: str | None = None
) -> tuple[str, list[Path]]:
    """A markdown section (a table of the grid points) and the PNGs of one experiment.

    Raises LookupError if the experiment's study is missing or has no finished trial.
    """
    experiment, study, table_rows = results(spec_path, storage=storage)
    info = study.user_attrs.get("experiment", {})
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    title = experiment.title or experiment.name
    data_note = ""
    if info:
        data_note = (
            f"{info['dataset']}, {info['n_train']} training / {info['n_val']} validation / "
            f"{info['n_test']} test images"
        )
    if experiment.kind == "lambda":
        paths = [_draw_lambda(experiment, table_rows, out_dir, title, data_note)]
    elif experiment.kind == "overfit":
        paths = [_draw_overfit(experiment, table_rows, out_dir, title, data_note)]
    else:
        paths = [_draw_curves(experiment, table_rows, out_dir, title, data_note)]
    missing = sum(r.trial is None for r in table_rows)
    lines = [
        f"### {title}",
        "",
        f"`{Path(spec_path).name}`: study `{experiment.study_name}`"
        + (f", {data_note}" if data_note else "")
        + f"; {len(table_rows) - missing} of {len(table_rows)} grid points run.",
        "",
        table(experiment, table_rows),
        "",
    ]
    lines += [f"![{title}]({p.name})" for p in paths]
    return "\n".join(lines) + "\n", paths


def _curves(row: Row) -> dict[str, list[float]] | None:
    if row.trial is None:
        return None
    curves = row.trial.user_attrs.get("curves")
    return curves if curves and curves.get("step") else None


def _line_label(experiment: Experiment, row: Row, names: list[str]) -> str:
    text = ", ".join(label(n, row.point[n]) for n in names) or experiment.name
    if row.trial is not None and row.trial.user_attrs.get("diverged"):
        text += " (diverged)"
    return text


# A cross-entropy above this many nats (p_y < 2e-9) means training blew up, even
# when the numbers stayed finite and the run was not stopped as diverged.
BLOWN_UP_LOSS = 20.0


def _diverged(row: Row) -> bool:
    return row.trial is not None and bool(row.trial.user_attrs.get("diverged"))


def _blown_up(row: Row) -> bool:
    """Diverged, or a finite loss so large that it would squash every other curve."""
    c = _curves(row)
    if _diverged(row) or c is None:
        return _diverged(row)
    losses = [v for v in list(c["train_loss"]) + list(c["val_loss"]) if math.isfinite(v)]
    return len(losses) < len(c["train_loss"]) + len(c["val_loss"]) or max(losses) > BLOWN_UP_LOSS


def _clip_to_sound_runs(ax, sound: list[float], everything: list[float]) -> None:  # noqa: ANN001
    """Keep the y axis on the runs that did not diverge.

    A diverged run's loss reaches 1e15 and would flatten every other curve to a
    line at zero; its points above the axis are cut off (its marker says where it
    stopped) and the axis says so.
    """
    finite = [v for v in sound if math.isfinite(v)]
    if not finite:
        return
    top = max(finite) * 1.15
    if any(not math.isfinite(v) or v > top for v in everything):
        ax.set_ylim(bottom=min(0.0, min(finite)), top=top)
        ax.text(
            0.99, 0.98, "blown-up runs cut off (x: last point)", transform=ax.transAxes,
            ha="right", va="top", fontsize=7, color="0.35",
        )  # fmt: skip


def _draw_curves(
    experiment: Experiment, table_rows: list[Row], out_dir: Path, title: str, note: str
) -> Path:
    """Rows of panels (loss, cost, accuracy vs update step), one line per grid point.

    batch_norm (or else the first grid parameter) varies along the lines of a panel;
    each value of the other grid parameters gets its own row of panels.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(experiment.grid)
    line_param = "batch_norm" if "batch_norm" in names else (names[0] if names else None)
    row_params = [n for n in names if n != line_param]
    groups: dict[tuple, list[Row]] = {}
    for r in table_rows:
        groups.setdefault(tuple(r.point[n] for n in row_params), []).append(r)
    panels = [
        ("loss", "train_loss", "val_loss", "cross-entropy loss"),
        ("cost", "train_cost", "val_cost", "cost (loss + λ ΣW²)"),
        ("accuracy", "train_acc", "val_acc", "accuracy (fraction correct)"),
    ]
    fig, axes = plt.subplots(
        len(groups), 3, figsize=(15, 3.8 * len(groups)), squeeze=False, constrained_layout=True
    )
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (key, group) in enumerate(groups.items()):
        prefix = ", ".join(label(n, v) for n, v in zip(row_params, key, strict=True))
        for j, (what, train_key, val_key, ylabel) in enumerate(panels):
            ax = axes[i, j]
            sound: list[float] = []
            everything: list[float] = []
            for k, r in enumerate(group):
                c = _curves(r)
                if c is None:
                    continue
                color = colors[k % len(colors)]
                text = _line_label(experiment, r, [line_param] if line_param else [])
                # Markers: a run that diverged after one evaluation is one point, not a line.
                style = {"color": color, "marker": ".", "markersize": 4}
                ax.plot(c["step"], c[train_key], "-", label=f"{text} train", **style)
                ax.plot(c["step"], c[val_key], "--", label=f"{text} val", **style)
                values = list(c[train_key]) + list(c[val_key])
                everything += values
                if _blown_up(r):
                    finite = [
                        (s_, v) for s_, v in zip(c["step"], c[train_key], strict=True)
                        if math.isfinite(v)
                    ]  # fmt: skip
                    if finite:
                        ax.plot(*finite[-1], "x", color=color, markersize=10, mew=2)
                else:
                    sound += values
            if what != "accuracy":
                _clip_to_sound_runs(ax, sound, everything)
            else:
                ax.set_ylim(0.0, 1.02)
            ax.set_title(f"{prefix}: {what}" if prefix else what)
            ax.set_xlabel("update step")
            ax.set_ylabel(ylabel)
            ax.grid(alpha=0.3)
            if ax.lines:
                ax.legend(fontsize=7, ncol=2 if len(ax.lines) > 4 else 1)
    fig.suptitle(f"{title}\n{note}" if note else title)
    path = out_dir / f"{experiment.name}_curves.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _draw_lambda(
    experiment: Experiment, table_rows: list[Row], out_dir: Path, title: str, note: str
) -> Path:
    """Final validation (and test) accuracy and losses against lambda, log x axis."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    others = [n for n in experiment.grid if n != "l2_lambda"]
    series: dict[tuple, list[Row]] = {}
    for r in table_rows:
        series.setdefault(tuple(r.point[n] for n in others), []).append(r)
    fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(13, 4.5), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    sound: list[float] = []
    everything: list[float] = []
    for k, (key, group) in enumerate(series.items()):
        color = colors[k % len(colors)]
        text = ", ".join(label(n, v) for n, v in zip(others, key, strict=True)) or experiment.name
        done = [r for r in group if _curves(r) is not None]
        for r in done:
            curves = cast(dict[str, list[float]], _curves(r))  # not None: filtered above
            losses = [curves["train_loss"][-1], curves["val_loss"][-1]]
            everything += losses
            if not _blown_up(r):
                sound += losses
        # Diverged runs at their last validation accuracy, or at 0 if they diverged
        # before the first evaluation: a gap in the line would hide them.
        bad = [r for r in group if _diverged(r)]
        if bad:
            ax_acc.plot(
                [r.point["l2_lambda"] for r in bad],
                [(_curves(r) or {"val_acc": [0.0]})["val_acc"][-1] for r in bad],
                "x", color=color, markersize=11, mew=2, label=f"{text} diverged",
            )  # fmt: skip
        lam = [r.point["l2_lambda"] for r in done]
        # A row in done has curves, so it has a trial.
        val = [cast(dict[str, list[float]], _curves(r))["val_acc"][-1] for r in done]
        test = [
            cast(optuna.trial.FrozenTrial, r.trial).user_attrs.get("test_acc", float("nan"))
            for r in done
        ]
        ax_acc.plot(lam, val, "o-", color=color, label=f"{text} validation")
        ax_acc.plot(lam, test, "s--", color=color, alpha=0.7, label=f"{text} test")
        ax_loss.plot(
            lam,
            [cast(dict[str, list[float]], _curves(r))["train_loss"][-1] for r in done],
            "o-",
            color=color,
            label=f"{text} train",
        )
        ax_loss.plot(
            lam,
            [cast(dict[str, list[float]], _curves(r))["val_loss"][-1] for r in done],
            "s--",
            color=color,
            label=f"{text} validation",
        )
    _clip_to_sound_runs(ax_loss, sound, everything)
    for ax, ylabel, what in (
        (ax_acc, "accuracy at the end of training (fraction)", "accuracy"),
        (ax_loss, "cross-entropy loss at the end of training", "loss"),
    ):
        ax.set_xscale("log")
        ax.set_xlabel("λ (L2 regularisation strength, log scale)")
        ax.set_ylabel(ylabel)
        ax.set_title(f"final {what} against λ")
        ax.grid(alpha=0.3, which="both")
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(f"{title}\n{note}" if note else title)
    path = out_dir / f"{experiment.name}_lambda.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


def _draw_overfit(
    experiment: Experiment, table_rows: list[Row], out_dir: Path, title: str, note: str
) -> Path:
    """Training (and validation) loss and accuracy vs update step, one line per point."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = list(experiment.grid)
    fig, (ax_loss, ax_acc) = plt.subplots(1, 2, figsize=(13, 4.5), constrained_layout=True)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for k, r in enumerate(table_rows):
        c = _curves(r)
        if c is None:
            continue
        color = colors[k % len(colors)]
        text = _line_label(experiment, r, names)
        for ax, metric in ((ax_loss, "loss"), (ax_acc, "acc")):
            ax.plot(c["step"], c[f"train_{metric}"], "-", color=color, label=f"{text} train")
            ax.plot(c["step"], c[f"val_{metric}"], "--", color=color, label=f"{text} val")
    ax_loss.set_yscale("log")
    ax_loss.set_ylabel("cross-entropy loss (log scale)")
    ax_acc.set_ylabel("accuracy (fraction correct)")
    for ax, what in ((ax_loss, "loss"), (ax_acc, "accuracy")):
        ax.set_xlabel("update step")
        ax.set_title(f"{what} on the {experiment.n_train or 'all'} training images and validation")
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=8)
    fig.suptitle(f"{title}\n{note}" if note else title)
    path = out_dir / f"{experiment.name}_overfit.png"
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return path


# ----------------------------------------------------------------------------- gradient check


def gradcheck_section(out_dir: Path | None = None) -> str:
    """A markdown table of the gradient check: max relative error per layer and parameter.

    For the 2-, 3-, 4- and 9-layer networks of tests/model/test_network.py, with and
    without batch norm (float64, random data). Takes ~30 s; with ``out_dir`` the
    errors are cached in ``out_dir/gradcheck.json`` and reused.
    """
    from model.gradcheck import check_network

    # The code under test is part of the key: a cached table must not outlive a change.
    code = hashlib.sha256()
    for name in ("layers.py", "network.py", "gradcheck.py"):
        code.update((Path(__file__).resolve().parents[1] / "model" / name).read_bytes())
    settings = {
        "hidden": GRADCHECK_HIDDEN,
        "l2_lambda": GRADCHECK_LAMBDA,
        "model_code": code.hexdigest()[:16],
    }
    cache = Path(out_dir) / "gradcheck.json" if out_dir is not None else None
    results: dict[str, dict[str, float]] | None = None
    if cache is not None and cache.exists():
        saved = json.loads(cache.read_text())
        if saved.get("settings") == json.loads(json.dumps(settings)):
            results = saved["errors"]
    if results is None:
        results = {
            f"{k}-{'bn' if bn else 'nobn'}": check_network(
                hidden, batch_norm=bn, l2_lambda=GRADCHECK_LAMBDA
            )
            for k, hidden in GRADCHECK_HIDDEN.items()
            for bn in (False, True)
        }
        if cache is not None:
            cache.parent.mkdir(parents=True, exist_ok=True)
            cache.write_text(json.dumps({"settings": settings, "errors": results}, indent=2))
    kinds = ("W", "b", "gamma", "beta")
    lines = [
        "## Gradient check",
        "",
        "Relative error ‖a − n‖ / (‖a‖ + ‖n‖) between the analytic gradients and centred "
        "differences, per layer and parameter (float64, 10 random samples of 20 "
        f"dimensions, λ = {GRADCHECK_LAMBDA}; with batch norm the hidden layers have "
        "γ and β and no b). The norms are taken over each whole parameter array: "
        "entry by entry, an entry whose true gradient is about 0 (a dead ReLU) would "
        "compare rounding noise with rounding noise.",
        "",
        "| network | BN | layer | " + " | ".join(kinds) + " |",
        "|---|---|---|" + "---|" * len(kinds),
    ]
    worst = 0.0
    for k, hidden in GRADCHECK_HIDDEN.items():
        for bn in (False, True):
            errors = results[f"{k}-{'bn' if bn else 'nobn'}"]
            worst = max(worst, *errors.values())
            for layer in range(1, len(hidden) + 2):
                cells = [
                    f"{errors[f'{p}{layer}']:.1e}" if f"{p}{layer}" in errors else "–"
                    for p in kinds
                ]
                net = f"{k}-layer {'-'.join(map(str, hidden))}" if layer == 1 else ""
                lines.append(
                    f"| {net} | {('yes' if bn else 'no') if layer == 1 else ''} | {layer} | "
                    + " | ".join(cells)
                    + " |"
                )
    lines += ["", f"Largest relative error: {worst:.1e}.", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- CLI


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m search.experiment",
        description="Run an experiment file (a grid of trainings) as a resumable Optuna study.",
    )
    p.add_argument("path", help="experiment file, e.g. studies/experiments/bn_vs_none.toml")
    p.add_argument("--workers", type=int, default=None, help="worker processes")
    p.add_argument(
        "--storage", default=None, help="Optuna storage URL (default SQLite beside the file)"
    )
    p.add_argument(
        "--cifar",
        metavar="DIR",
        default=None,
        help=(
            "run on CIFAR-10 in DIR: dataset cifar10, split all, a tenth of data_batch_1..5 "
            "(at most 5000 images) for validation unless --n-val"
        ),
    )
    p.add_argument("--dataset", default=None, help="override [data] name")
    p.add_argument("--data-dir", default=None, help="override [data] dir")
    p.add_argument("--split", default=None, help="override [data] split (cifar10: batch1, all)")
    p.add_argument("--n-val", type=int, default=None, help="override [data] n_val")
    p.add_argument("--n-s", type=int, default=None, help="fix the half-cycle n_s (steps)")
    p.add_argument("--out", default=None, help="also draw the figures into this directory")
    return p


def data_overrides(args: argparse.Namespace) -> dict[str, Any]:
    data: dict[str, Any] = {}
    if args.cifar:
        data |= {"name": "cifar10", "split": "all", "dir": args.cifar}
        if args.n_val is None and (args.split or "all") == "all":
            # DD2424 holds out 5,000 of 50,000: a tenth, at most 5,000 (a subset has fewer).
            data["n_val"] = min(5000, cifar10_train_size(args.cifar) // 10)
    if args.dataset:
        data["name"] = args.dataset
    if args.data_dir:
        data["dir"] = args.data_dir
    if args.split:
        data["split"] = args.split
    if args.n_val is not None:
        data["n_val"] = args.n_val
    if "dir" in data:
        data["dir"] = str(Path(data["dir"]).expanduser().resolve())
    return data


@guarded
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if args.n_s is not None and args.n_s < 1:
        raise ValueError(f"--n-s must be >= 1, got {args.n_s}")
    experiment = load_experiment(
        args.path,
        data=data_overrides(args),
        n_s=args.n_s,
        storage=args.storage,
        workers=args.workers,
    )
    study = run(experiment)
    print()
    grid = rows(experiment, study)
    print(table(experiment, grid))
    missing = [r.point for r in grid if r.trial is None]
    if missing:
        print(
            f"\nerror: {len(missing)} of {len(grid)} grid points have no finished run:",
            file=sys.stderr,
        )
        failed = study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        for point in missing:
            key = _key(experiment.params(point))
            reasons = [t.user_attrs.get("reason", "?") for t in failed if _key(t.params) == key]
            why = reasons[-1] if reasons else "not run"
            print(f"  {point}: {why}", file=sys.stderr)
        print(
            "fix the cause and run the same command again: finished points are kept",
            file=sys.stderr,
        )
        return 1
    if args.out:
        _, paths = draw(args.path, Path(args.out), storage=experiment.spec.storage_url())
        for path in paths:
            print(f"figure: {path}")
    print(f"\ndashboard: {st.dashboard_hint(experiment.spec)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
