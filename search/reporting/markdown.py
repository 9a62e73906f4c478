"""The Markdown reports: of a study's stages, of one experiment, and the whole (``--all``).

A study's report has the ranges of each stage, the top-10 trials, counts per
state, the epochs trained and the final result (test accuracy), with the
figures of :mod:`search.reporting.figures` beside it. The whole report has one
heading outline: ``# Report``, ``## part``, ``### experiment or stage``.
"""

from __future__ import annotations

import shutil
import warnings
from collections import Counter
from pathlib import Path
from typing import Any, cast

import optuna

from model.errors import UsageError
from search.config import space as sp
from search.config.experiment import list_experiments
from search.config.study import StudySpec
from search.reporting.experiment_figures import draw as draw_experiment
from search.reporting.figures import draw_curves, draw_history, draw_pair, draw_param
from search.reporting.gradcheck import gradcheck_section, user_gradcheck_section
from search.reporting.tables import (
    RULES,
    markdown_table,
    narrowing_text,
    param_label,
    params_text,
    ranges_table,
    rule_setting,
    top_table,
)
from search.sweep import replicates as rep
from search.sweep import stopping
from search.sweep import studies as st
from search.sweep.grid import NotRun
from search.sweep.narrowing import FROM_COARSE
from search.sweep.workers import bookkeeping
from search.sweep.workers.storage import relative_url, sqlite_path

STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")


class NoStudyError(UsageError):
    """The study file's searches have not been run yet."""


def load_stages(spec: StudySpec) -> dict[str, optuna.Study]:
    """The spec's coarse and fine studies that exist in its storage (never creates one)."""
    url = spec.storage_url()
    db = sqlite_path(url)
    from search.cli import command

    hint = f"run {command('coarse')} --study {spec.path} first"
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


RANKING = (
    "Configurations are ranked by their mean over seeds, those run with every seed of "
    "the stage's replicates first: a single lucky run must not outrank a mean, so an n=1 "
    "row can stand below a lower mean of n=3."
)


def _top_title(study: optuna.Study, replicates: int, k: int = 10) -> str:
    shown = min(k, len(rep.study_configurations(study, replicates)))
    return f"The {shown} best configurations" if shown > 1 else "The best configuration"


def important_pair(studies: dict[str, optuna.Study], params: list[str]) -> tuple[str, str] | None:
    """The two searched parameters that matter most (Optuna's fANOVA importance on the
    coarse study), or the first two when it cannot say; None with fewer than two."""
    if len(params) < 2:
        return None
    study = studies.get("coarse") or next(iter(studies.values()))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ranked = list(optuna.importance.get_param_importances(study))
    except (ValueError, RuntimeError, TypeError, IndexError):
        ranked = []
    ranked = [p for p in ranked if p in params] + [p for p in params if p not in ranked]
    return ranked[0], ranked[1]


def settings_section(spec: StudySpec, studies: dict[str, optuna.Study]) -> str:
    """What was trained, on what, with what fixed: the network or the user's function,
    the fixed settings of each stage, the data sizes, the seeds."""
    from dataclasses import asdict

    lines = ["## Settings", ""]
    if spec.model.train:
        own = ", ".join(f"{k} = {sp.describe_value(v)}" for k, v in spec.model.params.items())
        lines.append(
            f"Network: your own, `{spec.model.train}` (layout `{spec.model.layout}`)"
            + (f"; its own keys' defaults: {own}." if own else ".")
        )
    else:
        n = spec.network
        lines.append(
            f"Network: the built-in one, hidden layers {list(n.hidden)}, batch norm "
            f"{'on' if n.batch_norm else 'off'}, init `{n.init}`"
            + (f" (sigma {n.sigma:g})" if n.sigma is not None else "")
            + "."
        )
    sizes = next((s.user_attrs.get("data_sizes") for s in studies.values()), None) or {}
    data = f"Data: `{spec.data.name}`" + (
        f", split `{spec.data.split}`" if spec.data.name == "cifar10" else ""
    )
    if sizes:
        data += (
            f": {sizes.get('train', '?')} training, {sizes.get('val', '?')} validation and "
            f"{sizes.get('test', '?')} test images"
        )
    lines += [data + ".", ""]
    config = spec.train_config("coarse")
    # The rates of another schedule are not settings of this one (a cyclical run has no eta).
    other = {"cyclical": ("eta", "n_epochs", "decay")}.get(
        config.schedule, ("eta_min", "eta_max", "n_s", "n_s_epochs", "n_cycles", "evals_per_cycle")
    )
    rows = [
        ("all", key, sp.describe_value(value))
        for key, value in asdict(config).items()
        if key not in spec.search and key != "seed" and value is not None and key not in other
    ]
    for stage, overrides in (("fine", spec.fine.training), ("final", spec.final.training)):
        rows += [(stage, key, sp.describe_value(value)) for key, value in overrides.items()]
    lines += [
        "Fixed training settings (all: every setting that is not searched; fine and final: "
        "what they change for their stage):",
        "",
        markdown_table(("stage", "setting", "value"), rows),
        "",
        f"Seeds: study seed {spec.optuna.seed}, mode `{spec.optuna.seed_mode}` (shared: every "
        f"search trial of a stage has the same data order and initial weights); "
        + "; ".join(_extra_seeds(spec))
        + f"; final over {spec.final.seeds} seeds (seed, seed + 1, ...). "
        + (
            "No pruner: every trial trained to its end"
            if spec.optuna.pruner == "none"
            else f"Pruner `{spec.optuna.pruner}` after {spec.optuna.warmup_cycles:g} cycles "
            "(epochs for the step and constant schedules)"
        )
        + f", sampler `{spec.optuna.sampler}`. "
        + (
            "Trials per stage counted in training steps: a pruned or diverged trial counts "
            "the share it trained, and the steps it left bought more trials."
            if any(st.in_steps(s) for s in studies.values())  # as the stages ran
            else "Trials per stage counted as trials, however early they stopped."
        ),
        "",
    ]
    return "\n".join(lines)


def _extra_seeds(spec: StudySpec) -> list[str]:
    """What each search stage spends on seeds past one run a configuration: replicates
    (seed + 1000 i) and the race on shared seeds."""
    said = []
    for stage in ("coarse", "fine"):
        table = spec.search_stage(stage)
        if table.replicates > 1:
            best = (
                "best configuration"
                if table.replicate_top == 1
                else f"{table.replicate_top} best configurations"
            )
            said.append(f"{stage}: {table.replicates} seeds for its {best} (seed + 1000 i)")
        if table.race_runs > 0:
            said.append(
                f"{stage}: its {table.race_top} best by the model race on shared extra seeds, "
                f"{table.race_runs} runs at most"
            )
    return said or ["one run a configuration in both search stages (no replicates, no race)"]


def state_columns(c: Counter) -> tuple[list[str], list[list[int]]]:
    """The header and row of the trials-per-state table (counts of :func:`st.counts`):
    FAIL holds real failures; the sweep's re-queued and retired trials have columns of
    their own when there are any."""
    own = [k for k in bookkeeping.Kind if c[k.name]]
    header = [*STATES, *(k.label for k in own)]
    return header, [[c[s] for s in STATES] + [c[k.name] for k in own]]


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
    lines += [markdown_table(*state_columns(c))]
    stop = stopping.stopped(study)
    if stop:
        lines += ["", f"{stopping.line(stop).capitalize()} (counted as retired)."]
    every = study.get_trials(deepcopy=False)
    carried = sum(FROM_COARSE in t.user_attrs for t in every)
    also = f", and {carried} runs carried over from the coarse stage (trained there)"
    # Trials that ran to an end here: not the waiting, running, re-queued or retired ones.
    ran = sum(
        FROM_COARSE not in t.user_attrs
        and bookkeeping.state_name(t) in ("COMPLETE", "PRUNED", "FAIL")
        for t in every
    )
    lines += [
        "",
        f"Epochs trained: {epochs_trained(study):.1f} over {ran} trials that ran "
        f"({wall:.1f} s of training){also if carried else ''}.",
        "",
        f"{_top_title(study, replicates)} (validation accuracy: mean and sd over n seeds; "
        "a configuration's replicates are its runs with other seeds). " + RANKING,
        "",
        top_table(study, names, replicates=replicates)
        if c["COMPLETE"]
        else "(no completed trials)",
        "",
    ]
    for caption, name in figures.items():
        lines += [f"![{caption}]({name})", ""]
    return "\n".join(lines)


def chosen_by(choose: str | None) -> str:
    """How the report names final's choice, by the [final] choose its result recorded."""
    if choose not in RULES:
        return "as final chose"
    return f"{RULES[choose]}: {rule_setting(choose)}"


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
        from search.cli import command

        final_run = f"`{command('final')} --study {spec.path}`"
        if "fine" in studies:
            lines.append(f"Not run yet: {final_run}.")
        else:
            fine_run = f"`{command('fine')} --study {spec.path}`"
            lines.append(f"Not run yet: the fine search first ({fine_run}), then {final_run}.")
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
        f"The chosen configuration ({chosen_by(final.get('choose'))}), "
        "retrained with "
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
    pair = important_pair(studies, params)
    if pair is not None:
        path = draw_pair(
            studies,
            pair,
            out / f"{spec.name}_{pair[0]}_x_{pair[1]}.png",
            title=f"{spec.name}: {param_label(pair[0])} x {param_label(pair[1])}, the two "
            "parameters that matter most",
        )
        figures.append(path)
        shared[f"{param_label(pair[0])} x {param_label(pair[1])}"] = path.name
    path = draw_history(studies, out / f"{spec.name}_history.png", title=f"{spec.name}: history")
    figures.append(path)
    shared["optimisation history"] = path.name
    for stage, study in studies.items():
        replicates = spec.fine.replicates if stage == "fine" else spec.coarse.replicates
        path = draw_curves(
            study,
            stage,
            out / f"{spec.name}_curves_{stage}.png",
            title=f"{spec.name} {stage}: learning curves of the best configurations",
            replicates=replicates,
        )
        figures.append(path)
        per_stage[stage][f"learning curves, {stage}"] = path.name
    lines = [
        f"Study file `{Path(spec.path).name}`, storage "
        f"`{relative_url(spec.storage_url(), spec.base_dir)}` (paths relative to the study file).",
        "",
        settings_section(spec, studies),
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
    out.mkdir(parents=True, exist_ok=True)
    # One outline: # Report, ## part, ### experiment or stage.
    checked = gradcheck_section(out).rstrip()
    if spec.model.train:
        import inspect

        from search.sweep.user_train import load_train

        module = inspect.getmodule(load_train(spec))
        own = user_gradcheck_section(spec.model.train, getattr(module, "gradcheck", None))
        if own.startswith("## Gradient check (of the built-in"):
            checked = own + checked.replace("## Gradient check\n", "", 1).lstrip()
        else:
            checked = own.rstrip()
    parts = ["# Report", "", checked, "", "## Experiments", ""]
    found = list_experiments(exp_dir) if exp_dir.is_dir() else []
    if not found:
        parts += [f"No experiment files (*.toml) in `{exp_dir}`.", ""]
    for path in found:
        try:
            section, pngs = draw_experiment(path, out, storage=storage)
        except NotRun as exc:
            parts += [f"### Experiment `{path.stem}`", "", f"Not run yet: `{exc.run_line()}`", ""]
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
    md = out / "report.md"
    md.write_text("\n".join(parts))
    return md, figures
