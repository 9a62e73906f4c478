"""The search space: one grammar from a study file's ``[search]`` to Optuna and back.

A ``[search]`` entry is one of::

    l2_lambda = [1e-5, 1e-1]                          # log-uniform float (the short form)
    rho = {low = 0.0, high = 0.99}                    # uniform float
    eta_max = {low = 1e-3, high = 1e-1, log = true}   # log-uniform float
    decay = {low = 0.5, high = 1.0, step = 0.05}      # float on a grid of steps
    n_hidden = {int = [20, 200], log = true}          # integer (log: spread by ratio)
    batch_size = {choice = [50, 100, 200]}            # choices: numbers, strings, booleans,
    hidden = {choice = [[50], [50, 50], [100, 50]]}   # ... or lists (layer widths)

Everything that turns a range into something else lives here: its checks
(:func:`parse_range`), the Optuna distribution and suggestion (:meth:`Range.suggest`),
the values to check before any trial (:meth:`Range.corners`), how a value reads in
a table (:meth:`Range.format`), the axis a figure draws it on (:attr:`Range.axis`),
narrowing's view of a range (:attr:`Range.scale`, :meth:`Range.narrowed`) and the form
recorded on a study (:meth:`Range.to_record`, :func:`from_record`). Choices of lists are
given to Optuna as strings (``"50-50"``; Optuna's categorical values are scalars)
and decoded back by looking them up among the range's own choices.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, replace
from typing import Any

import optuna
from optuna.distributions import (
    BaseDistribution,
    CategoricalDistribution,
    FloatDistribution,
    IntDistribution,
)

from model.errors import UsageError

KINDS = ("float", "int", "choice")
TABLE_KEYS = {"low", "high", "log", "step", "int", "choice"}
# A decade on a linear axis, for narrowing's margin and extension (given in decades): this
# share of the coarse range's width. With the default margin of 0.25, a tenth of the width.
LINEAR_DECADE = 0.4

Space = dict[str, "Range"]


class RangeError(UsageError):
    """A ``[search]`` entry is not a range: the message says what is allowed."""


def _is_number(v: Any) -> bool:
    return isinstance(v, int | float) and not isinstance(v, bool)


def _is_int(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def encode(value: Any) -> Any:
    """A choice as an Optuna parameter value: scalars as they are, a list of integers as
    ``"50-50"``, any other list as its JSON text."""
    if isinstance(value, list | tuple):
        if value and all(_is_int(v) for v in value):
            return "-".join(str(v) for v in value)
        return json.dumps(list(value))
    return value


def _freeze(value: Any) -> Any:
    return tuple(_freeze(v) for v in value) if isinstance(value, list | tuple) else value


@dataclass(frozen=True)
class Range:
    """One searched parameter: a float or integer range, or a set of choices."""

    name: str
    kind: str  # "float", "int" or "choice"
    low: float = 0.0
    high: float = 0.0
    log: bool = False
    step: float | None = None
    choices: tuple[Any, ...] = ()

    # ---------------------------------------------------------------- Optuna

    def distribution(self) -> BaseDistribution:
        if self.kind == "float":
            return FloatDistribution(self.low, self.high, log=self.log, step=self.step)
        if self.kind == "int":
            return IntDistribution(int(self.low), int(self.high), log=self.log, step=1)
        return CategoricalDistribution([encode(c) for c in self.choices])

    def suggest(self, trial: optuna.Trial) -> Any:
        """The trial's value (``log=True`` where log, so the dashboard draws log axes)."""
        if self.kind == "float":
            return trial.suggest_float(
                self.name, self.low, self.high, log=self.log, step=self.step
            )
        if self.kind == "int":
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return self.decode(trial.suggest_categorical(self.name, [encode(c) for c in self.choices]))

    def decode(self, value: Any) -> Any:
        """A trial's parameter value as the setting it stands for (a choice of a list: the
        list, as a tuple)."""
        if self.kind != "choice":
            return int(value) if self.kind == "int" else float(value)
        for c in self.choices:
            if encode(c) == value:
                return c
        return value  # a value from an older version of the range: leave it as recorded

    # ---------------------------------------------------------------- checks and views

    @property
    def bounds(self) -> tuple[float, float]:
        """(low, high) of a float or integer range."""
        return self.low, self.high

    def corners(self) -> list[Any]:
        """The values that bound what the range can draw: both ends, or every choice."""
        if self.kind == "choice":
            return list(self.choices)
        if self.kind == "int":
            return [int(self.low), int(self.high)]
        return [self.low, self.high]

    def midpoint(self) -> Any:
        """A value inside the range (the geometric middle where log; the first choice)."""
        if self.kind == "choice":
            return self.choices[0]
        mid = math.sqrt(self.low * self.high) if self.log else (self.low + self.high) / 2
        return int(round(mid)) if self.kind == "int" else mid

    @property
    def axis(self) -> str:
        """How a figure draws it: "log", "linear" or "category"."""
        if self.kind == "choice":
            return "category"
        return "log" if self.log else "linear"

    @property
    def scale(self) -> Callable[[float], float]:
        """Narrowing's view of a value: its position on the range's axis."""
        return math.log10 if self.log else (lambda v: v)

    def format(self, value: Any) -> str:
        """A value of this parameter as a table shows it."""
        if self.kind == "choice" or not _is_number(value):
            return describe_value(value)
        if self.kind == "int":
            return str(int(value))
        return f"{value:.3e}" if self.log else f"{value:.4g}"

    def describe(self) -> str:
        """The range as a line says it: ``1.00e-05 .. 1.00e-01 (log)``, ``{50, 100}``."""
        if self.kind == "choice":
            return "{" + ", ".join(describe_value(c) for c in self.choices) + "}"
        what = ["log"] if self.log else []
        if self.kind == "int":
            what.insert(0, "integer")
        if self.step is not None:
            what.append(f"step {self.step:g}")
        return f"{self.format(self.low)} .. {self.format(self.high)}" + (
            f" ({', '.join(what)})" if what else ""
        )

    def contains(self, value: Any) -> bool:
        if self.kind == "choice":
            return value in self.choices or value in [encode(c) for c in self.choices]
        return _is_number(value) and self.low <= value <= self.high

    def to_record(self) -> Any:
        """The range as recorded on a study (user attr ``ranges``): the grammar's own form,
        ``[low, high]`` for a log float without a step (as before other kinds existed)."""
        if self.kind == "float" and self.log and self.step is None:
            return [float(self.low), float(self.high)]
        if self.kind == "choice":
            return {"choice": [list(c) if isinstance(c, tuple) else c for c in self.choices]}
        if self.kind == "int":
            record: dict[str, Any] = {"int": [int(self.low), int(self.high)]}
        else:
            record = {"low": float(self.low), "high": float(self.high)}
        if self.log:
            record["log"] = True
        if self.step is not None:
            record["step"] = self.step
        return record

    # ---------------------------------------------------------------- narrowing

    def narrowed(self, lo: float, hi: float) -> Range:
        """The same kind of range between ``lo`` and ``hi`` (integers stay integers, a step
        keeps its grid)."""
        if self.kind == "int":
            lo_i, hi_i = math.floor(lo), math.ceil(hi)
            if self.log:
                lo_i = max(lo_i, 1)
            return replace(self, low=lo_i, high=max(hi_i, lo_i + 1))
        if self.step is not None:
            k_lo = math.floor((lo - self.low) / self.step + 1e-9)
            k_hi = math.ceil((hi - self.low) / self.step - 1e-9)
            lo, hi = self.low + k_lo * self.step, self.low + k_hi * self.step
            if hi <= lo:
                hi = lo + self.step
        return replace(self, low=lo, high=hi)

    def with_choices(self, choices: list[Any]) -> Range:
        return replace(self, choices=tuple(choices))


def describe_value(value: Any) -> str:
    """A setting as text: numbers short, lists as ``[50, 50]``, strings as they are."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, list | tuple):
        return "[" + ", ".join(describe_value(v) for v in value) + "]"
    return str(value)


def table_value(value: Any) -> str:
    """A parameter's value in a table or a status line: floats as 1.000e-03, anything
    else as written."""
    if isinstance(value, float):
        return f"{value:.3e}"
    return describe_value(value)


def parse_range(name: str, value: Any) -> Range:
    """One ``[search]`` entry as a :class:`Range`; :class:`RangeError` says what is wrong
    and what is allowed."""
    if isinstance(value, list | tuple):
        if len(value) != 2 or not all(_is_number(v) for v in value):
            raise RangeError(
                "must be [low, high] numbers (a log-uniform range) or a table such as "
                "{low = 0.0, high = 0.99}, {int = [20, 200]} or {choice = [50, 100]}, "
                f"got {value!r}"
            )
        return _number_range(name, "float", value[0], value[1], log=True, step=None)
    if not isinstance(value, Mapping):
        raise RangeError(
            "must be [low, high] (log-uniform) or a table: {low = .., high = ..} (add "
            "log = true, step = ..), {int = [low, high]} or {choice = [..]}, "
            f"got {value!r}"
        )
    unknown = sorted(set(value) - TABLE_KEYS)
    if unknown:
        raise RangeError(f"unknown keys {unknown}; allowed: {sorted(TABLE_KEYS)}")
    log = value.get("log", False)
    if not isinstance(log, bool):
        raise RangeError(f"log must be true or false, got log={log!r}")
    step = value.get("step")
    if "choice" in value:
        others = sorted(set(value) - {"choice"})
        if others:
            raise RangeError(f"a choice takes no other keys, got {others}")
        return _choice_range(name, value["choice"])
    if "int" in value:
        others = sorted(set(value) - {"int", "log"})
        if others:
            raise RangeError(
                f"an integer range is {{int = [low, high]}} with log = true/false, got {others}"
            )
        bounds = value["int"]
        if (
            not isinstance(bounds, list | tuple)
            or len(bounds) != 2
            or not all(_is_int(b) for b in bounds)
        ):
            raise RangeError(f"int must be [low, high] integers, got int={bounds!r}")
        return _number_range(name, "int", bounds[0], bounds[1], log=log, step=None)
    if "low" not in value or "high" not in value:
        raise RangeError(
            f"a float range needs low and high, e.g. {{low = 0.0, high = 0.99}}, got {dict(value)}"
        )
    if not all(_is_number(value[k]) for k in ("low", "high")):
        raise RangeError(f"low and high must be numbers, got {dict(value)}")
    if step is not None and not (_is_number(step) and step > 0 and math.isfinite(step)):
        raise RangeError(f"step must be a number > 0, got step={step!r}")
    if step is not None and log:
        raise RangeError("a log range cannot have a step (Optuna draws one or the other)")
    return _number_range(name, "float", value["low"], value["high"], log=log, step=step)


def _number_range(
    name: str, kind: str, low: float, high: float, *, log: bool, step: float | None
) -> Range:
    if not (math.isfinite(low) and math.isfinite(high)):
        raise RangeError(f"bounds must be finite numbers, got low={low!r}, high={high!r}")
    if low > high:
        raise RangeError(
            f"low must be < high, got [{low!r}, {high!r}]: swap the bounds ([{high!r}, {low!r}])"
        )
    if low == high:
        raise RangeError(
            f"low must be < high, got [{low!r}, {high!r}]: to hold {name} at {low!r}, take it "
            "out of [search] and set it in its own section ([training], [network] or "
            "[model.params])"
        )
    if log and low <= 0:
        raise RangeError(
            f"a log range needs bounds > 0, got low={low!r}: raise low (e.g. "
            f"{name} = [1e-6, {high!r}]) or search it uniformly ({{low = {low!r}, high = "
            f"{high!r}}})"
        )
    if step is not None:
        n = (high - low) / step
        if abs(n - round(n)) > 1e-9 * max(1.0, abs(n)):
            raise RangeError(
                f"high - low must be a whole number of steps, got low={low!r}, high={high!r}, "
                f"step={step!r}"
            )
    if kind == "int":
        return Range(name, "int", int(low), int(high), log=log)
    return Range(name, "float", float(low), float(high), log=log, step=step)


def _choice_range(name: str, choices: Any) -> Range:
    if not isinstance(choices, list) or not choices:
        raise RangeError(f"choice must be a non-empty list, got choice={choices!r}")
    for c in choices:
        scalar = isinstance(c, bool | int | float | str)
        listed = isinstance(c, list) and bool(c) and all(isinstance(v, int | float) for v in c)
        if not (scalar or listed):
            raise RangeError(
                "choices must be numbers, strings, booleans or non-empty lists of numbers, "
                f"got {c!r}"
            )
    frozen = [_freeze(c) for c in choices]
    encoded = [encode(c) for c in frozen]
    if len(set(map(repr, encoded))) != len(encoded):
        raise RangeError(f"has repeated choices: {choices!r}")
    return Range(name, "choice", choices=tuple(frozen))


def from_record(recorded: Mapping[str, Any]) -> Space:
    """A space from a study's recorded ranges (user attr ``ranges``)."""
    return {name: parse_range(name, value) for name, value in recorded.items()}


def to_record(space: Mapping[str, Range]) -> dict[str, Any]:
    return {name: r.to_record() for name, r in space.items()}


def suggest(trial: optuna.Trial, space: Mapping[str, Range]) -> dict[str, Any]:
    """One value per range, decoded (a choice of layer widths is a tuple)."""
    return {name: r.suggest(trial) for name, r in space.items()}


def decode(space: Mapping[str, Range], params: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's params as settings (names outside the space stay as they are)."""
    return {k: space[k].decode(v) if k in space else v for k, v in params.items()}


def distributions(space: Mapping[str, Range]) -> dict[str, BaseDistribution]:
    return {name: r.distribution() for name, r in space.items()}


def points_to_check(space: Mapping[str, Range], *, cap: int = 512) -> list[dict[str, Any]]:
    """The points that bound what the space can draw: the midpoint and every combination
    of the ranges' corners (each range's values alone, the others at their midpoints,
    when the combinations would be more than ``cap``)."""
    import itertools

    names = sorted(space)
    mid = {n: space[n].midpoint() for n in names}
    points = [dict(mid)] if names else [{}]
    sizes = math.prod(len(space[n].corners()) for n in names) if names else 0
    if names and sizes <= cap:
        for combo in itertools.product(*(space[n].corners() for n in names)):
            points.append(dict(zip(names, combo, strict=True)))
    else:
        for n in names:
            points += [{**mid, n: v} for v in space[n].corners()]
    return points


def did_you_mean(name: str, known: list[str] | tuple[str, ...] | set[str]) -> str:
    """`` (did you mean 'batch_size'?)`` for a near miss, else ""."""
    import difflib

    close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.6)
    return f" (did you mean {close[0]!r}?)" if close else ""
