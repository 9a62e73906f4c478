"""Markdown tables and the formatting of their cells."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import optuna
from optuna.trial import FrozenTrial

from search.config import space as sp
from search.config.experiment import Experiment
from search.sweep import replicates as rep
from search.sweep.grid import Row
from search.sweep.narrowing import FROM_COARSE
from search.sweep.objective import curves_of

LABELS = {"l2_lambda": "lambda", "eta_max": "eta_max", "eta_min": "eta_min", "eta": "eta"}


# How the notes and the report name each [final] choose rule (one table for both).
RULES = {
    "robust": "the best predicted by the model of the landscape, kept off a cliff's edge "
    "among those alike within the seed noise",
    "model": "the best predicted by the model of the landscape",
    "best": "the best mean over seeds",
    "smoothed": "the best smoothed over neighbouring configurations",
}


def rule_setting(choose: str) -> str:
    """The study-file line of a rule: ``[final] choose = "model"``."""
    return f'[final] choose = "{choose}"'


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A Markdown table: a header row, the rule, one line per row."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


# ----------------------------------------------------------------------------- studies


def param_label(param: str) -> str:
    """A searched parameter's name as the report writes it ("lambda" for l2_lambda)."""
    return LABELS.get(param, param)


value_text = sp.table_value


def params_text(params: dict[str, Any]) -> str:
    """Trial params in one line: "lambda=1.000e-03, eta_max=1.000e-01, batch_size=100"."""
    return ", ".join(f"{param_label(k)}={value_text(v)}" for k, v in params.items())


def ranges_table(ranges: dict[str, Any]) -> str:
    """Each searched parameter's kind and range, as recorded on a study (user attr
    ``ranges``: :func:`search.config.space.to_record`)."""
    rows = []
    for name, r in sp.from_record(ranges).items():
        kind = {"float": "float", "int": "integer", "choice": "choice"}[r.kind]
        if r.log:
            kind += ", log"
        rows.append((param_label(name), kind, r.describe().split(" (")[0]))
    return markdown_table(("parameter", "kind", "range"), rows)


def narrowing_text(attrs: dict[str, Any]) -> str:
    """How the fine ranges were chosen, from the fine study's recorded ``narrowing``."""
    n = attrs.get("narrowing")
    margin = attrs.get("margin")
    if not n:
        return (
            f"Ranges narrowed around the top {attrs['top_k']} coarse trials, "
            f"widened by {margin} decades on each side."
        )
    if n.get("sigma") is None:
        text = (
            f"Ranges around the {attrs['top_k']} best coarse configurations, widened by "
            f"{margin} decades on each side (no replicates: no estimate of the seed noise)."
        )
    elif n.get("noise_from") == "model":
        text = (
            f"Ranges cover the {len(n['within'])} coarse configuration(s) the model of the "
            "landscape predicts within noise of the best (one standard error of the "
            "difference; the model's seed noise of one run is "
            f"{n['sigma']:.4f}) and the {attrs['top_k']} best means, widened by {margin} "
            "decades on each side."
        )
    else:
        text = (
            f"Ranges cover the {len(n['within'])} coarse configuration(s) within the seed "
            f"noise of the best (one standard error, with the sd of one run "
            f"{n['sigma']:.4f} pooled over the replicated configurations) and the "
            f"{attrs['top_k']} best means, widened by {margin} decades on each side."
        )
    extra = [f"{name}: {what}." for name, what in n.get("extended", {}).items()]
    for note in n.get("notes", []):
        extra.append(f"**{note}.**" if "flat within noise" in note else f"{note}.")
    return " ".join([text, *extra])


def run_cost(trial: FrozenTrial, carried: str) -> tuple[str, str]:
    """A run's epochs and wall time, as cells; a run the fine stage carried over from the
    coarse one trained there: ``carried`` and "-" (its cost is counted in that stage)."""
    if FROM_COARSE in trial.user_attrs:
        return carried, "-"
    return (
        f"{trial.user_attrs.get('epochs_run', 0):.2f}",
        f"{trial.user_attrs.get('wall_time', 0):.1f}",
    )


def top_table(study: optuna.Study, names: list[str], k: int = 10, *, replicates: int = 1) -> str:
    """The ``k`` best configurations: val acc mean +- sd over n seeds, params, epochs and
    wall time of one run."""
    rows = []
    for c in rep.study_configurations(study, replicates)[:k]:
        first = min(c.trials, key=lambda t: t.number)
        rows.append(
            (
                c.number,
                f"{c.mean:.4f}",
                f"{c.sd:.4f}" if c.n > 1 else "-",
                c.n,
                *(value_text(c.params[n]) if n in c.params else "-" for n in names),
                *run_cost(first, "(coarse)"),
            )
        )
    header = (
        "trial",
        "val acc (mean)",
        "sd",
        "n",
        *(param_label(n) for n in names),
        "epochs run",
        "wall time (s)",
    )
    return markdown_table(header, rows)


# ----------------------------------------------------------------------------- experiments


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


def grid_cell(name: str, value: Any) -> str:
    """A grid value in a table cell: "yes", "50-50", "0.001"."""
    if name == "batch_norm":
        return "yes" if value else "no"
    if name == "hidden":
        return "-".join(map(str, value))
    if isinstance(value, float):
        return f"{value:.3g}"
    return str(value)


def metric_cell(value: Any, spec: str) -> str:
    """A measured number in a table cell; "–" for none or a non-finite one."""
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
    cells_of_rows = []
    for row in table_rows:
        cells = [grid_cell(n, row.point[n]) for n in names]
        t = row.trial
        if t is None:
            cells += ["not run"] + [""] * (len(head) - len(names) - 1)
        else:
            curves = curves_of(t)
            last = {
                m: (curves.get(m) or [None])[-1]
                for m in ("train_loss", "val_loss", "train_acc", "val_acc")
            }
            cells += [
                *(metric_cell(last[m], ".4f") for m in last),
                metric_cell(t.user_attrs.get("test_acc"), ".4f"),
                metric_cell(t.user_attrs.get("epochs_run"), ".1f"),
                "**yes**" if t.user_attrs.get("diverged") else "no",
                metric_cell(t.user_attrs.get("wall_time"), ".1f"),
            ]
        cells_of_rows.append(cells)
    return markdown_table(head, cells_of_rows)
