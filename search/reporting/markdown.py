"""The Markdown reports: of a study's stages, of one experiment, and the whole (``--all``).

A study's report has the ranges of each stage, the top-10 trials, counts per
state, the epochs trained and the final result (test accuracy), with the
figures of :mod:`search.reporting.figures` beside it. The whole report has one
heading outline: ``# Report``, ``## part``, ``### experiment or stage``.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any, cast

import optuna

from search.config.experiment import list_experiments
from search.config.study import StudySpec
from search.reporting.experiment_figures import draw as draw_experiment
from search.reporting.figures import draw_curves, draw_history, draw_param
from search.reporting.gradcheck import gradcheck_section
from search.reporting.tables import (
    markdown_table,
    narrowing_text,
    param_label,
    params_text,
    ranges_table,
    top_table,
)
from search.sweep import studies as st
from search.sweep.workers.storage import relative_url, sqlite_path

STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")


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


def epochs_trained(study: optuna.Study) -> float:
    """Epochs trained by every trial of a study, pruned and failed ones included."""
    trials = study.get_trials(deepcopy=False)
    return sum(float(t.user_attrs.get("epochs_run") or 0) for t in trials)


def stage_section(
    stage: str, study: optuna.Study, figures: dict[str, str], *, replicates: int = 1
) -> str:
    """The markdown of one stage: ranges, counts, epochs, top-10 table, figures."""
    c = st.counts(study)
    ranges = study.user_attrs.get("ranges", {})
    names = list(ranges) or sorted({n for t in study.get_trials(deepcopy=False) for n in t.params})
    wall = sum(float(t.user_attrs.get("wall_time") or 0) for t in study.get_trials(deepcopy=False))
    lines = [f"## {stage.capitalize()} search (`{study.study_name}`)", ""]
    if stage == "fine" and "top_k" in study.user_attrs:
        lines += [narrowing_text(study.user_attrs), ""]
    lines += [
        "Ranges:",
        "",
        ranges_table(ranges) if ranges else "(not recorded)",
    ]
    lines += ["", "Trials per state (target " + f"{study.user_attrs.get('target', '?')}):", ""]
    lines += [markdown_table(STATES, [[c[s] for s in STATES]])]
    lines += [
        "",
        f"Epochs trained: {epochs_trained(study):.1f} over {sum(c.values())} trials "
        f"({wall:.1f} s of training).",
        "",
        "Top 10 configurations (validation accuracy: mean and sd over n seeds; a "
        "configuration's replicates are its runs with other seeds):",
        "",
        top_table(study, names, replicates=replicates)
        if c["COMPLETE"]
        else "(no completed trials)",
        "",
    ]
    for caption, name in figures.items():
        lines += [f"![{caption}]({name})", ""]
    return "\n".join(lines)


def final_section(
    spec: StudySpec, studies: dict[str, optuna.Study], final_curves: str | None = None
) -> str:
    """The markdown of the final retraining (test accuracy), or how to run it."""
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
    accs = final.get("test_accs") or [final.get("test_acc")]
    sd = final.get("test_acc_sd")
    test = _fmt_result(final.get("test_acc")) + (f" +- {sd:.4f}" if sd is not None else "")
    test += f" (n={len(accs)} seeds)"
    split = final.get("split", {})
    search = final.get("search_val_acc")
    if isinstance(search, dict):
        search_text = _fmt_result(search.get("mean"))
        if search.get("sd") is not None:
            search_text += f" +- {search['sd']:.4f}"
        search_text += f" (n={search.get('n')})"
    else:
        search_text = _fmt_result(search)
    rows = [
        ("study", f"`{final.get('study', study.study_name)}`"),
        ("configuration (first trial)", final.get("configuration", final.get("trial"))),
        ("params", params_text(final.get("params", {}))),
        ("val acc in the search", search_text),
        ("**test accuracy**", f"**{test}**"),
        ("test accuracy per seed", ", ".join(_fmt_result(a) for a in accs)),
        (
            "trained on",
            f"{split.get('train', '-')} images: training + "
            f"{split.get('train_from_val', '-')} validation",
        ),
        ("holdout (validation curve)", split.get("holdout", "-")),
        ("test images", split.get("test", "-")),
        ("wall time (s)", final.get("wall_time", "-")),
    ]
    lines += [
        "The chosen configuration (the best mean over seeds), retrained with "
        "`[final.training]` on training + validation data minus the holdout: "
        f"test accuracy **{test}**.",
        "",
        markdown_table(("", "value"), rows),
        "",
    ]
    fine_study = studies.get("fine")
    flat = (fine_study.user_attrs.get("narrowing") or {}).get("flat", []) if fine_study else []
    if flat:
        names = ", ".join(param_label(p) for p in flat)
        lines += [
            f"**The choice of {names} is within the seed noise**: the coarse search found "
            "validation accuracy flat within noise along it, so any value in the fine "
            "range is as good as this one; the test accuracy above is what to expect of "
            "the range, not a sign that this value is better.",
            "",
        ]
    if final_curves is not None:
        lines += [f"![final training curves]({final_curves})", ""]
    return "\n".join(lines)


def _fmt_result(value: Any) -> str:
    """A recorded number to four decimals; anything else as it is, "-" for nothing."""
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
            title=f"{spec.name}: validation accuracy vs {param_label(param)}",
        )
        figures.append(path)
        shared[f"validation accuracy vs {param_label(param)}"] = path.name
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
        f"Study file `{Path(spec.path).name}`, storage "
        f"`{relative_url(spec.storage_url(), spec.base_dir)}` (paths relative to the study file).",
        "",
        "## Figures",
        "",
        *(f"![{caption}]({name})\n" for caption, name in shared.items()),
    ]
    for stage, study in studies.items():
        replicates = spec.fine.replicates if stage == "fine" else spec.coarse.replicates
        lines.append(stage_section(stage, study, per_stage[stage], replicates=replicates))
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


def experiment_report(
    exp_path: Path, out: Path, *, storage: str | None = None
) -> tuple[Path, list[Path]]:
    """Write one experiment's section as ``out/<file stem>.md`` beside its figures.

    Returns the Markdown file and the PNGs. Raises LookupError if it has not run.
    """
    out.mkdir(parents=True, exist_ok=True)
    section, figures = draw_experiment(exp_path, out, storage=storage)
    md = out / f"{exp_path.stem}.md"
    md.write_text(section if section.endswith("\n") else section + "\n")
    return md, figures


def study_report(spec: StudySpec, out: Path) -> tuple[Path, list[Path]]:
    """Write the study's ``report.md`` and figures into ``out``; return the file and the PNGs.

    Raises NoStudyError if neither stage has run.
    """
    section, figures = build(spec, out)
    md = out / "report.md"
    md.write_text(f"# Report: {spec.name}\n\n{section}")
    return md, figures


def all_report(
    spec: StudySpec, out: Path, *, storage: str | None, exp_dir: Path
) -> tuple[Path, list[Path]]:
    """Write one ``report.md``: the gradient check, every experiment in ``exp_dir``, the study.

    Experiments and a study that have not run yet say so and how to run them.
    Returns the file and the PNGs.
    """
    figures: list[Path] = []
    # One outline: # Report, ## part, ### experiment or stage.
    parts = ["# Report", "", gradcheck_section(out).rstrip(), "", "## Experiments", ""]
    found = list_experiments(exp_dir) if exp_dir.is_dir() else []
    if not found:
        parts += [f"No experiment files (*.toml) in `{exp_dir}`.", ""]
    for path in found:
        try:
            section, pngs = draw_experiment(path, out, storage=storage)
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
    out.mkdir(parents=True, exist_ok=True)
    md = out / "report.md"
    md.write_text("\n".join(parts))
    return md, figures
