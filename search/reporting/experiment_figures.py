"""An experiment's figures and its Markdown section, from its stored grid study.

One figure per experiment, by its kind: ``curves`` (loss, cost and accuracy
against update step, a row of panels per setting), ``lambda`` (final accuracy
and loss against lambda on a log axis) or ``overfit`` (training loss and
accuracy on the few training images). Diverged and blown-up runs are marked and
cut off instead of squashing the rest.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import cast

import matplotlib.pyplot as plt
import optuna
from matplotlib.figure import Figure

from search.config.experiment import Experiment
from search.reporting.tables import label, table
from search.sweep.grid import NotRun, Row, results
from search.sweep.objective import curves_of

DPI = 90


def draw(
    spec_path: str | Path, out_dir: Path, *, storage: str | None = None
) -> tuple[str, list[Path]]:
    """A markdown section (a table of the grid points) and the PNGs of one experiment.

    Raises :class:`search.sweep.grid.NotRun` (naming the command as the user runs
    commands, ``c2f`` or ``python -m``) if the experiment's study is missing or has no
    finished trial.
    """
    try:
        experiment, study, table_rows = results(spec_path, storage=storage)
    except NotRun as exc:
        from search.cli import command

        exc.command = command("experiment")
        raise
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
    curves = curves_of(row.trial)
    return curves if curves.get("step") else None


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


def _save(fig: Figure, path: Path, title: str, note: str) -> Path:
    """Title the figure (the data note on a second line), write it and close it."""
    fig.suptitle(f"{title}\n{note}" if note else title)
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def _draw_curves(
    experiment: Experiment, table_rows: list[Row], out_dir: Path, title: str, note: str
) -> Path:
    """Rows of panels (loss, cost, accuracy vs update step), one line per grid point.

    batch_norm (or else the first grid parameter) varies along the lines of a panel;
    each value of the other grid parameters gets its own row of panels.
    """
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
    return _save(fig, out_dir / f"{experiment.name}_curves.png", title, note)


def _draw_lambda(
    experiment: Experiment, table_rows: list[Row], out_dir: Path, title: str, note: str
) -> Path:
    """Final validation (and test) accuracy and losses against lambda, log x axis."""
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
        # The runs with curves, each with its last evaluation (a run with curves has a trial).
        done = [r for r in group if _curves(r) is not None]
        ends = ("train_loss", "val_loss", "val_acc")
        last = [{m: cast(dict[str, list[float]], _curves(r))[m][-1] for m in ends} for r in done]
        for r, end in zip(done, last, strict=True):
            losses = [end["train_loss"], end["val_loss"]]
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
        test = [
            cast(optuna.trial.FrozenTrial, r.trial).user_attrs.get("test_acc", float("nan"))
            for r in done
        ]
        ax_acc.plot(
            lam, [e["val_acc"] for e in last], "o-", color=color, label=f"{text} validation"
        )
        ax_acc.plot(lam, test, "s--", color=color, alpha=0.7, label=f"{text} test")
        for metric, style, what in (
            ("train_loss", "o-", "train"),
            ("val_loss", "s--", "validation"),
        ):
            ax_loss.plot(
                lam, [e[metric] for e in last], style, color=color, label=f"{text} {what}"
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
    return _save(fig, out_dir / f"{experiment.name}_lambda.png", title, note)


def _draw_overfit(
    experiment: Experiment, table_rows: list[Row], out_dir: Path, title: str, note: str
) -> Path:
    """Training (and validation) loss and accuracy vs update step, one line per point."""
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
    return _save(fig, out_dir / f"{experiment.name}_overfit.png", title, note)
