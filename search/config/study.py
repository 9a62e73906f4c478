"""Study definitions: one TOML file under ``studies/`` -> a validated, frozen StudySpec.

A file has these tables (every key but ``name`` has a default)::

    name = "quickstart"
    [data]      name, dir, split, n_val
    [model]     train = "my_net.py:train" | "package.module:train", layout (your own network;
                see search/sweep/user_train.py; [network] is then left out), and
                [model.params]: your function's own keys with their defaults (n_hidden = 50)
    [network]   hidden, batch_norm, init, sigma, bn_alpha
    [training]  any model.train.TrainConfig field (batch_size, schedule, eta_min, ...); with
                [model] train, also the keys declared in [model.params]
    [search]    any [training] or [network] field, or with [model] any key of [model.params]:
                name = [low, high] (log-uniform), {low, high, log, step} (float),
                {int = [low, high], log} (integer), {choice = [...]} (search/config/space.py)
    [coarse]    trials, replicates, replicate_top, race_top, race_runs, stop_below_noise
    [fine]      trials, top_k, margin (decades on each side), narrow, extend, replicates,
                replicate_top, race_top, race_runs, warm_start, stop_below_noise,
                [fine.training] overrides
    [final]     holdout, seeds, choose, [final.training] overrides
    [optuna]    pruner, sampler, seed, seed_mode, budget, workers, storage,
                heartbeat_interval, grace_period, warmup_cycles, n_startup_trials

Errors are :class:`StudyDefinitionError` naming the file, the field and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
import re
import tomllib
from collections.abc import Sequence
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

from model.data import CIFAR10_SPLITS, DATASETS
from model.errors import SettingError, UsageError
from model.network import Network
from model.train import TrainConfig
from search.config.space import (
    Range,
    RangeError,
    describe_value,
    did_you_mean,
    parse_range,
    points_to_check,
)

PRUNERS = ("median", "percentile", "successive_halving", "hyperband", "none")
SAMPLERS = ("tpe", "random")
SEED_MODES = ("shared", "per_trial")
BUDGETS = ("trials", "steps")
NARROWING = ("model", "noise", "top_k")
CHOICES = ("robust", "model", "best", "smoothed")
TABLES = (
    "name",
    "data",
    "model",
    "network",
    "training",
    "search",
    "coarse",
    "fine",
    "final",
    "optuna",
)
LAYOUTS = ("n_by_d", "d_by_n")
TRAIN_FIELDS = frozenset(f.name for f in fields(TrainConfig))
# A stage's queue is filled one trial at a time before training starts: past this it
# would take minutes, and no search of this kind needs more.
MAX_TRIALS = 10_000
# Study names go into file names (<name>.db, out/<name>/): well under a file name's 255 bytes.
MAX_NAME_LENGTH = 100


class StudyDefinitionError(UsageError):
    """A study file is wrong: names the file, the field and what is allowed."""

    def __init__(self, path: str | Path, field_name: str, message: str) -> None:
        super().__init__(f"{path}: [{field_name}] {message}")
        self.path = str(path)
        self.field = field_name


def _table(path: Path, section: str, raw: Any) -> dict[str, Any]:
    """A copy of the TOML table ``section``, which must be a table."""
    if not isinstance(raw, dict):
        raise StudyDefinitionError(path, section, f"must be a table, got {raw!r}")
    return dict(raw)


def _build(cls: type, path: Path, section: str, raw: Any) -> Any:
    """``cls(**raw)`` for a table of known keys whose values have the fields' types."""
    raw = _table(path, section, raw)
    allowed = {f.name: f for f in fields(cls)}
    unknown = sorted(set(raw) - set(allowed))
    if unknown:
        raise StudyDefinitionError(
            path, section, f"unknown keys {unknown}; allowed: {sorted(allowed)}"
        )
    for key, value in raw.items():
        # "int | float | None" -> the kinds allowed; None is "left out", not a TOML value.
        kinds = [k.strip().split("[")[0] for k in str(allowed[key].type).split("|")]
        kinds = [k for k in kinds if k != "None"]
        if set(kinds) <= {"int", "float"}:  # a number: an integer where only int is allowed
            kind = "float" if "float" in kinds else "int"
            _check_number(path, f"{section}.{key}", value, kind=kind)
            continue
        checks = {
            "str": isinstance(value, str),
            "bool": isinstance(value, bool),
        }
        if not any(checks.get(kind, True) for kind in kinds):
            raise StudyDefinitionError(
                path, f"{section}.{key}", f"must be of type {' or '.join(kinds)}, got {value!r}"
            )
    return cls(**raw)


def _check_number(
    path: Path,
    field_name: str,
    value: Any,
    *,
    kind: str = "int",
    min: float | None = None,
    max: float | None = None,
    above: float | None = None,
    unit: str = "",
) -> Any:
    """``value`` if it is a number of ``kind`` ("int": an integer; "float": any finite
    number) within the bounds (``min <= value <= max``, ``value > above``), else a
    StudyDefinitionError naming the file, the field and what is allowed."""
    bounds = [
        f">= {min:g}" if min is not None else "",
        f"> {above:g}" if above is not None else "",
    ]
    bounds.append(f"<= {max:,}" if max is not None else "")
    allowed = " and ".join(b for b in bounds if b) + (f" {unit}" if unit else "")
    what = ("an integer" if kind == "int" else "a finite number") + (
        f" {allowed}" if allowed else ""
    )
    is_int = isinstance(value, int) and not isinstance(value, bool)
    ok = is_int if kind == "int" else (is_int or isinstance(value, float)) and math.isfinite(value)
    if ok:
        ok = (
            (min is None or value >= min)
            and (max is None or value <= max)
            and (above is None or value > above)
        )
    if not ok:
        raise StudyDefinitionError(path, field_name, f"must be {what}, got {value!r}")
    return value


def _one_of(path: Path, field_name: str, value: Any, allowed: tuple[str, ...]) -> None:
    """A StudyDefinitionError naming the field unless ``value`` is one of ``allowed``."""
    if value not in allowed:
        raise StudyDefinitionError(
            path, field_name, f"must be one of {list(allowed)}, got {value!r}"
        )


def _parse_name(path: Path, name: Any) -> str:
    if (
        not isinstance(name, str)
        or not name
        or not name.replace("-", "").replace("_", "").isascii()
        or not name.replace("-", "").replace("_", "").isalnum()
    ):
        raise StudyDefinitionError(
            path, "name", f"must be a non-empty name of letters, digits, - and _, got {name!r}"
        )
    if len(name) > MAX_NAME_LENGTH:
        raise StudyDefinitionError(
            path,
            "name",
            f"must be at most {MAX_NAME_LENGTH} characters (it names the database and output "
            f"files), got {len(name)}",
        )
    return name


@dataclass(frozen=True)
class DataSpec:
    name: str = "digits"
    dir: str = ""
    split: str = "batch1"
    n_val: int | float | None = None  # images, or a fraction of the training files in (0, 1)


def _parse_data(path: Path, raw: Any) -> DataSpec:
    # model.data checks these only when it loads the data, too late to name the file.
    data = _build(DataSpec, path, "data", raw)
    _one_of(path, "data.name", data.name, DATASETS)
    _one_of(path, "data.split", data.split, CIFAR10_SPLITS)
    if data.name != "cifar10" and data.split != "batch1":
        raise StudyDefinitionError(
            path, "data.split", f"applies to cifar10 only; leave it out for {data.name!r}"
        )
    n_val = data.n_val
    if n_val is not None and not (
        (isinstance(n_val, int) and n_val >= 1) or (isinstance(n_val, float) and 0 < n_val < 1)
    ):
        raise StudyDefinitionError(
            path,
            "data.n_val",
            "must be a number of images >= 1 or a fraction of the data in (0, 1) "
            f"(or left out), got {n_val!r}",
        )
    return data


@dataclass(frozen=True)
class NetworkSpec:
    hidden: tuple[int, ...] = (50,)
    batch_norm: bool = False
    init: str = "he"
    sigma: float | None = None
    bn_alpha: float = 0.9


NETWORK_FIELDS = tuple(f.name for f in fields(NetworkSpec))


def check_network(network: NetworkSpec) -> None:
    """Raise :class:`model.errors.SettingError` (naming the field) if ``network`` cannot be
    built: the shared check of [network], of searched network fields and of grid points."""
    hidden = network.hidden
    if (
        not isinstance(hidden, tuple | list)
        or not hidden
        or not all(isinstance(h, int) and not isinstance(h, bool) and h > 0 for h in hidden)
    ):
        raise SettingError(
            f"hidden must be a non-empty list of positive integers, got hidden={hidden!r}",
            field="hidden",
        )
    for name, kind in (("batch_norm", bool), ("init", str)):
        if not isinstance(getattr(network, name), kind):
            raise SettingError(
                f"{name} must be a {kind.__name__}, got {name}={getattr(network, name)!r}",
                field=name,
            )
    Network(
        1,
        network.hidden,
        2,
        batch_norm=network.batch_norm,
        init=network.init,
        sigma=network.sigma,
        bn_alpha=network.bn_alpha,
    )


def _parse_network(path: Path, raw: Any) -> NetworkSpec:
    """The [network] table; init and bn_alpha are checked by the Network it describes."""
    net_raw = _table(path, "network", raw)
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
    network = _build(NetworkSpec, path, "network", net_raw)
    # Network reads sigma only with init = "sigma"; a wrong sigma must not pass unseen.
    if network.sigma is not None:
        _check_number(path, "network.sigma", network.sigma, kind="float", above=0)
    try:
        check_network(network)
    except SettingError as exc:
        where = f"network.{exc.field}" if exc.field in NETWORK_FIELDS else "network"
        raise StudyDefinitionError(path, where, str(exc)) from None
    return network


@dataclass(frozen=True)
class ModelSpec:
    """[model]: the user's own training function, instead of the built-in network.

    ``train`` is ``"file.py:function"`` (a path relative to the study file) or
    ``"package.module:function"``; "" means the built-in network of [network].
    ``layout`` is how the user's function gets X: ``"n_by_d"`` (samples x features)
    or ``"d_by_n"`` (features x samples, as in DD2424). The contract is in
    :mod:`search.sweep.user_train`.
    """

    train: str = ""
    layout: str = "n_by_d"
    params: dict[str, Any] = field(default_factory=dict)

    def entry(self) -> tuple[str, str]:
        """``("my_net.py", "train")`` or ``("package.module", "train")``."""
        where, _, function = self.train.rpartition(":")
        return where, function


_ENTRY = re.compile(r"(?:[^:]+\.py|[A-Za-z_]\w*(?:\.[A-Za-z_]\w*)*):[A-Za-z_]\w*", flags=re.ASCII)
# Computed by the service from the schedule and given to the user's function.
USER_RESERVED = ("total_steps", "eval_every", "seed")
# Settings, not hyperparameters: a search over them would measure nothing.
UNSEARCHABLE = ("seed", "eval_every", "evals_per_cycle", "train_metrics", "train_eval_size")


def _parse_model(path: Path, raw: Any) -> ModelSpec:
    """The [model] table; the file and function are looked for when a command trains."""
    raw = _table(path, "model", raw)
    params = _parse_model_params(path, raw.pop("params", {}))
    model = dataclasses.replace(_build(ModelSpec, path, "model", raw), params=params)
    if model.train and not _ENTRY.fullmatch(model.train):
        raise StudyDefinitionError(
            path,
            "model.train",
            'must be "file.py:function" (a path relative to the study file) or '
            f'"package.module:function", got {model.train!r}',
        )
    _one_of(path, "model.layout", model.layout, LAYOUTS)
    if not model.train and model != ModelSpec():
        raise StudyDefinitionError(
            path, "model", "layout and [model.params] apply to a user's function: give train too"
        )
    return model


def _parse_model_params(path: Path, raw: Any) -> dict[str, Any]:
    """[model.params]: the user's own keys with their defaults (numbers, strings, booleans,
    lists); none may shadow a [training] field or a key the service computes."""
    params = _table(path, "model.params", raw)
    for key, value in params.items():
        where = f"model.params.{key}"
        if not key.isidentifier():
            raise StudyDefinitionError(path, where, "must be a Python identifier")
        if key in TRAIN_FIELDS:
            raise StudyDefinitionError(
                path, where, f"is a [training] field; set {key} in [training] instead"
            )
        if key in USER_RESERVED or key == "total_steps":
            raise StudyDefinitionError(
                path, where, "is computed by the service and given to your function; rename it"
            )
        if isinstance(value, float) and not math.isfinite(value):
            raise StudyDefinitionError(path, where, f"must be a finite number, got {value!r}")
        if not isinstance(value, bool | int | float | str | list):
            raise StudyDefinitionError(
                path,
                where,
                f"must be a number, a string, a boolean or a list (its default), got {value!r}",
            )
    return params


def _parse_training(
    path: Path, section: str, raw: Any, *, own: tuple[str, ...] | None = None
) -> dict[str, Any]:
    """A [training] table: TrainConfig fields, validated by TrainConfig in :func:`parse_spec`.

    ``own``: with a user's function, the keys it declares in [model.params] (its
    [training] may set them too). Any other key is refused, with "did you mean".
    """
    values = _table(path, section, raw)
    allowed = set(TRAIN_FIELDS) | set(own or ())
    for key in values:
        if key in allowed:
            continue
        if key in USER_RESERVED:
            raise StudyDefinitionError(
                path, f"{section}.{key}", f"{key} is computed from the schedule; leave it out"
            )
        hint = did_you_mean(key, allowed)
        if own is not None:
            hint += (
                f"; a key of your function's own is declared with its default in "
                f"[model.params] ({key} = ...)"
            )
        raise StudyDefinitionError(
            path,
            f"{section}.{key}",
            f"unknown key {key!r}{hint}; allowed: {sorted(allowed)}",
        )
    return values


def _build_with_training(
    cls: type, path: Path, section: str, raw: Any, *, own: tuple[str, ...] | None = None
) -> tuple[Any, dict]:
    """A stage's table with its ``[<section>.training]`` overrides; also the other keys given."""
    values = _table(path, section, raw)
    training = _parse_training(path, f"{section}.training", values.pop("training", {}), own=own)
    return dataclasses.replace(_build(cls, path, section, values), training=training), values


def _field_kind(cls: type, name: str) -> str:
    """ "int", "float", "str", "bool" or "tuple": the annotated type of a dataclass field."""
    annotation = str(next(f.type for f in fields(cls) if f.name == name))
    return annotation.split("|")[0].split("[")[0].strip()


def _value_kind(value: Any) -> str:
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, int):
        return "int"
    if isinstance(value, float):
        return "float"
    return "str" if isinstance(value, str) else "tuple"


def searchable(model: ModelSpec) -> dict[str, str]:
    """The names a study can search, each with the kind of value it takes ("int",
    "float", "str", "bool", "tuple"): [training] fields, and [network] fields of the
    built-in network or the keys a user's function declares in [model.params]."""
    names = {n: _field_kind(TrainConfig, n) for n in TRAIN_FIELDS if n not in UNSEARCHABLE}
    if model.train:
        names |= {k: _value_kind(v) for k, v in model.params.items()}
    else:
        names |= {n: _field_kind(NetworkSpec, n) for n in NETWORK_FIELDS}
    return names


def check_range_kind(name: str, r: Range, kind: str) -> str | None:
    """Why range ``r`` cannot give ``name`` (a setting of ``kind``) its values, or None."""
    if r.kind == "choice":
        return None  # each choice is checked as a value of the setting (the corners)
    if kind == "int" and r.kind == "float":
        log = ", log = true" if r.log else ""
        lo, hi = math.ceil(r.low), math.floor(r.high)
        return f"{name} takes integers: write {name} = {{int = [{lo}, {hi}]{log}}}"
    if kind in ("str", "bool", "tuple"):
        return f"{name} takes {kind_words(kind)}: list them, {name} = {{choice = [...]}}"
    return None


def kind_words(kind: str) -> str:
    return {"str": "strings", "bool": "true or false", "tuple": "lists"}.get(kind, kind)


def _parse_search(
    path: Path, raw: Any, model: ModelSpec, fixed: dict[str, dict[str, Any]]
) -> dict[str, Range]:
    """The [search] table: a range per searched name, none also fixed elsewhere."""
    allowed = searchable(model)
    search: dict[str, Range] = {}
    for name, value in _table(path, "search", raw).items():
        where = f"search.{name}"
        if name not in allowed:
            why = (
                "is a setting, not a hyperparameter; set it in [training]"
                if name in UNSEARCHABLE
                else f"is not a parameter{did_you_mean(name, list(allowed))}"
            )
            own = (
                "; a key of your function's own is declared with its default in [model.params]"
                if model.train
                else ""
            )
            raise StudyDefinitionError(path, where, f"{why}; searchable: {sorted(allowed)}{own}")
        try:
            r = parse_range(name, value)
        except RangeError as exc:
            raise StudyDefinitionError(path, where, str(exc)) from None
        if (kind_error := check_range_kind(name, r, allowed[name])) is not None:
            raise StudyDefinitionError(path, where, kind_error)
        search[name] = r
    for table, values in fixed.items():
        overlap = sorted(set(search) & set(values))
        if overlap:
            raise StudyDefinitionError(
                path, "search", f"{overlap} are both searched and fixed in [{table}]; keep one"
            )
    return search


def _check_replicates(path: Path, section: str, replicates: int, replicate_top: int) -> None:
    if replicates < 1 or replicate_top < 1:
        raise StudyDefinitionError(
            path,
            section,
            "replicates (seeds per replicated configuration, 1: none) and replicate_top "
            f"must be >= 1, got replicates={replicates!r}, replicate_top={replicate_top!r}",
        )


def _check_race(path: Path, section: str, race_top: int, race_runs: int) -> None:
    _check_number(path, f"{section}.race_top", race_top, min=2)
    _check_number(path, f"{section}.race_runs", race_runs, min=0)


@dataclass(frozen=True)
class CoarseSpec:
    """``trials`` searched. With ``replicates`` > 1 the ``replicate_top`` best
    configurations are then run with that many seeds in all (the first run included).
    With ``race_runs`` > 0 the ``race_top`` best by the model of the landscape race on
    shared extra seeds until the paired comparison separates them or ``race_runs``
    runs are spent (:func:`search.sweep.replicates.race_round`). Both off by default
    in the coarse stage: the fine stage races. ``stop_below_noise``: end the search
    early when the model of the landscape bounds what is left to find below the seed
    noise of one run (:mod:`search.sweep.stopping`)."""

    trials: int = 40
    replicates: int = 1
    replicate_top: int = 3
    race_top: int = 3
    race_runs: int = 0
    stop_below_noise: bool = False


def _parse_coarse(path: Path, raw: Any) -> CoarseSpec:
    coarse = _build(CoarseSpec, path, "coarse", raw)
    _check_number(path, "coarse.trials", coarse.trials, min=1, max=MAX_TRIALS)
    _check_replicates(path, "coarse", coarse.replicates, coarse.replicate_top)
    _check_race(path, "coarse", coarse.race_top, coarse.race_runs)
    return coarse


@dataclass(frozen=True)
class FineSpec:
    """The fine ranges cover the coarse configurations within noise of the best and the
    ``top_k`` best means, widened by ``margin`` decades; past an edge of the coarse range
    by at most ``extend`` decades. Within noise: by the model of the landscape
    (``narrow = "model"``), by the means over replicates (``"noise"``), or the ``top_k``
    best single runs only (``"top_k"``). ``warm_start``: the coarse runs inside the fine
    ranges are carried over into the fine study when both stages train alike (no
    ``[fine.training]``), so its sampler starts from them. After its trials, the
    ``race_top`` best by the model race on shared seeds for at most ``race_runs`` runs;
    ``replicates`` > 1: blanket replicates of the ``replicate_top`` best, as coarse;
    ``stop_below_noise`` as coarse."""

    trials: int = 20
    top_k: int = 3
    margin: float = 0.25
    narrow: str = "model"
    extend: float = 1.0
    replicates: int = 1
    replicate_top: int = 3
    race_top: int = 3
    race_runs: int = 4
    warm_start: bool = True
    stop_below_noise: bool = False
    training: dict[str, Any] = field(default_factory=dict)


def _parse_fine(path: Path, raw: Any, *, own: tuple[str, ...] | None = None) -> FineSpec:
    fine, _ = _build_with_training(FineSpec, path, "fine", raw, own=own)
    _check_number(path, "fine.trials", fine.trials, min=1, max=MAX_TRIALS)
    _check_number(path, "fine.top_k", fine.top_k, min=1)
    _check_number(path, "fine.margin", fine.margin, kind="float", min=0, unit="decades")
    _check_number(path, "fine.extend", fine.extend, kind="float", min=0, unit="decades")
    _one_of(path, "fine.narrow", fine.narrow, NARROWING)
    _check_replicates(path, "fine", fine.replicates, fine.replicate_top)
    _check_race(path, "fine", fine.race_top, fine.race_runs)
    return fine


@dataclass(frozen=True)
class FinalSpec:
    """final trains on train + val minus ``holdout`` validation images (a number, or a
    fraction of val in (0, 1); 0: none) with ``seeds`` seeds, and tests each once.
    ``choose``: "robust" (the best value predicted by the model of the landscape, among
    the contenders still in the race if one was run; but when a run of the search
    diverged, of the configurations predicted within one run's seed noise of the best,
    the one furthest from a diverged run), "model" (the best predicted value, diverged
    runs or not), "best" (the best mean over seeds, replicated configurations first) or
    "smoothed" (the best kernel-smoothed mean over neighbouring configurations)."""

    holdout: int | float = 0.2
    seeds: int = 3
    choose: str = "robust"
    training: dict[str, Any] = field(default_factory=dict)


def _parse_final(path: Path, raw: Any, *, own: tuple[str, ...] | None = None) -> FinalSpec:
    final, _ = _build_with_training(FinalSpec, path, "final", raw, own=own)
    h = final.holdout
    if not ((isinstance(h, int) and h >= 0) or (isinstance(h, float) and 0 < h < 1)):
        raise StudyDefinitionError(
            path,
            "final.holdout",
            "must be a number of validation images >= 0 (0: no holdout) or a fraction of "
            f"them in (0, 1), got {h!r}",
        )
    _one_of(path, "final.choose", final.choose, CHOICES)
    if final.seeds < 1:
        raise StudyDefinitionError(
            path, "final.seeds", f"must be an integer >= 1, got {final.seeds!r}"
        )
    return final


@dataclass(frozen=True)
class OptunaSpec:
    """How the stages run their trials. ``budget``: what a stage's ``trials`` counts.
    "trials" (the default): trials, however early they stopped. "steps": training steps,
    in whole trials' worth: a trial pruned or diverged counts the share of its epochs it
    trained, and the steps it left buy more trials until the next would pass the target
    (:func:`search.sweep.studies.top_up`)."""

    pruner: str = "none"
    sampler: str = "tpe"
    seed: int = 0
    workers: int = 1
    storage: str = ""
    heartbeat_interval: int = 10
    grace_period: int = 30
    warmup_cycles: float = 0.5
    n_startup_trials: int = 5
    seed_mode: str = "shared"
    budget: str = "trials"


def _parse_optuna(path: Path, raw: Any) -> OptunaSpec:
    spec = _build(OptunaSpec, path, "optuna", raw)
    for key in ("heartbeat_interval", "grace_period"):
        _check_number(path, f"optuna.{key}", getattr(spec, key), min=1, unit="second(s)")
    _check_number(path, "optuna.seed", spec.seed, min=0)
    _check_number(path, "optuna.warmup_cycles", spec.warmup_cycles, kind="float", min=0)
    _check_number(path, "optuna.n_startup_trials", spec.n_startup_trials, min=0)
    _check_number(path, "optuna.workers", spec.workers, min=1)
    if spec.grace_period < 2 * spec.heartbeat_interval:
        raise StudyDefinitionError(
            path,
            "optuna.grace_period",
            f"must be at least twice heartbeat_interval (2 x {spec.heartbeat_interval}"
            f" = {2 * spec.heartbeat_interval} s), got {spec.grace_period}; "
            "with less, a live trial whose heartbeat is late would be taken for a dead one",
        )
    url = spec.storage
    if url and "://" not in url and not url.endswith(".log"):
        raise StudyDefinitionError(
            path,
            "optuna.storage",
            "must be an Optuna storage URL (sqlite:///x.db, postgresql+psycopg2://user@host/db"
            f", journal:///x.log) or a journal file x.log, got {url!r}",
        )
    if url and in_memory(url):
        raise StudyDefinitionError(path, "optuna.storage", IN_MEMORY)
    _one_of(path, "optuna.pruner", spec.pruner, PRUNERS)
    _one_of(path, "optuna.sampler", spec.sampler, SAMPLERS)
    _one_of(path, "optuna.budget", spec.budget, BUDGETS)
    if spec.seed_mode not in SEED_MODES:
        raise StudyDefinitionError(
            path,
            "optuna.seed_mode",
            f"must be one of {list(SEED_MODES)} (shared: every trial of a stage has the same "
            f"data order and initial weights), got {spec.seed_mode!r}",
        )
    return spec


IN_MEMORY = (
    "an in-memory SQLite database keeps nothing: every worker process would see its own "
    "empty one and the results would be gone at exit; give a file, e.g. "
    "sqlite:///studies/x.db"
)


def in_memory(url: str) -> bool:
    """Whether a storage URL names an in-memory SQLite database (sqlite://, sqlite:///,
    sqlite:///:memory:, ...?mode=memory)."""
    if not url.startswith("sqlite:"):
        return False
    rest = url[len("sqlite:") :].lstrip("/")
    return rest.split("?")[0] in ("", ":memory:") or "mode=memory" in url


@dataclass(frozen=True)
class StudySpec:
    """Everything one study needs, from one TOML file (``path`` is where it came from)."""

    name: str
    path: str = ""
    data: DataSpec = DataSpec()
    model: ModelSpec = ModelSpec()
    network: NetworkSpec = NetworkSpec()
    training: dict[str, Any] = field(default_factory=dict)
    search: dict[str, Range] = field(default_factory=dict)
    coarse: CoarseSpec = CoarseSpec()
    fine: FineSpec = FineSpec()
    final: FinalSpec = FinalSpec()
    optuna: OptunaSpec = OptunaSpec()

    @property
    def coarse_trials(self) -> int:
        return self.coarse.trials

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

    def search_stage(self, stage: str) -> CoarseSpec | FineSpec:
        """The table of a search stage: [coarse] for "coarse", [fine] for "fine"."""
        return self.coarse if stage == "coarse" else self.fine

    def stage_training(self, stage: str) -> dict[str, Any]:
        """The [training] values of a stage ("coarse", "fine", "final"), overrides applied."""
        values = dict(self.training)
        if stage == "fine":
            values.update(self.fine.training)
        elif stage == "final":
            values.update(self.final.training)
        return values

    def train_config(self, stage: str, params: dict[str, Any] | None = None) -> TrainConfig:
        """The TrainConfig of a stage ("coarse", "fine", "final") with trial params on top.

        Keys that are not TrainConfig fields (network fields, a user's own keys) are left out.
        """
        values = {**self.stage_training(stage), **(params or {})}
        return TrainConfig.from_dict({k: v for k, v in values.items() if k in TRAIN_FIELDS})

    def network_for(self, params: dict[str, Any] | None = None) -> NetworkSpec:
        """The built-in network with the searched network fields of ``params`` on top."""
        changes = {k: v for k, v in (params or {}).items() if k in NETWORK_FIELDS}
        if "hidden" in changes:
            changes["hidden"] = tuple(changes["hidden"])
        return dataclasses.replace(self.network, **changes) if changes else self.network

    def own_params(self, stage: str, params: dict[str, Any] | None = None) -> dict[str, Any]:
        """A user's function's own keys: [model.params] defaults, the stage's [training]
        values of them, then ``params`` (searched values)."""
        own = dict(self.model.params)
        values = {**self.stage_training(stage), **(params or {})}
        own |= {k: v for k, v in values.items() if k in own}
        # A list as TOML writes it, whether a default or a searched choice of lists.
        return {k: list(v) if isinstance(v, tuple) else v for k, v in own.items()}

    def with_overrides(self, **optuna_fields: Any) -> StudySpec:
        """A copy with some ``[optuna]`` fields replaced (CLI flags); None means keep."""
        changes = {k: v for k, v in optuna_fields.items() if v is not None}
        return dataclasses.replace(self, optuna=dataclasses.replace(self.optuna, **changes))


def parse_spec(raw: dict[str, Any], path: str | Path = "<string>") -> StudySpec:
    """Validate a parsed TOML document into a StudySpec, table by table."""
    path = Path(path)
    unknown = sorted(set(raw) - set(TABLES))
    if unknown:
        raise StudyDefinitionError(
            path, "top level", f"unknown keys {unknown}; allowed: {sorted(TABLES)}"
        )
    name = _parse_name(path, raw.get("name"))
    data = _parse_data(path, raw.get("data", {}))
    model = _parse_model(path, raw.get("model", {}))
    user = bool(model.train)
    if user and "network" in raw:
        raise StudyDefinitionError(
            path,
            "network",
            "describes the built-in network, but [model] train names your own; declare your "
            "network's settings with their defaults in [model.params] (n_hidden = 50, ...)",
        )
    own = tuple(model.params) if user else None
    network = _parse_network(path, raw.get("network", {}))
    training = _parse_training(path, "training", raw.get("training", {}), own=own)
    fixed = {"training": training, "network": dict(raw.get("network", {}))}
    search = _parse_search(path, raw.get("search", {}), model, fixed)
    spec = StudySpec(
        name=name,
        path=str(path),
        data=data,
        model=model,
        network=network,
        training=training,
        search=search,
        coarse=_parse_coarse(path, raw.get("coarse", {})),
        fine=_parse_fine(path, raw.get("fine", {}), own=own),
        final=_parse_final(path, raw.get("final", {}), own=own),
        optuna=_parse_optuna(path, raw.get("optuna", {})),
    )
    _check_stages(spec)
    unused = _unused_search(spec)
    if unused:
        raise StudyDefinitionError(path, f"search.{unused[0]}", unused[1])
    return spec


def check_point(spec: StudySpec, stage: str, point: dict[str, Any]) -> None:
    """Raise :class:`model.errors.SettingError` (naming the field) if a stage cannot train
    at ``point`` (searched values): its TrainConfig, and the built-in network's fields.
    The one check of a point, used by the study file's checks, narrowing and grids."""
    spec.train_config(stage, point)
    if not spec.model.train:
        check_network(spec.network_for(point))
    else:
        for key, value in point.items():
            default = spec.model.params.get(key)
            if (
                default is not None
                and _value_kind(default) == "int"
                and not isinstance(value, int)
            ):
                raise SettingError(
                    f"{key} takes integers (its default in [model.params] is {default!r}), "
                    f"got {key}={value!r}",
                    field=key,
                )


def _check_stages(spec: StudySpec) -> None:
    """Every stage trains at every combination of the ranges' corners (floats at both
    ends, integers at their bounds, every choice) and at their midpoints.

    A range that is only partly valid would fail trials at random. Names the file,
    the field and the value that cannot run.
    """
    points = points_to_check(spec.search)
    for stage in ("coarse", "fine", "final"):
        section = {"coarse": "training"}.get(stage, f"{stage}.training")
        try:
            check_point(spec, stage, {})
        except (ValueError, TypeError) as exc:  # wrong whatever [search] draws
            field_name = getattr(exc, "field", None)
            where = f"{section}.{field_name}" if field_name else section
            if field_name in NETWORK_FIELDS and not spec.model.train:
                where = f"network.{field_name}"
            raise StudyDefinitionError(spec.path, where, str(exc)) from None
        for point in points:
            try:
                check_point(spec, stage, point)
            except (ValueError, TypeError) as exc:
                field_name = getattr(exc, "field", None) or ""
                searched = field_name in point
                where = f"search.{field_name}" if searched else section
                at = ", ".join(f"{k} = {describe_value(v)}" for k, v in point.items())
                what = (
                    f"{field_name} = {describe_value(point[field_name])} cannot run: "
                    if searched
                    else ""
                )
                in_stage = f" in the {stage} stage" if stage != "coarse" else ""
                raise StudyDefinitionError(
                    spec.path, where, f"{what}{exc} (at {at}{in_stage})"
                ) from None


def _unused_search(spec: StudySpec) -> tuple[str, str] | None:
    """A searched parameter the schedule never reads, with the reason."""
    if "schedule" in spec.search:
        return None  # each choice of schedule reads its own rates
    schedule = spec.train_config("coarse").schedule
    if schedule == "cyclical" and "eta" in spec.search:
        return "eta", "the cyclical schedule does not use eta; search eta_min or eta_max"
    if schedule != "cyclical":
        for name in ("eta_min", "eta_max"):
            if name in spec.search:
                return name, f"the {schedule} schedule uses eta, not {name}; search eta"
    return None


# What each schedule reads of [training] (the rest of TrainConfig is read by all of them).
SCHEDULE_READS = {
    "cyclical": ("eta_min", "eta_max", "n_s", "n_s_epochs", "n_cycles", "evals_per_cycle"),
    "step": ("eta", "decay", "n_epochs"),
    "constant": ("eta", "n_epochs"),
}
SCHEDULE_FIELDS = frozenset(k for reads in SCHEDULE_READS.values() for k in reads)


def unread_fields(spec: StudySpec, stage: str, varied: Sequence[str] = ()) -> set[str]:
    """The settings the stage's built-in training never reads, so they cannot change what
    its trials trained to: another schedule's fields (``eta`` with "cyclical"), and
    ``sigma`` without init = "sigma"; none where the schedule (or init) is searched or
    ``varied`` by an experiment's grid. A user's function is given every value: none for
    it."""
    if spec.model.train:
        return set()
    searched = set(spec.search) | set(varied)
    out: set[str] = set()
    if "schedule" not in searched:
        schedule = spec.stage_training(stage).get("schedule", TrainConfig.schedule)
        out |= SCHEDULE_FIELDS - set(SCHEDULE_READS.get(schedule, ()))
    if "init" not in searched and spec.network.init != "sigma":
        out.add("sigma")
    return out - searched


def ignored_settings(spec: StudySpec) -> list[tuple[str, str]]:
    """The fixed settings of a study file that the built-in network and its schedules
    never read, as (field, why and the fix): a schedule's field another schedule reads
    (``eta`` with the cyclical schedule, ``n_epochs`` with it, ``eta_max`` with "step"),
    and ``[network] sigma`` without ``init = "sigma"``. Where ``schedule`` (or ``init``)
    is searched, each value reads its own fields, and none is ignored. A user's own
    training code is given every [training] value, so nothing is ignored for it."""
    if spec.model.train:
        return []
    out: list[tuple[str, str]] = []
    default = TrainConfig.schedule
    if "schedule" not in spec.search:
        tables = (
            ("training", spec.training, ("coarse", "fine", "final")),
            ("fine.training", spec.fine.training, ("fine",)),
            ("final.training", spec.final.training, ("final",)),
        )
        for table, values, stages in tables:
            schedules = sorted({spec.stage_training(s).get("schedule", default) for s in stages})
            reads = {k for sch in schedules for k in SCHEDULE_READS.get(sch, ())}
            unread = set.intersection(*(unread_fields(spec, stage) for stage in stages))
            for name in sorted(set(values) & unread):
                readers = [f'"{sch}"' for sch, r in SCHEDULE_READS.items() if name in r]
                out.append(
                    (
                        f"{table}.{name}",
                        f"{name} = {values[name]!r} is not read by the {' or '.join(schedules)} "
                        f"schedule, which read{'s' if len(schedules) == 1 else ''} "
                        f"{', '.join(sorted(reads))}"
                        f": remove it, or set schedule = {' or '.join(readers)}, "
                        f"which read{'s' if len(readers) == 1 else ''} it",
                    )
                )
    if "init" not in spec.search and spec.network.init != "sigma":
        said = f'init is "{spec.network.init}"'
        if spec.network.sigma is not None and "sigma" in unread_fields(spec, "coarse"):
            out.append(
                (
                    "network.sigma",
                    f'sigma = {spec.network.sigma!r} is read only with init = "sigma" '
                    f'({said}): set init = "sigma" to draw the weights from '
                    "normal(0, sigma^2), or remove sigma",
                )
            )
        if "sigma" in spec.search:
            out.append(
                (
                    "search.sigma",
                    f'sigma is read only with init = "sigma" ({said}): set [network] '
                    'init = "sigma", or stop searching sigma',
                )
            )
    return out


def read_toml(path: Path, *, missing: str) -> dict[str, Any]:
    """A TOML file's contents; a missing, unreadable or broken file is a StudyDefinitionError."""
    if path.is_dir():
        raise StudyDefinitionError(path, "file", "is a directory; pass a .toml file in it")
    if not path.is_file():
        raise StudyDefinitionError(path, "file", missing)
    try:
        text = path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as exc:
        raise StudyDefinitionError(
            path,
            "file",
            f"is not UTF-8 text (byte 0x{exc.object[exc.start]:02x} at offset {exc.start}); "
            "TOML files are UTF-8: save it with that encoding",
        ) from None
    except OSError as exc:
        raise StudyDefinitionError(path, "file", f"cannot be read: {exc.strerror}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise StudyDefinitionError(path, "file", f"not valid TOML: {exc}") from None


MISSING_STUDY = (
    "no such study file; `c2f init` copies the shipped study files into ./studies/ "
    "(or pass --study PATH)"
)


def load_spec(path: str | Path) -> StudySpec:
    """Read and validate a study file."""
    path = Path(path)
    raw = read_toml(path, missing=MISSING_STUDY)
    spec = parse_spec(raw, path)
    ignored = ignored_settings(spec)
    if ignored:
        raise StudyDefinitionError(path, *ignored[0])
    return spec
