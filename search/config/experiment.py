"""Experiment files (``studies/experiments/*.toml``): a study file plus two tables.

::

    [experiment]  kind = "curves" | "lambda" | "overfit", title, n_train, n_s_epochs
    [grid]        parameter = [values, ...]   (TrainConfig fields, and network fields of the
                  built-in network or, with [model] train, the keys of [model.params])

Every point of the grid (the product of the lists) is merged into the study
document and validated by :func:`search.config.study.parse_spec`, so a point is checked
like a study file.

- ``n_train``: train on the first this-many training images (the overfitting check).
- ``n_s_epochs``: the half-cycle n_s = n_s_epochs * floor(N_train / batch_size), so
  one file keeps the assignment's n_s on whatever data it runs on.

Errors are :class:`search.config.study.StudyDefinitionError` naming the file, the field
and what is allowed.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from optuna.distributions import BaseDistribution

from model.errors import UsageError
from model.train import TrainConfig
from search.config import space as sp
from search.config.study import (
    NETWORK_FIELDS,
    TRAIN_FIELDS,
    StudyDefinitionError,
    StudySpec,
    ignored_settings,
    parse_spec,
    read_toml,
)

KINDS = ("curves", "lambda", "overfit")
STAGE = "grid"
EXPERIMENT_KEYS = ("kind", "title", "n_train", "n_s_epochs")

# Grid parameters drawn (and given to Optuna) on a log scale.
LOG_SCALE = ("l2_lambda", "sigma", "eta", "eta_min", "eta_max")


@dataclass(frozen=True, eq=False)
class Experiment:
    """A validated experiment file: the study it runs in and the grid it walks.

    ``raw`` is the study document without ``[grid]`` and ``[experiment]`` (with any
    command-line overrides); each grid point is merged into it and validated by
    :func:`search.config.study.parse_spec`, so a point is checked like a study file.
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
        return f"{self.spec.name}-{STAGE}"

    def points(self) -> list[dict[str, Any]]:
        """Every combination of the grid values, in file order (one point if no grid)."""
        return grid_points(self.grid)

    def space(self) -> dict[str, sp.Range]:
        """The grid as a search space: a float grid is a float range (log for lambda, sigma
        and the learning rates, so the dashboard draws them on log axes; by name, not by
        the values, because a study refuses a parameter whose log setting changes when the
        grid is edited), any other grid a choice (layer widths as "50-50")."""
        out: dict[str, sp.Range] = {}
        for name, values in self.grid.items():
            if len(values) > 1 and all(type(v) is float for v in values):
                lo, hi = min(values), max(values)
                out[name] = sp.Range(name, "float", lo, hi, log=name in LOG_SCALE and lo > 0)
            else:
                out[name] = sp.Range(name, "choice", choices=tuple(values))
        return out

    def distributions(self) -> dict[str, BaseDistribution]:
        """Optuna distributions of the grid (:meth:`space`)."""
        return sp.distributions(self.space())

    def encoded_grid(self) -> dict[str, list[Any]]:
        """The grid with its values encoded as trial params, list by list."""
        return {name: [sp.encode(v) for v in values] for name, values in self.grid.items()}

    def params(self, point: dict[str, Any]) -> dict[str, Any]:
        """A grid point as trial params (encoded)."""
        return {name: sp.encode(v) for name, v in point.items()}

    def point(self, params: dict[str, Any]) -> dict[str, Any]:
        """Trial params back to a grid point (decoded), in grid order."""
        space = self.space()
        return {name: space[name].decode(params[name]) for name in self.grid if name in params}

    def n_s_for(
        self, point: dict[str, Any], n_train: int, spec: StudySpec | None = None
    ) -> dict[str, int]:
        """``{"n_s": ...}`` from ``n_s_epochs`` and the training set size, or {}.
        ``spec``: the point's spec, when the caller has it (:meth:`spec_for`)."""
        if self.n_s_epochs is None or "n_s" in point:
            return {}
        batch = (spec or self.spec_for(point)).train_config("coarse").batch_size
        return {"n_s": max(1, int(self.n_s_epochs * (n_train // batch)))}

    def spec_for(self, point: dict[str, Any]) -> StudySpec:
        """The study spec of one grid point: its values merged into [network]/[training]."""
        return parse_spec(merge(self.raw, point), self.spec.path)

    def train_config(self, point: dict[str, Any], n_train: int, *, seed: int) -> TrainConfig:
        """The point's TrainConfig; n_s from n_s_epochs and the training set size."""
        extra = {**self.n_s_for(point, n_train), "seed": seed}
        return self.spec_for(point).train_config("coarse", extra)


def grid_points(grid: dict[str, list[Any]]) -> list[dict[str, Any]]:
    """The product of the grid's value lists as dicts, in file order."""
    combos = itertools.product(*grid.values())
    return [dict(zip(grid, combo, strict=True)) for combo in combos]


def _section(name: str, raw: dict[str, Any]) -> tuple[str, ...]:
    """The study-file table a grid parameter belongs to: [training], [network], or with
    a user's function [model.params]."""
    if name in TRAIN_FIELDS:
        return ("training",)
    if raw.get("model", {}).get("train"):
        return ("model", "params")
    return ("network",)


def merge(raw: dict[str, Any], point: dict[str, Any]) -> dict[str, Any]:
    """The study document with a grid point's values put in [network] or [training]."""
    doc = copy.deepcopy(raw)
    for name, value in point.items():
        table = doc
        for key in _section(name, raw):
            table = table.setdefault(key, {})
        table[name] = list(value) if isinstance(value, tuple) else value
    return doc


# ----------------------------------------------------------------------------- the checks


def _parse_grid(path: Path, raw: dict[str, Any], grid_raw: Any) -> dict[str, list[Any]]:
    """The [grid] table: known parameters, each a non-empty list of distinct values."""
    if not isinstance(grid_raw, dict):
        raise StudyDefinitionError(path, "grid", f"must be a table, got {grid_raw!r}")
    grid: dict[str, list[Any]] = {}
    model = raw.get("model", {}) if isinstance(raw.get("model", {}), dict) else {}
    user = bool(model.get("train"))
    own = list(model.get("params", {})) if user else []
    allowed = [*TRAIN_FIELDS, *own] if user else [*NETWORK_FIELDS, *TRAIN_FIELDS]
    for name, values in grid_raw.items():
        where = f"grid.{name}"
        if name not in allowed:
            extra = (
                "; a key of your function's own is declared with its default in [model.params]"
                if user
                else ""
            )
            raise StudyDefinitionError(
                path,
                where,
                f"is not a parameter{sp.did_you_mean(name, allowed)}; allowed: "
                f"{sorted(allowed)}{extra}",
            )
        section = _section(name, raw)
        if section != ("model", "params") and name in raw.get(section[0], {}):
            raise StudyDefinitionError(
                path, where, f"is also set in [{section[0]}]; keep it in one place"
            )
        if not isinstance(values, list) or not values:
            raise StudyDefinitionError(path, where, f"must be a non-empty list, got {values!r}")
        if name == "hidden":
            if not all(isinstance(v, list) and v for v in values):
                raise StudyDefinitionError(
                    path, where, f"must be a list of lists of layer sizes, got {values!r}"
                )
            values = [tuple(v) for v in values]
        elif all(isinstance(v, list) and v for v in values):
            values = [tuple(v) for v in values]
        elif not all(isinstance(v, bool | int | float | str) for v in values):
            raise StudyDefinitionError(path, where, f"values must be scalars, got {values!r}")
        if len(set(values)) != len(values):
            raise StudyDefinitionError(path, where, f"has repeated values: {values!r}")
        grid[name] = values
    return grid


def _parse_experiment_table(path: Path, table: Any) -> dict[str, Any]:
    """The [experiment] table as the keyword arguments of :class:`Experiment`."""
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
    if "search" in raw or ("grid" not in raw and "experiment" not in raw):
        study_file = "search" in raw
        raise StudyDefinitionError(
            path,
            "search" if study_file else "grid",
            (
                "a study file, not an experiment: run it with c2f coarse --study "
                f"{path} (an experiment file has [grid] and [experiment], no [search])"
                if study_file
                else "not an experiment file: it has no [grid] or [experiment] table; see "
                "studies/experiments/"
            ),
        )
    grid_raw = raw.pop("grid", {})
    options = _parse_experiment_table(path, raw.pop("experiment", {}))
    if data:
        raw["data"] = {**raw.get("data", {}), **data}
        name = raw["data"].get("name")
        if name != "cifar10" and "split" in data:  # given as a flag: not to pass unseen
            raise UsageError(
                f"--split {data['split']}: only cifar10 has splits, and {path} runs on "
                f"{name}; drop --split (or add --cifar DIR)"
            )
        if name != "cifar10":
            raw["data"].pop("split", None)  # the file's, for CIFAR-10: not for --dataset
    grid = _parse_grid(path, raw, grid_raw)
    if n_s is not None:
        if "n_s" in grid:
            raise UsageError(f"--n-s {n_s} conflicts with the grid over n_s in {path}")
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
    ignored: dict[str, str] | None = None  # field -> why, at the first point
    for point in points:
        try:
            at = parse_spec(merge(raw, point), path)
        except StudyDefinitionError as exc:
            raise StudyDefinitionError(path, "grid", f"at point {point}: {exc}") from None
        # a setting is ignored when no point reads it (a grid can vary the schedule)
        found = dict(ignored_settings(at))
        ignored = found if ignored is None else {k: v for k, v in ignored.items() if k in found}
    if ignored and n_s is not None and "training.n_s" in ignored:
        raise UsageError(
            f"--n-s {n_s}: no point of {path} trains with the cyclical schedule, the one "
            "that reads n_s; drop --n-s"
        )
    if ignored:
        where, why = next(iter(ignored.items()))
        key = where.rsplit(".", 1)[-1]
        # a value the grid gives is the grid's to change
        raise StudyDefinitionError(path, f"grid.{key}" if key in grid else where, why)
    spec = parse_spec(merge(raw, points[0]), path).with_overrides(storage=storage, workers=workers)
    return Experiment(spec=spec, raw=raw, grid=grid, **options)


def list_experiments(root: Path) -> list[Path]:
    """The experiment files under ``root`` (``studies/experiments``), sorted."""
    return sorted(Path(root).glob("*.toml"))
