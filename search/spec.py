"""Study definitions: one TOML file under ``studies/`` -> a validated, frozen StudySpec.

A file has these tables (every key but ``name`` has a default)::

    name = "quickstart"
    [data]      name, dir, split, n_val
    [network]   hidden, batch_norm, init, sigma, bn_alpha
    [training]  any model.train.TrainConfig field (batch_size, schedule, eta_min, ...)
    [search]    l2_lambda = [low, high], eta_max = [low, high] (log-uniform ranges)
    [coarse]    trials
    [fine]      trials, top_k, margin (decades on each side), [fine.training] overrides
    [final]     holdout, [final.training] overrides
    [optuna]    pruner, sampler, seed, workers, storage, heartbeat_interval, grace_period,
                warmup_cycles, n_startup_trials

Errors are :class:`StudyDefinitionError` naming the file, the field and what is allowed.
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import tomllib
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from model.data import CIFAR10_SPLITS, DATASETS
from model.network import INITS
from model.train import TrainConfig

PRUNERS = ("median", "percentile", "successive_halving", "hyperband", "none")
SAMPLERS = ("tpe", "random")
SEARCHABLE = ("l2_lambda", "eta_max", "eta_min", "eta")


class StudyDefinitionError(ValueError):
    """A study file is wrong: names the file, the field and what is allowed."""

    def __init__(self, path: str | Path, field_name: str, message: str) -> None:
        super().__init__(f"{path}: [{field_name}] {message}")
        self.path = str(path)
        self.field = field_name


@dataclass(frozen=True)
class DataSpec:
    name: str = "digits"
    dir: str = ""
    split: str = "batch1"
    n_val: int | None = None


@dataclass(frozen=True)
class NetworkSpec:
    hidden: tuple[int, ...] = (50,)
    batch_norm: bool = False
    init: str = "he"
    sigma: float | None = None
    bn_alpha: float = 0.9


@dataclass(frozen=True)
class FineSpec:
    trials: int = 20
    top_k: int = 5
    margin: float = 0.25
    training: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class FinalSpec:
    holdout: int = 1000
    training: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class OptunaSpec:
    pruner: str = "percentile"
    sampler: str = "tpe"
    seed: int = 0
    workers: int = 1
    storage: str = ""
    heartbeat_interval: int = 10
    grace_period: int = 30
    warmup_cycles: float = 0.5
    n_startup_trials: int = 5


@dataclass(frozen=True)
class StudySpec:
    """Everything one study needs, from one TOML file (``path`` is where it came from)."""

    name: str
    path: str = ""
    data: DataSpec = DataSpec()
    network: NetworkSpec = NetworkSpec()
    training: dict[str, Any] = field(default_factory=dict)
    search: dict[str, tuple[float, float]] = field(default_factory=dict)
    coarse_trials: int = 40
    fine: FineSpec = FineSpec()
    final: FinalSpec = FinalSpec()
    optuna: OptunaSpec = OptunaSpec()

    @property
    def base_dir(self) -> Path:
        """The directory of the study file: default home of its database and outputs."""
        return Path(self.path).resolve().parent if self.path else Path.cwd()

    def storage_url(self) -> str:
        if self.optuna.storage:
            return self.optuna.storage
        return f"sqlite:///{self.base_dir / (self.name + '.db')}"

    def out_dir(self) -> Path:
        return self.base_dir / "out" / self.name

    def data_dir(self) -> str | None:
        if not self.data.dir:
            return None
        d = Path(self.data.dir).expanduser()
        return str(d if d.is_absolute() else (self.base_dir / d).resolve())

    def train_config(self, stage: str, params: dict[str, float] | None = None) -> TrainConfig:
        """The TrainConfig of a stage ("coarse", "fine", "final") with trial params on top."""
        values = dict(self.training)
        if stage == "fine":
            values.update(self.fine.training)
        elif stage == "final":
            values.update(self.final.training)
        values.update(params or {})
        return TrainConfig.from_dict(values)

    def with_overrides(self, **optuna_fields: Any) -> StudySpec:
        """A copy with some ``[optuna]`` fields replaced (CLI flags); None means keep."""
        changes = {k: v for k, v in optuna_fields.items() if v is not None}
        return dataclasses.replace(self, optuna=dataclasses.replace(self.optuna, **changes))


def _build(cls: type, path: Path, section: str, raw: Any) -> Any:
    if not isinstance(raw, dict):
        raise StudyDefinitionError(path, section, f"must be a table, got {raw!r}")
    allowed = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise StudyDefinitionError(
            path, section, f"unknown keys {unknown}; allowed: {sorted(allowed)}"
        )
    values = {}
    for key, value in raw.items():
        kind = str(allowed[key].type).split(" ")[0].split("[")[0]
        ok = {
            "int": isinstance(value, int) and not isinstance(value, bool),
            "float": isinstance(value, int | float) and not isinstance(value, bool),
            "str": isinstance(value, str),
            "bool": isinstance(value, bool),
        }.get(kind, True)
        if not ok:
            raise StudyDefinitionError(
                path, f"{section}.{key}", f"must be of type {kind}, got {value!r}"
            )
        values[key] = value
    return cls(**values)


def _check_training(path: Path, section: str, values: dict[str, Any]) -> None:
    known = {f.name for f in fields(TrainConfig)}
    unknown = sorted(set(values) - known)
    if unknown:
        raise StudyDefinitionError(
            path, section, f"unknown keys {unknown}; allowed: {sorted(known)}"
        )


def _check_range(path: Path, name: str, value: Any) -> tuple[float, float]:
    where = f"search.{name}"
    if name not in SEARCHABLE:
        raise StudyDefinitionError(
            path, where, f"cannot be searched; searchable parameters: {list(SEARCHABLE)}"
        )
    if (
        not isinstance(value, list | tuple)
        or len(value) != 2
        or not all(isinstance(v, int | float) and not isinstance(v, bool) for v in value)
    ):
        raise StudyDefinitionError(path, where, f"must be [low, high] numbers, got {value!r}")
    low, high = float(value[0]), float(value[1])
    if not (low > 0 and math.isfinite(high)):
        raise StudyDefinitionError(
            path, where, f"a log range needs bounds > 0, got low={low!r}, high={high!r}"
        )
    if low >= high:
        raise StudyDefinitionError(path, where, f"low must be < high, got [{low!r}, {high!r}]")
    return low, high


def parse_spec(raw: dict[str, Any], path: str | Path = "<string>") -> StudySpec:
    """Validate a parsed TOML document into a StudySpec."""
    path = Path(path)
    top = {"name", "data", "network", "training", "search", "coarse", "fine", "final", "optuna"}
    unknown = sorted(set(raw) - top)
    if unknown:
        raise StudyDefinitionError(
            path, "top level", f"unknown keys {unknown}; allowed: {sorted(top)}"
        )
    name = raw.get("name")
    if (
        not isinstance(name, str)
        or not name
        or not name.replace("-", "").replace("_", "").isalnum()
    ):
        raise StudyDefinitionError(
            path, "name", f"must be a non-empty name of letters, digits, - and _, got {name!r}"
        )
    data = _build(DataSpec, path, "data", raw.get("data", {}))
    if data.name not in DATASETS:
        raise StudyDefinitionError(
            path, "data.name", f"must be one of {list(DATASETS)}, got {data.name!r}"
        )
    if data.split not in CIFAR10_SPLITS:
        raise StudyDefinitionError(
            path, "data.split", f"must be one of {list(CIFAR10_SPLITS)}, got {data.split!r}"
        )
    if data.name != "cifar10" and data.split != "batch1":
        raise StudyDefinitionError(
            path, "data.split", f"applies to cifar10 only; leave it out for {data.name!r}"
        )
    if data.n_val is not None and data.n_val < 1:
        raise StudyDefinitionError(
            path, "data.n_val", f"must be an integer >= 1 (or left out), got {data.n_val!r}"
        )
    net_raw = dict(raw.get("network", {}))
    if "hidden" in net_raw:
        hidden = net_raw["hidden"]
        if (
            not isinstance(hidden, list)
            or not hidden
            or not all(isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in hidden)
        ):
            raise StudyDefinitionError(
                path,
                "network.hidden",
                f"must be a non-empty list of positive integers, got {hidden!r}",
            )
        net_raw["hidden"] = tuple(hidden)
    network = _build(
        NetworkSpec, path, "network", {k: v for k, v in net_raw.items() if k != "hidden"}
    )
    if "hidden" in net_raw:
        network = dataclasses.replace(network, hidden=net_raw["hidden"])
    if network.init not in INITS:
        raise StudyDefinitionError(
            path, "network.init", f"must be one of {list(INITS)}, got {network.init!r}"
        )
    if network.init == "sigma" and not (network.sigma or 0) > 0:
        raise StudyDefinitionError(path, "network.sigma", "init = 'sigma' needs sigma > 0")
    if network.sigma is not None and not network.sigma > 0:
        raise StudyDefinitionError(path, "network.sigma", f"must be > 0, got {network.sigma!r}")
    if not 0 <= network.bn_alpha < 1:
        raise StudyDefinitionError(
            path, "network.bn_alpha", f"must be in [0, 1), got {network.bn_alpha!r}"
        )

    training = dict(raw.get("training", {}))
    _check_training(path, "training", training)
    search = {k: _check_range(path, k, v) for k, v in dict(raw.get("search", {})).items()}
    overlap = sorted(set(search) & set(training))
    if overlap:
        raise StudyDefinitionError(
            path, "search", f"{overlap} are both searched and fixed in [training]; keep one"
        )

    coarse_raw = dict(raw.get("coarse", {}))
    unknown = sorted(set(coarse_raw) - {"trials"})
    if unknown:
        raise StudyDefinitionError(path, "coarse", f"unknown keys {unknown}; allowed: ['trials']")
    coarse_trials = coarse_raw.get("trials", 40)
    if not isinstance(coarse_trials, int) or isinstance(coarse_trials, bool) or coarse_trials < 1:
        raise StudyDefinitionError(
            path, "coarse.trials", f"must be an integer >= 1, got {coarse_trials!r}"
        )

    fine_raw = dict(raw.get("fine", {}))
    fine_training = dict(fine_raw.pop("training", {}))
    _check_training(path, "fine.training", fine_training)
    fine = _build(FineSpec, path, "fine", fine_raw)
    fine = dataclasses.replace(fine, training=fine_training)
    if fine.trials < 1 or fine.top_k < 1 or fine.margin < 0:
        raise StudyDefinitionError(
            path, "fine", f"trials and top_k must be >= 1 and margin >= 0, got {fine_raw!r}"
        )

    final_raw = dict(raw.get("final", {}))
    final_training = dict(final_raw.pop("training", {}))
    _check_training(path, "final.training", final_training)
    final = dataclasses.replace(
        _build(FinalSpec, path, "final", final_raw), training=final_training
    )

    if final.holdout < 0:
        raise StudyDefinitionError(
            path, "final.holdout", f"must be >= 0 (0: no holdout), got {final.holdout!r}"
        )

    optuna_spec = _build(OptunaSpec, path, "optuna", raw.get("optuna", {}))
    for key in ("heartbeat_interval", "grace_period"):
        if getattr(optuna_spec, key) < 1:
            raise StudyDefinitionError(
                path, f"optuna.{key}", f"must be >= 1 second, got {getattr(optuna_spec, key)!r}"
            )
    if optuna_spec.grace_period < 2 * optuna_spec.heartbeat_interval:
        raise StudyDefinitionError(
            path,
            "optuna.grace_period",
            f"must be at least twice heartbeat_interval (2 x {optuna_spec.heartbeat_interval}"
            f" = {2 * optuna_spec.heartbeat_interval} s), got {optuna_spec.grace_period}; "
            "with less, a live trial whose heartbeat is late would be taken for a dead one",
        )
    if optuna_spec.warmup_cycles < 0 or optuna_spec.n_startup_trials < 0:
        raise StudyDefinitionError(
            path,
            "optuna",
            "warmup_cycles and n_startup_trials must be >= 0, got "
            f"{optuna_spec.warmup_cycles!r} and {optuna_spec.n_startup_trials!r}",
        )
    url = optuna_spec.storage
    if url and "://" not in url and not url.endswith(".log"):
        raise StudyDefinitionError(
            path,
            "optuna.storage",
            "must be an Optuna storage URL (sqlite:///x.db, postgresql+psycopg2://user@host/db"
            f", journal:///x.log) or a journal file x.log, got {url!r}",
        )
    if optuna_spec.pruner not in PRUNERS:
        raise StudyDefinitionError(
            path, "optuna.pruner", f"must be one of {list(PRUNERS)}, got {optuna_spec.pruner!r}"
        )
    if optuna_spec.sampler not in SAMPLERS:
        raise StudyDefinitionError(
            path, "optuna.sampler", f"must be one of {list(SAMPLERS)}, got {optuna_spec.sampler!r}"
        )
    if optuna_spec.workers < 1:
        raise StudyDefinitionError(
            path, "optuna.workers", f"must be >= 1, got {optuna_spec.workers}"
        )

    spec = StudySpec(
        name=name,
        path=str(path),
        data=data,
        network=network,
        training=training,
        search=search,
        coarse_trials=coarse_trials,
        fine=fine,
        final=final,
        optuna=optuna_spec,
    )
    # Every stage's TrainConfig must be valid at the ranges' midpoints and at their
    # corners: a range that is only partly valid would fail trials at random.
    names = sorted(search)
    points = [{k: math.sqrt(lo * hi) for k, (lo, hi) in search.items()}]
    for corner in itertools.product(*(search[k] for k in names)):
        points.append(dict(zip(names, corner, strict=True)))
    for stage in ("coarse", "fine", "final"):
        for point in points:
            try:
                spec.train_config(stage, point)
            except (ValueError, TypeError) as exc:
                section = {"coarse": "training"}.get(stage, f"{stage}.training")
                at = ", ".join(f"{k}={v:g}" for k, v in point.items())
                where = f" (with {at} from [search])" if point else ""
                raise StudyDefinitionError(path, section, f"{exc}{where}") from None
    unused = _unused_search(spec)
    if unused:
        raise StudyDefinitionError(path, f"search.{unused[0]}", unused[1])
    return spec


def _unused_search(spec: StudySpec) -> tuple[str, str] | None:
    """A searched parameter the schedule never reads, with the reason."""
    schedule = spec.train_config("coarse", {k: lo for k, (lo, _) in spec.search.items()}).schedule
    if schedule == "cyclical" and "eta" in spec.search:
        return "eta", "the cyclical schedule does not use eta; search eta_min or eta_max"
    if schedule != "cyclical":
        for name in ("eta_min", "eta_max"):
            if name in spec.search:
                return name, f"the {schedule} schedule uses eta, not {name}; search eta"
    return None


def read_toml(path: Path, *, missing: str) -> dict[str, Any]:
    """A TOML file's contents; a missing or broken file is a StudyDefinitionError."""
    if not path.is_file():
        raise StudyDefinitionError(path, "file", missing)
    try:
        return tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise StudyDefinitionError(path, "file", f"not valid TOML: {exc}") from None


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a study file."""
    path = Path(path)
    raw = read_toml(path, missing="no such study file; see studies/*.toml")
    return parse_spec(raw, path)
