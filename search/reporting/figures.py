"""The figures of a study's coarse and fine stages, from its stored trials.

- validation accuracy against each searched parameter on a log axis, coarse and
  fine together; pruned trials grey, at their last reported validation accuracy;
- the optimisation history of each stage (trial number against value, best so far);
- the learning curves of each stage's top 5 trials, pruned trials' curves in light grey.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import matplotlib.pyplot as plt
import optuna
from optuna.trial import FrozenTrial, TrialState

from model.train import History
from search.config import space as sp
from search.reporting.tables import param_label, params_text
from search.sweep import replicates as rep
from search.sweep.objective import curves_of

STAGE_COLOURS = {"coarse": "tab:blue", "fine": "tab:orange"}
STAGE_MARKERS = {"coarse": "o", "fine": "^"}
PRUNED_COLOUR = "0.6"
CURVE_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")
DPI = 120


def last_value(t: FrozenTrial) -> float | None:
    """A finished trial's value: its final value, or a pruned trial's last reported one."""
    if t.state == TrialState.COMPLETE:
        value = t.value
    elif t.state == TrialState.PRUNED and t.intermediate_values:
        value = t.intermediate_values[max(t.intermediate_values)]
    else:
        return None
    return value if value is not None and math.isfinite(value) else None


def _finished(study: optuna.Study) -> tuple[list[FrozenTrial], list[FrozenTrial]]:
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == TrialState.COMPLETE and last_value(t) is not None]
    pruned = [t for t in trials if t.state == TrialState.PRUNED and last_value(t) is not None]
    return complete, pruned


def _save(fig: plt.Figure, path: Path) -> Path:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    plt.close(fig)
    return path


def zoom(values: Sequence[float], *, extra: Sequence[float] = ()) -> tuple[float, float]:
    """y limits that show the region that matters: from a little below the lower
    quartile's distance under the best (four times it) to just above the best;
    ``extra`` (means +- sd) must fit too. Far-off points are drawn at the edge."""
    finite = sorted(v for v in values if v is not None and math.isfinite(v))
    if not finite:
        return 0.0, 1.0
    top = max(finite + [v for v in extra if math.isfinite(v)])
    q25 = finite[len(finite) // 4]
    lo = max(finite[0], top - 4 * max(top - q25, 0.005))
    lo = min([lo, *(v for v in extra if math.isfinite(v))])
    pad = 0.08 * max(top - lo, 0.01)
    return lo - pad, top + pad


def _clipped(ax, xs: list[float], ys: list[float], lo: float, *, marker: str = "v") -> None:  # noqa: ANN001
    """Points below the axis drawn on its lower edge, so none is hidden."""
    low = [(x, y) for x, y in zip(xs, ys, strict=True) if y < lo]
    if low:
        ax.scatter(
            [x for x, _ in low],
            [lo] * len(low),
            s=30,
            marker=marker,
            c="tab:gray",
            clip_on=False,
            label=f"below the axis ({len(low)}: further below the best than it shows)",
            zorder=6,
        )


def param_range(studies: dict[str, optuna.Study], param: str) -> sp.Range | None:
    """The parameter's range as the first stage recorded it (the coarse one): its axis."""
    for study in studies.values():
        recorded = study.user_attrs.get("ranges", {})
        if param in recorded:
            return sp.parse_range(param, recorded[param])
    return None


def draw_param(studies: dict[str, optuna.Study], param: str, path: Path, *, title: str) -> Path:
    """Validation accuracy against ``param``, every stage on one axes: a log axis where
    the range is log, a linear one where not, and a strip plot (one column a level,
    the runs spread a little sideways) for a choice."""
    fig, ax = plt.subplots(figsize=(11, 5))
    r = param_range(studies, param)
    levels: list[Any] = []
    if r is not None and r.kind == "choice":
        levels = [sp.encode(c) for c in r.choices]
        for study in studies.values():  # a fine study's levels are among the coarse ones
            for t in study.get_trials(deepcopy=False):
                if param in t.params and t.params[param] not in levels:
                    levels.append(t.params[param])

    def x(value: Any, jitter: int | None = None) -> float:
        if not levels:
            return float(value)
        if jitter is None:  # a configuration's mean, the chosen star: on the level itself
            return float(levels.index(value))
        # A fixed spread by trial number: the same figure every time.
        return levels.index(value) + ((jitter * 0.618) % 1 - 0.5) * 0.3

    for stage, study in studies.items():
        complete, pruned = _finished(study)
        pruned = [t for t in pruned if param in t.params]
        complete = [t for t in complete if param in t.params]
        marker = STAGE_MARKERS[stage]
        if pruned:
            ax.scatter(
                [x(t.params[param], t.number) for t in pruned],
                [cast(float, last_value(t)) for t in pruned],  # _finished dropped the None
                s=14,
                c=PRUNED_COLOUR,
                marker=marker,
                alpha=0.7,
                label=f"{stage}: pruned ({len(pruned)}, at last report)",
                zorder=2,
            )
        if complete:
            ax.scatter(
                [x(t.params[param], t.number) for t in complete],
                [cast(float, t.value) for t in complete],  # _finished dropped the None
                s=40,
                c=STAGE_COLOURS[stage],
                marker=marker,
                edgecolors="black",
                linewidths=0.5,
                label=f"{stage}: complete ({len(complete)})",
                zorder=3,
            )
        replicated = [c for c in rep.study_configurations(study) if c.n > 1 and param in c.params]
        if replicated:
            ax.errorbar(
                [x(c.params[param]) for c in replicated],
                [c.mean for c in replicated],
                yerr=[c.sd for c in replicated],
                fmt="D",
                ms=7,
                mfc="white",
                mec=STAGE_COLOURS[stage],
                ecolor=STAGE_COLOURS[stage],
                capsize=4,
                label=f"{stage}: mean +- sd over seeds ({len(replicated)} configurations)",
                zorder=4,
            )
        recorded = study.user_attrs.get("ranges", {})
        if stage == "fine" and param in recorded:
            fine = sp.parse_range(param, recorded[param])
            if fine.kind == "choice":
                for i, level in enumerate(sp.encode(c) for c in fine.choices):
                    ax.axvspan(
                        x(level) - 0.4,
                        x(level) + 0.4,
                        color=STAGE_COLOURS[stage],
                        alpha=0.08,
                        label="fine levels" if i == 0 else None,
                    )
            else:
                ax.axvspan(
                    fine.low, fine.high, color=STAGE_COLOURS[stage], alpha=0.08, label="fine range"
                )
    best = _best(studies)
    if best is not None and param in best[1].params:
        stage, c = best
        ax.scatter(
            [x(c.params[param])],
            [c.mean],
            s=220,
            marker="*",
            c="gold",
            edgecolors="black",
            linewidths=0.8,
            label=f"chosen: {stage} configuration {c.number} ({c.describe()})",
            zorder=5,
        )
    values, xs, extra, completed = [], [], [], []
    for study in studies.values():
        complete, pruned = _finished(study)
        for t in complete + pruned:
            if param in t.params:
                values.append(cast(float, last_value(t)))
                xs.append(x(t.params[param], t.number))
        completed += [cast(float, t.value) for t in complete if param in t.params]
        for c in rep.study_configurations(study):
            if c.n > 1 and param in c.params:
                extra += [c.mean - c.sd, c.mean + c.sd]
    # The limits from the completed runs: a pruned run's last report is mid-training.
    lo, hi = zoom(completed or values, extra=extra)
    ax.set_ylim(lo, hi)
    _clipped(ax, xs, values, lo)
    if levels:
        ax.set_xticks(
            range(len(levels)), [sp.describe_value(r.decode(v)) if r else str(v) for v in levels]
        )
        ax.set_xlim(-0.6, len(levels) - 0.4)
        ax.set_xlabel(f"{param_label(param)} (choice)")
    elif r is None or r.log:
        ax.set_xscale("log")
        ax.set_xlabel(f"{param_label(param)} (log scale)")
    else:
        ax.set_xlabel(param_label(param) + (" (integer)" if r.kind == "int" else ""))
    ax.set_ylabel("validation accuracy")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)  # beside the points
    return _save(fig, path)


def _best(studies: dict[str, optuna.Study]) -> tuple[str, rep.Configuration] | None:
    """The configuration final retrained (its recorded params), else the best mean of the
    fine study, else of the coarse one (replicated configurations first)."""
    for stage in ("fine", "coarse"):
        if stage in studies and (configs := rep.study_configurations(studies[stage], 2)):
            final = studies[stage].user_attrs.get("final") or {}
            chosen = [c for c in configs if c.params == final.get("params")]
            return stage, (chosen or configs)[0]
    return None


def draw_history(studies: dict[str, optuna.Study], path: Path, *, title: str) -> Path:
    """Trial number against value for each stage, with the best value so far."""
    fig, axes = plt.subplots(1, len(studies), figsize=(6 * len(studies), 4.5), squeeze=False)
    for ax, (stage, study) in zip(axes[0], studies.items(), strict=True):
        complete, pruned = _finished(study)
        if pruned:
            ax.scatter(
                [t.number for t in pruned],
                [last_value(t) for t in pruned],
                s=14,
                c=PRUNED_COLOUR,
                label=f"pruned ({len(pruned)}, at last report)",
                zorder=2,
            )
        if complete:
            ax.scatter(
                [t.number for t in complete],
                [t.value for t in complete],
                s=30,
                c=STAGE_COLOURS[stage],
                edgecolors="black",
                linewidths=0.5,
                label=f"complete ({len(complete)})",
                zorder=3,
            )
            ordered = sorted(complete, key=lambda t: t.number)
            running, best = [], -math.inf
            for t in ordered:
                best = max(best, cast(float, t.value))  # _finished dropped the None
                running.append(best)
            ax.step(
                [t.number for t in ordered],
                running,
                where="post",
                color="black",
                label="best so far",
                zorder=4,
            )
        values = [cast(float, last_value(t)) for t in complete + pruned]
        lo, hi = zoom([cast(float, t.value) for t in complete] or values)
        ax.set_ylim(lo, hi)
        _clipped(ax, [t.number for t in complete + pruned], values, lo)
        ax.set_xlabel("trial number")
        ax.set_ylabel("validation accuracy")
        ax.set_title(f"{stage} ({study.study_name})")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def _finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _series(curves: dict, name: str) -> list[float] | None:
    """A curve as floats (NaN where a point was not reported); None if it was never reported.

    A user's own training function reports what it has (search/sweep/user_train.py).
    """
    values = curves.get(name)
    if not values or not any(v is not None for v in values):
        return None
    return [math.nan if v is None else v for v in values]


def _mean_curve(
    trials: Sequence[FrozenTrial], name: str
) -> tuple[list[int], list[float], list[float]] | None:
    """(steps, mean, sd) of a metric over a configuration's runs, at the steps they share."""
    series = []
    for t in trials:
        c = curves_of(t)
        if c.get("step") and (values := _series(c, name)) is not None:
            series.append(dict(zip(c["step"], values, strict=False)))
    if not series:
        return None
    steps = sorted(set.intersection(*(set(s) for s in series)))
    mean, sd = [], []
    for step in steps:
        at = [s[step] for s in series if math.isfinite(s[step])]
        mean.append(sum(at) / len(at) if at else math.nan)
        var = sum((v - mean[-1]) ** 2 for v in at) / (len(at) - 1) if len(at) > 1 else 0.0
        sd.append(math.sqrt(var))
    return steps, mean, sd


def draw_curves(
    study: optuna.Study,
    stage: str,
    path: Path,
    *,
    title: str,
    k: int = 5,
    replicates: int = 1,
) -> Path:
    """Validation accuracy and train/validation loss against update step of the ``k`` best
    configurations, ranked as the tables rank them (mean over seeds, replicated ones
    first): each configuration's mean over its runs, with a band of +- one sd.

    The right panel shows the cost where no loss was reported (a user's function).
    """
    configs = [c for c in rep.study_configurations(study, replicates)[:k]]
    pruned = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
        if curves_of(t).get("step")
    ]
    reported = [curves_of(t) for c in configs for t in c.trials] + [curves_of(t) for t in pruned]

    def has(what: str) -> bool:
        return any(_series(c, f"val_{what}") or _series(c, f"train_{what}") for c in reported)

    what = "cost" if has("cost") and not has("loss") else "loss"
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(13, 6))
    for i, t in enumerate(pruned):
        curves = curves_of(t)
        label = f"pruned trials ({len(pruned)})" if i == 0 else None
        acc_ax.plot(
            curves["step"], _series(curves, "val_acc"), color="0.85", lw=0.8, label=label, zorder=1
        )
        if (val := _series(curves, f"val_{what}")) is not None:
            loss_ax.plot(curves["step"], val, color="0.85", lw=0.8, label=label, zorder=1)
    losses: list[float] = []
    accs: list[float] = []
    finals: list[float] = []
    for colour, c in zip(CURVE_COLOURS, configs, strict=False):
        label = f"#{c.number}: {c.describe()}; {params_text(c.params)}"
        if (acc := _mean_curve(c.trials, "val_acc")) is not None:
            steps, mean, sd = acc
            acc_ax.plot(steps, mean, color=colour, lw=1.6, label=label, zorder=3)
            if c.n > 1:
                acc_ax.fill_between(
                    steps,
                    [m - d for m, d in zip(mean, sd, strict=True)],
                    [m + d for m, d in zip(mean, sd, strict=True)],
                    color=colour,
                    alpha=0.15,
                    zorder=2,
                )
            accs += _finite(mean)
            finals += _finite(mean[-1:])
        for part, style in (("val", "-"), ("train", "--")):
            if (curve := _mean_curve(c.trials, f"{part}_{what}")) is not None:
                loss_ax.plot(curve[0], curve[1], color=colour, lw=1.4, ls=style, zorder=3)
                losses += _finite(curve[1])
    if losses:
        # Diverged pruned trials would stretch the axis to their exploding losses.
        loss_ax.set_ylim(0, 1.1 * max(losses))
    if finals:
        # Where the configurations end, not where they start, sets the view.
        top, low = max(accs), min(finals)
        acc_ax.set_ylim(max(0.0, low - 0.5 * (top - low) - 0.02), min(1.0, top + 0.02))
    acc_ax.set_xlabel("update step")
    acc_ax.set_ylabel("validation accuracy")
    acc_ax.set_title(
        f"validation accuracy, the {len(configs)} best configurations of {stage}\n"
        "(mean over seeds, band +- sd; ranked as the tables)",
        fontsize=10,
    )
    loss_ax.set_xlabel("update step")
    loss_ax.set_ylabel("cross-entropy loss" if what == "loss" else "cost (loss + L2)")
    loss_ax.set_title(
        f"{what}, mean over seeds (solid: validation, dashed: training)"
        if losses or not reported
        else "loss: not reported by the training function",
        fontsize=10,
    )
    for ax in (acc_ax, loss_ax):
        ax.grid(True, alpha=0.3)
    if acc_ax.get_legend_handles_labels()[0]:  # below the curves
        acc_ax.legend(loc="upper left", bbox_to_anchor=(0.0, -0.13), fontsize=7)
    loss_ax.plot([], [], color="black", lw=1.6, label="validation")
    loss_ax.plot([], [], color="black", lw=1.2, ls="--", label="training")
    loss_ax.legend(loc="upper right", fontsize=7, ncol=2)
    fig.suptitle(title)
    return _save(fig, path)


def draw_final(
    histories: Sequence[History], test_accs: Sequence[float], path: Path, *, title: str
) -> Path:
    """The final runs over all their seeds: validation (holdout) and training accuracy
    and loss as a mean with a band (min to max over seeds), and the test accuracy of
    each seed and their mean marked at the last step."""
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.8))
    for ax, what, label in zip(
        axes, ("acc", "loss"), ("accuracy", "cross-entropy loss"), strict=True
    ):
        for part, name, colour in (
            ("train", "training", "tab:blue"),
            ("val", "holdout", "tab:orange"),
        ):
            runs = [h for h in histories if _finite(h.metrics.get(f"{part}_{what}", []))]
            if not runs:
                continue
            n = min(len(h.step) for h in runs)
            steps = runs[0].step[:n]
            cols = [[h.metrics[f"{part}_{what}"][i] for h in runs] for i in range(n)]
            mean = [sum(c) / len(c) for c in cols]
            ax.plot(steps, mean, color=colour, label=f"{name} (mean of {len(runs)} seeds)")
            if len(runs) > 1:
                ax.fill_between(
                    steps, [min(c) for c in cols], [max(c) for c in cols], color=colour, alpha=0.2
                )
        if what == "acc" and test_accs:
            # at the last step of the curves; at 0 for a function that reported none
            last = max((h.step[-1] for h in histories if h.step), default=0)
            ax.scatter(
                [last] * len(test_accs), test_accs, marker="_", s=200, c="tab:red", zorder=5
            )
            test_mean = sum(test_accs) / len(test_accs)
            ax.scatter(
                [last],
                [test_mean],
                marker="*",
                s=180,
                c="tab:red",
                edgecolors="black",
                zorder=6,
                label=f"test accuracy: {test_mean:.4f} (each seed: a dash)",
            )
        ax.set_xlabel("update step")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3)
        if ax.lines or ax.collections:
            ax.set_title(f"{label}, over the final seeds", fontsize=10)
            ax.legend(fontsize=8)
        else:  # a user's function that reports no loss
            ax.set_title(f"{label}: not reported by the training function", fontsize=10)
    fig.suptitle(title)
    return _save(fig, path)


def draw_pair(
    studies: dict[str, optuna.Study], names: tuple[str, str], path: Path, *, title: str
) -> Path:
    """The two parameters that matter most, together: every finished run at its pair of
    values, coloured by validation accuracy (the zoomed range), the chosen one starred."""
    fig, ax = plt.subplots(figsize=(9, 6.5))
    ranges = [param_range(studies, n) for n in names]

    def coord(i: int, value: Any) -> float:
        r = ranges[i]
        if r is not None and r.kind == "choice":
            levels = [sp.encode(c) for c in r.choices]
            return float(levels.index(value)) if value in levels else math.nan
        return float(value)

    points = []
    for stage, study in studies.items():
        complete, pruned = _finished(study)
        for t in complete + pruned:
            if all(n in t.params for n in names):
                points.append(
                    (
                        coord(0, t.params[names[0]]),
                        coord(1, t.params[names[1]]),
                        cast(float, last_value(t)),
                        stage,
                        t.state == TrialState.COMPLETE,
                    )
                )
    values = [p[2] for p in points if p[4]] or [p[2] for p in points]
    lo, hi = zoom(values)
    for stage in studies:
        mine = [p for p in points if p[3] == stage]
        if not mine:
            continue
        art = ax.scatter(
            [p[0] for p in mine],
            [p[1] for p in mine],
            c=[max(p[2], lo) for p in mine],
            cmap="viridis",
            vmin=lo,
            vmax=hi,
            s=[45 if p[4] else 15 for p in mine],
            marker=STAGE_MARKERS[stage],
            edgecolors="black",
            linewidths=0.4,
            label=f"{stage} ({len(mine)} runs; small: pruned)",
        )
    if points:
        fig.colorbar(art, ax=ax, label="validation accuracy (below the scale: its darkest)")
    best = _best(studies)
    if best is not None and all(n in best[1].params for n in names):
        ax.scatter(
            [coord(0, best[1].params[names[0]])],
            [coord(1, best[1].params[names[1]])],
            marker="*",
            s=300,
            c="gold",
            edgecolors="black",
            label=f"chosen: {best[0]} configuration {best[1].number} ({best[1].describe()})",
            zorder=5,
        )
    for i, axis in enumerate((ax.xaxis, ax.yaxis)):
        r = ranges[i]
        if r is not None and r.kind == "choice":
            axis.set_ticks(range(len(r.choices)), [sp.describe_value(c) for c in r.choices])
            axis.set_label_text(f"{param_label(names[i])} (choice)")
        elif r is None or r.log:
            (ax.set_xscale if i == 0 else ax.set_yscale)("log")
            axis.set_label_text(f"{param_label(names[i])} (log scale)")
        else:
            axis.set_label_text(param_label(names[i]))
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="upper left", bbox_to_anchor=(0.0, -0.12), fontsize=8)
    return _save(fig, path)


def draw_training(history: History, path: str | Path, *, title: str = "") -> Path:
    """Loss, cost and accuracy curves (train and validation) side by side, as a PNG.

    A curve with no finite value (a user's function that did not report it) is left out.
    """
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, what, label in zip(
        axes,
        ("loss", "cost", "acc"),
        ("cross-entropy loss", "cost (loss + L2)", "accuracy"),
        strict=True,
    ):
        drawn = False
        for part, name in (("train", "training"), ("val", "validation")):
            values = history.metrics.get(f"{part}_{what}", [])
            if _finite(values):
                ax.plot(history.step, values, label=name)
                drawn = True
        ax.set_xlabel("update step")
        ax.set_ylabel(label)
        ax.set_title(label if drawn else f"{label}: not reported")
        ax.grid(alpha=0.3)
        if drawn:
            ax.legend()
    if title:
        fig.suptitle(title)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
