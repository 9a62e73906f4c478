"""``python -m search.report``: figures and a markdown report of a study's coarse and fine stages.

For the study file's coarse and fine studies (whichever exist) it draws

- validation accuracy against each searched parameter on a log axis, coarse and
  fine together; pruned trials grey, at their last reported validation accuracy;
- the optimisation history of each stage (trial number against value, best so far);
- the learning curves of each stage's top 5 trials, pruned trials' curves in light grey;

and writes ``report.md`` beside them: the ranges of each stage, the top-10
trials, counts per state, the epochs trained and the final result (test
accuracy). ``--experiment PATH`` reports one experiment study file instead and
``--all`` writes one report with the gradient checks, every experiment and the study.
"""

from __future__ import annotations

import importlib
import math
import shutil
from collections.abc import Sequence
from pathlib import Path
from typing import Any, cast

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402 - the backend must be chosen first
import optuna  # noqa: E402
from optuna.trial import FrozenTrial, TrialState  # noqa: E402

from search import cli  # noqa: E402
from search import study as st  # noqa: E402
from search.spec import StudySpec  # noqa: E402
from search.storage import sqlite_path  # noqa: E402

STAGE_COLOURS = {"coarse": "tab:blue", "fine": "tab:orange"}
STAGE_MARKERS = {"coarse": "o", "fine": "^"}
PRUNED_COLOUR = "0.6"
CURVE_COLOURS = ("tab:blue", "tab:orange", "tab:green", "tab:red", "tab:purple")
LABELS = {"l2_lambda": "lambda", "eta_max": "eta_max", "eta_min": "eta_min", "eta": "eta"}
STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")
DPI = 120


class NoStudyError(ValueError):
    """The study file's searches have not been run yet."""


def load_stages(spec: StudySpec) -> dict[str, optuna.Study]:
    """The spec's coarse and fine studies that exist in its storage (never creates one)."""
    url = spec.storage_url()
    db = sqlite_path(url)
    hint = f"run python -m search.coarse --study {spec.path} first"
    if db is not None and not db.exists():
        raise NoStudyError(f"no database at {db}; {hint}")
    storage = st.storage_for(spec)
    names = set(optuna.get_all_study_names(storage))
    studies = {
        stage: optuna.load_study(study_name=st.study_name(spec, stage), storage=storage)
        for stage in st.STAGES
        if st.study_name(spec, stage) in names
    }
    if not studies:
        raise NoStudyError(f"no study {st.study_name(spec, 'coarse')!r} in {url}; {hint}")
    return studies


def last_value(t: FrozenTrial) -> float | None:
    """A finished trial's value: its final value, or a pruned trial's last reported one."""
    if t.state == TrialState.COMPLETE:
        value = t.value
    elif t.state == TrialState.PRUNED and t.intermediate_values:
        value = t.intermediate_values[max(t.intermediate_values)]
    else:
        return None
    return value if value is not None and math.isfinite(value) else None


def _label(param: str) -> str:
    return LABELS.get(param, param)


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


def draw_param(studies: dict[str, optuna.Study], param: str, path: Path, *, title: str) -> Path:
    """Validation accuracy against ``param`` (log x axis), every stage on one axes."""
    fig, ax = plt.subplots(figsize=(8, 5))
    for stage, study in studies.items():
        complete, pruned = _finished(study)
        pruned = [t for t in pruned if param in t.params]
        complete = [t for t in complete if param in t.params]
        marker = STAGE_MARKERS[stage]
        if pruned:
            ax.scatter(
                [t.params[param] for t in pruned],
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
                [t.params[param] for t in complete],
                [cast(float, t.value) for t in complete],  # _finished dropped the None
                s=40,
                c=STAGE_COLOURS[stage],
                marker=marker,
                edgecolors="black",
                linewidths=0.5,
                label=f"{stage}: complete ({len(complete)})",
                zorder=3,
            )
        ranges = study.user_attrs.get("ranges", {})
        if stage == "fine" and param in ranges:
            lo, hi = ranges[param]
            ax.axvspan(lo, hi, color=STAGE_COLOURS[stage], alpha=0.08, label="fine range")
    best = _best(studies)
    if best is not None and param in best[1].params:
        stage, t = best
        ax.scatter(
            [t.params[param]],
            [cast(float, t.value)],  # a COMPLETE trial from top_trials
            s=220,
            marker="*",
            c="gold",
            edgecolors="black",
            linewidths=0.8,
            label=f"best: {stage} trial {t.number} ({t.value:.4f})",
            zorder=4,
        )
    ax.set_xscale("log")
    ax.set_xlabel(f"{_label(param)} (log scale)")
    ax.set_ylabel("validation accuracy")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(loc="best", fontsize=8)
    return _save(fig, path)


def _best(studies: dict[str, optuna.Study]) -> tuple[str, FrozenTrial] | None:
    best: tuple[str, FrozenTrial] | None = None
    for stage, study in studies.items():
        for t in st.top_trials(study, 1):
            # top_trials returns COMPLETE trials, which always have a value.
            if best is None or cast(float, t.value) > cast(float, best[1].value):
                best = (stage, t)
    return best


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
        ax.set_xlabel("trial number")
        ax.set_ylabel("validation accuracy")
        ax.set_title(f"{stage} ({study.study_name})")
        ax.grid(True, alpha=0.3)
        ax.legend(loc="lower right", fontsize=8)
    fig.suptitle(title)
    return _save(fig, path)


def _finite(values: Sequence[float]) -> list[float]:
    return [v for v in values if v is not None and math.isfinite(v)]


def _params_text(params: dict[str, float]) -> str:
    return ", ".join(f"{_label(k)}={v:.2e}" for k, v in params.items())


def draw_curves(study: optuna.Study, stage: str, path: Path, *, title: str, k: int = 5) -> Path:
    """Validation accuracy and train/validation loss against update step of the top ``k``."""
    top = [t for t in st.top_trials(study, k) if t.user_attrs.get("curves")]
    pruned = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.PRUNED,))
        if t.user_attrs.get("curves", {}).get("step")
    ]
    fig, (acc_ax, loss_ax) = plt.subplots(1, 2, figsize=(12, 4.8))
    for i, t in enumerate(pruned):
        c = t.user_attrs["curves"]
        label = f"pruned trials ({len(pruned)})" if i == 0 else None
        acc_ax.plot(c["step"], c["val_acc"], color="0.8", lw=0.8, label=label, zorder=1)
        loss_ax.plot(c["step"], c["val_loss"], color="0.8", lw=0.8, label=label, zorder=1)
    losses: list[float] = []
    for colour, t in zip(CURVE_COLOURS, top, strict=False):
        c = t.user_attrs["curves"]
        label = f"trial {t.number} ({t.value:.4f}; {_params_text(t.params)})"
        acc_ax.plot(c["step"], c["val_acc"], color=colour, lw=1.6, label=label, zorder=3)
        loss_ax.plot(c["step"], c["val_loss"], color=colour, lw=1.6, label=f"trial {t.number}")
        loss_ax.plot(c["step"], c["train_loss"], color=colour, lw=1.2, ls="--", zorder=3)
        losses += _finite(c["val_loss"]) + _finite(c["train_loss"])
    if losses:
        # Diverged pruned trials would stretch the axis to their exploding losses.
        loss_ax.set_ylim(0, 1.1 * max(losses))
    acc_ax.set_xlabel("update step")
    acc_ax.set_ylabel("validation accuracy")
    acc_ax.set_title(f"validation accuracy, top {len(top)} of {stage}")
    loss_ax.set_xlabel("update step")
    loss_ax.set_ylabel("cross-entropy loss")
    loss_ax.set_title("loss (solid: validation, dashed: training)")
    for ax in (acc_ax, loss_ax):
        ax.grid(True, alpha=0.3)
    acc_ax.legend(loc="lower right", fontsize=7)
    loss_ax.plot([], [], color="black", lw=1.6, label="validation")
    loss_ax.plot([], [], color="black", lw=1.2, ls="--", label="training")
    loss_ax.legend(loc="upper right", fontsize=7, ncol=2)
    fig.suptitle(title)
    return _save(fig, path)


def _table(header: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _ranges_table(ranges: dict[str, Sequence[float]]) -> str:
    rows = [
        (_label(k), f"{lo:.3e}", f"{hi:.3e}", f"{math.log10(hi / lo):.2f}")
        for k, (lo, hi) in ranges.items()
    ]
    return _table(("parameter", "low", "high", "decades"), rows)


def _top_table(study: optuna.Study, names: list[str], k: int = 10) -> str:
    rows = []
    for t in st.top_trials(study, k):
        rows.append(
            (
                t.number,
                f"{t.value:.4f}",
                *(f"{t.params[n]:.3e}" if n in t.params else "-" for n in names),
                f"{t.user_attrs.get('epochs_run', 0):.2f}",
                f"{t.user_attrs.get('wall_time', 0):.1f}",
            )
        )
    header = ("trial", "val acc", *(_label(n) for n in names), "epochs run", "wall time (s)")
    return _table(header, rows)


def epochs_trained(study: optuna.Study) -> float:
    """Epochs trained by every trial of a study, pruned and failed ones included."""
    trials = study.get_trials(deepcopy=False)
    return sum(float(t.user_attrs.get("epochs_run") or 0) for t in trials)


def stage_section(stage: str, study: optuna.Study, figures: dict[str, str]) -> str:
    """The markdown of one stage: ranges, counts, epochs, top-10 table, figures."""
    c = st.counts(study)
    ranges = study.user_attrs.get("ranges", {})
    names = list(ranges) or sorted({n for t in study.get_trials(deepcopy=False) for n in t.params})
    wall = sum(float(t.user_attrs.get("wall_time") or 0) for t in study.get_trials(deepcopy=False))
    lines = [f"## {stage.capitalize()} search (`{study.study_name}`)", ""]
    if stage == "fine" and "top_k" in study.user_attrs:
        lines += [
            f"Ranges narrowed around the top {study.user_attrs['top_k']} coarse trials, "
            f"widened by {study.user_attrs.get('margin')} decades on each side.",
            "",
        ]
    lines += ["Ranges (log-uniform):", "", _ranges_table(ranges) if ranges else "(not recorded)"]
    lines += ["", "Trials per state (target " + f"{study.user_attrs.get('target', '?')}):", ""]
    lines += [_table(STATES, [[c[s] for s in STATES]])]
    lines += [
        "",
        f"Epochs trained: {epochs_trained(study):.1f} over {sum(c.values())} trials "
        f"({wall:.1f} s of training).",
        "",
        "Top 10 completed trials:",
        "",
        _top_table(study, names) if c["COMPLETE"] else "(no completed trials)",
        "",
    ]
    for caption, name in figures.items():
        lines += [f"![{caption}]({name})", ""]
    return "\n".join(lines)


def final_section(
    spec: StudySpec, studies: dict[str, optuna.Study], final_curves: str | None = None
) -> str:
    lines = ["## Final result", ""]
    for stage in ("fine", "coarse"):
        study = studies.get(stage)
        final = study.user_attrs.get("final") if study is not None else None
        if final:
            break
    else:
        lines.append(f"Not run yet: `python -m search.final --study {spec.path}`.")
        return "\n".join(lines) + "\n"
    # The loop breaks only on a study with a recorded result, so study is not None.
    study = cast(optuna.Study, study)
    rows = [
        ("study", f"`{final.get('study', study.study_name)}`"),
        ("trial", final.get("trial")),
        ("params", _params_text(final.get("params", {}))),
        ("val acc in the search", _fmt(final.get("search_val_acc"))),
        ("holdout val acc", _fmt(final.get("holdout_val_acc"))),
        ("**test accuracy**", f"**{_fmt(final.get('test_acc'))}**"),
        ("test loss", _fmt(final.get("test_loss"))),
        ("training samples", final.get("train_samples", "-")),
        ("wall time (s)", final.get("wall_time", "-")),
    ]
    lines += [
        f"The best trial, retrained with `[final.training]` on training + validation data: "
        f"test accuracy **{_fmt(final.get('test_acc'))}**.",
        "",
        _table(("", "value"), rows),
        "",
    ]
    if final_curves is not None:
        lines += [f"![final training curves]({final_curves})", ""]
    return "\n".join(lines)


def _fmt(value: Any) -> str:
    return f"{value:.4f}" if isinstance(value, int | float) else str(value if value else "-")


def build(spec: StudySpec, out: Path) -> tuple[str, list[Path]]:
    """Draw the study's figures into ``out``; return the markdown sections and the PNG paths."""
    studies = load_stages(spec)
    out.mkdir(parents=True, exist_ok=True)
    figures: list[Path] = []
    per_stage: dict[str, dict[str, str]] = {stage: {} for stage in studies}
    params: list[str] = []
    for study in studies.values():
        for name in study.user_attrs.get("ranges", {}):
            if name not in params:
                params.append(name)
    if not params:
        params = list(spec.search)
    shared: dict[str, str] = {}
    for param in params:
        path = draw_param(
            studies,
            param,
            out / f"{spec.name}_val_acc_vs_{param}.png",
            title=f"{spec.name}: validation accuracy vs {_label(param)}",
        )
        figures.append(path)
        shared[f"validation accuracy vs {_label(param)}"] = path.name
    path = draw_history(studies, out / f"{spec.name}_history.png", title=f"{spec.name}: history")
    figures.append(path)
    shared["optimisation history"] = path.name
    for stage, study in studies.items():
        path = draw_curves(
            study,
            stage,
            out / f"{spec.name}_curves_{stage}.png",
            title=f"{spec.name} {stage}: learning curves of the top trials",
        )
        figures.append(path)
        per_stage[stage][f"learning curves, {stage}"] = path.name
    lines = [
        f"Study file `{spec.path}`, storage `{spec.storage_url()}`.",
        "",
        "## Figures",
        "",
        *(f"![{caption}]({name})\n" for caption, name in shared.items()),
    ]
    for stage, study in studies.items():
        lines.append(stage_section(stage, study, per_stage[stage]))
    total = sum(epochs_trained(s) for s in studies.values())
    lines.append(f"Epochs trained in the search, all stages: {total:.1f}.\n")
    final_curves = None
    source = spec.out_dir() / "final" / "curves.png"
    if source.exists():
        # A copy beside report.md, so the report's links stay relative.
        path = out / f"{spec.name}_final_curves.png"
        shutil.copyfile(source, path)
        figures.append(path)
        final_curves = path.name
    lines.append(final_section(spec, studies, final_curves))
    return "\n".join(lines), figures


@cli.guarded
def main(argv: list[str] | None = None) -> int:
    p = cli.base_parser("python -m search.report", "Figures and a markdown report of a study.")
    p.add_argument("--out", default=None, help="output directory (default <out dir>/report)")
    which = p.add_mutually_exclusive_group()
    which.add_argument("--experiment", default=None, help="report one experiment study file")
    which.add_argument(
        "--all", action="store_true", help="gradient checks, every experiment and the study"
    )
    p.add_argument(
        "--experiments-dir",
        default=None,
        help="with --all: where the experiment files are (default: experiments/ beside the "
        "study file)",
    )
    args = p.parse_args(argv)
    if args.experiment:
        # An experiment file stands alone: no study file needed; figures beside it.
        exp_path = Path(args.experiment)
        out = Path(args.out) if args.out else exp_path.resolve().parent / "out" / exp_path.stem
        out.mkdir(parents=True, exist_ok=True)
        section, figures = _experiment_module().draw(exp_path, out, storage=args.storage)
        md = out / f"{exp_path.stem}.md"
        md.write_text(section if section.endswith("\n") else section + "\n")
        for path in figures:
            print(f"wrote {path}")
        print(f"wrote {md}")
        return 0
    spec = cli.load(args)
    out = Path(args.out) if args.out else spec.out_dir() / "report"
    out.mkdir(parents=True, exist_ok=True)
    if args.all:
        md, figures = out / "report.md", []
        if args.experiments_dir:
            exp_dir = Path(args.experiments_dir)
            if not exp_dir.is_dir():
                raise ValueError(
                    f"--experiments-dir {exp_dir} is not a directory; pass the folder that "
                    "holds the experiment files (studies/experiments in this repository)"
                )
        else:
            exp_dir = Path(spec.path).resolve().parent / "experiments"
        md.write_text(
            _all_report(spec, out, storage=args.storage, figures=figures, exp_dir=exp_dir)
        )
    else:
        section, figures = build(spec, out)
        md = out / "report.md"
        md.write_text(f"# Report: {spec.name}\n\n{section}")
    for path in figures:
        print(f"wrote {path}")
    print(f"wrote {md}")
    return 0


def _experiment_module():
    # Imported on demand: the plain study report needs none of it.
    return importlib.import_module("search.experiment")


def _all_report(
    spec: StudySpec, out: Path, *, storage: str | None, figures: list[Path], exp_dir: Path
) -> str:
    experiment = _experiment_module()
    # One outline: # Report, ## part, ### experiment or stage.
    parts = ["# Report", "", experiment.gradcheck_section(out).rstrip(), "", "## Experiments", ""]
    found = experiment.list_experiments(exp_dir) if exp_dir.is_dir() else []
    if not found:
        parts += [f"No experiment files (*.toml) in `{exp_dir}`.", ""]
    for path in found:
        try:
            section, pngs = experiment.draw(path, out, storage=storage)
        except LookupError as exc:
            how = str(exc).strip("'\"") or f"run python -m search.experiment {path}"
            parts += [f"### Experiment `{path.stem}`", "", f"Not run yet: {how}", ""]
            continue
        figures += pngs
        parts += [section.rstrip(), ""]
    parts += [f"## Study `{spec.name}`: coarse and fine search, final result", ""]
    try:
        section, pngs = build(spec, out)
    except NoStudyError as exc:
        section, pngs = f"Not run yet: {exc}.\n", []
    figures += pngs
    demoted = [("#" + line) if line.startswith("## ") else line for line in section.splitlines()]
    parts += ["\n".join(demoted), ""]
    return "\n".join(parts)


if __name__ == "__main__":
    raise SystemExit(main())
