"""The dashboard note of a stage's study: the service's choice where optuna-dashboard shows it.

optuna-dashboard's "Best Trial" is the best single run; the service chooses on
configurations (the mean over seeds: :mod:`search.sweep.replicates`). Each stage
writes a note on its study (Markdown, shown on the study's page of the dashboard):
the chosen configuration with mean +- sd and n, its params, why it is not the
dashboard's best run when the two differ, the seed noise, the fine ranges and why
(fine), the test accuracy (final) and the command that comes next.

:func:`study_note` builds the text from the study alone (pure: it writes nothing);
:func:`write_note` saves it with ``optuna_dashboard.save_note``, which replaces the
whole note, so a resumed stage rewrites it rather than adding to it. The note lives in
the study's system attrs (``dashboard:note_ver``, ``dashboard:note_str:<i>``); an edit
made in the dashboard is replaced the next time a stage writes the note.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Mapping
from typing import Any

import optuna

from model.errors import UsageError
from search.config import space as sp
from search.config.study import StudySpec
from search.reporting.tables import (
    RULES,
    markdown_table,
    narrowing_text,
    param_label,
    rule_setting,
)
from search.sweep import replicates as rep
from search.sweep import studies as st
from search.sweep.narrowing import within_noise
from search.sweep.retrain import describe_accs
from search.sweep.workers.storage import storage_of


def study_note(
    study: optuna.Study,
    *,
    replicates: int,
    next_command: str | None,
    final: Mapping[str, Any] | None = None,
) -> str:
    """The note of a coarse or fine study, as Markdown.

    ``replicates`` is the stage's (``[coarse]``/``[fine] replicates``): the ranking of
    :func:`search.sweep.replicates.configurations`. ``final`` is final's result (as in
    ``result.json``) when final retrained a configuration of this study: the note then
    names that configuration and its test accuracy. ``next_command`` is the command the
    stage printed on its ``next:`` line.
    """
    configs = rep.study_configurations(study, replicates)
    stage = st.stage_of(study.study_name)
    title = f"{stage.capitalize()} search `{study.study_name}`"
    lines = [f"## {title}: the service's choice" if final is None else f"## {title}: final", ""]
    if final is not None:
        lines += final_section(final)
    if not configs:
        lines += ["No completed trials yet: nothing to choose from.", ""]
    else:
        chosen = _chosen(configs, final)
        lines += chosen_section(study, configs, chosen, final=final)
        lines += best_run_section(study, configs, chosen, replicates=replicates, final=final)
        lines += noise_section(study, configs, chosen)
    if stage == "fine":
        lines += fine_ranges_section(study)
    if next_command:
        lines += ["### Next", "", "```", next_command, "```", ""]
    return "\n".join(lines)


def _chosen(
    configs: list[rep.Configuration], final: Mapping[str, Any] | None
) -> rep.Configuration:
    """Final's configuration when final ran (it may choose by the smoothed value), else
    the stage's best (the first of the ranking)."""
    if final is not None:
        for c in configs:
            if c.number == final.get("configuration"):
                return c
    return configs[0]


def _settings(study: optuna.Study, params: Mapping[str, Any]) -> dict[str, Any]:
    """A trial's params as settings (a choice of layer widths as its list), by the ranges
    the study recorded."""
    try:
        return sp.decode(sp.from_record(study.user_attrs.get("ranges") or {}), params)
    except ValueError:  # ranges of an older grammar: the values as recorded
        return dict(params)


def chosen_section(
    study: optuna.Study,
    configs: list[rep.Configuration],
    chosen: rep.Configuration,
    *,
    final: Mapping[str, Any] | None = None,
) -> list[str]:
    """The chosen configuration: val acc mean +- sd (n), its runs, its params."""
    trials = ", ".join(str(t.number) for t in sorted(chosen.trials, key=lambda t: t.number))
    runs = sum(c.n for c in configs)
    how = (
        "retrained by final"
        if final is not None
        else "the best mean over seeds; configurations run with every seed rank first"
    )
    rows = [
        (param_label(k), sp.table_value(v)) for k, v in _settings(study, chosen.params).items()
    ]
    return [
        f"**Chosen: configuration {chosen.number}** ({how}): validation accuracy "
        f"**{chosen.describe()}** (mean +- sd over seeds; runs: trials {trials}).",
        "",
        markdown_table(("parameter", "value"), rows),
        "",
        f"Ranked from {len(configs)} configuration(s), {runs} completed run(s).",
        "",
    ]


def final_rule(choose: str | None, value: str, *, moved: str | None = None) -> str:
    """How final chose, by the ``[final] choose`` its result recorded (``value``: the
    predicted value, as " (0.8731)"; ``moved``: the note final printed when the robust
    rule passed the model's best over)."""
    if choose == "robust" and moved:
        return (
            f"final chose by the model of the landscape{value}, and of the configurations "
            "it predicts alike within the seed noise, the one furthest from the search's "
            'diverged runs ([final] choose = "robust", the default)'
        )
    if choose == "robust":
        return (
            f"final chose the best prediction of the model of the landscape{value} "
            '([final] choose = "robust", the default; no configuration alike sat further '
            "from a diverged run)"
        )
    if choose in RULES:
        shown = "" if choose == "best" else value  # the mean it chose by is in the table
        return f"final chose {RULES[choose]}{shown} ({rule_setting(choose)})"
    return f"final chose by its predicted value{value} (a result that does not say its rule)"


def best_run_section(
    study: optuna.Study,
    configs: list[rep.Configuration],
    chosen: rep.Configuration,
    *,
    replicates: int,
    final: Mapping[str, Any] | None = None,
) -> list[str]:
    """The dashboard's "Best Trial" (the best single run) against the chosen configuration,
    and why the service did not take it when they differ."""
    try:
        best = study.best_trial
    except ValueError:  # no COMPLETE trial (a diverged replicate counts, but is PRUNED)
        return []
    key = rep.params_key(best.params)
    own = next((c for c in configs if rep.params_key(c.params) == key), None)
    head = f'The dashboard\'s "Best Trial" is trial {best.number} ({best.value:.4f}, one run)'
    if own is chosen:
        return [f"{head}: a run of the chosen configuration.", ""]
    why = []
    if own is None:
        why.append("it is not counted in any configuration (a duplicate run of a seed)")
    else:
        enough = min(replicates, max(c.n for c in configs))
        said = f"its configuration {own.number} has val acc {own.describe()}"
        if own.n < enough and chosen.n >= enough:
            said += (
                f": it was run with {own.n} seed(s) and the chosen one with {chosen.n}, and "
                "one lucky seed does not beat a mean over seeds"
            )
        elif own.mean < chosen.mean:
            said += (
                f", below the chosen mean {chosen.mean:.4f}: trial {best.number}'s value was "
                "a good seed, not a better configuration"
            )
        why.append(said)
    if final is not None and chosen is not configs[0]:
        smoothed = (final.get("search_val_acc") or {}).get("smoothed")
        value = f" ({smoothed:.4f})" if isinstance(smoothed, float) else ""
        why.append(final_rule(final.get("choose"), value, moved=final.get("kept_off_the_edge")))
    return [
        f"{head}; the service chose configuration {chosen.number} instead: "
        + "; ".join(why)
        + ".",
        "",
    ]


def noise_section(
    study: optuna.Study, configs: list[rep.Configuration], chosen: rep.Configuration
) -> list[str]:
    """The seed noise of one run and the configurations within it of the chosen one."""
    sigma = rep.pooled_sd(configs)
    if sigma is None:
        return [
            "**Noise:** no configuration of this study was run with more than one seed, so "
            "there is no estimate of the seed noise (set `replicates >= 2` for the stage).",
            "",
        ]
    replicated = sum(c.n > 1 for c in configs)
    ranked = [chosen, *(c for c in configs if c is not chosen)]
    others = within_noise(ranked, sigma)[1:]
    text = (
        f"**Noise:** the sd of one run over seeds is {sigma:.4f} (pooled over {replicated} "
        "replicated configuration(s)). "
    )
    if others:
        names = ", ".join(str(c.number) for c in others[:10])
        more = f" and {len(others) - 10} more" if len(others) > 10 else ""
        text += (
            f"**{len(others)} other configuration(s) are within one standard error of the "
            f"chosen one** (configurations {names}{more}): the choice among them is within "
            "the seed noise."
        )
    else:
        text += "No other configuration is within one standard error of the chosen one."
    return [text, ""]


def fine_ranges_section(study: optuna.Study) -> list[str]:
    """The fine ranges, each beside the coarse range it came from, and why (the fine
    study's user attrs ``ranges``, ``narrowing``, ``top_k`` and ``margin``)."""
    attrs = study.user_attrs
    ranges = attrs.get("ranges") or {}
    coarse = _coarse_ranges(study)
    rows = []
    for name, r in sp.from_record(ranges).items():
        was = coarse.get(name)
        rows.append((param_label(name), r.describe(), was.describe() if was else "-"))
    lines = ["### Fine ranges", ""]
    lines += [markdown_table(("parameter", "fine range", "coarse range"), rows), ""]
    if "top_k" in attrs:
        lines += [narrowing_text(attrs), ""]
    return lines


def _coarse_ranges(study: optuna.Study) -> dict[str, sp.Range]:
    """The ranges of the coarse study the fine one narrowed (same storage), if recorded."""
    name = study.user_attrs.get("coarse_study")
    if not name:
        return {}
    try:
        coarse = optuna.load_study(study_name=name, storage=storage_of(study))
        return sp.from_record(coarse.user_attrs.get("ranges") or {})
    except (KeyError, ValueError):  # the coarse study is gone or its ranges are old
        return {}


def final_section(final: Mapping[str, Any]) -> list[str]:
    """Final's test accuracy over its seeds, and what it trained on."""
    accs = list(final.get("test_accs") or [final.get("test_acc")])
    split = final.get("split") or {}
    seeds = ", ".join(str(s) for s in final.get("seeds", []))
    return [
        f"Configuration {final.get('configuration')} retrained with `[final.training]` on "
        f"{split.get('train', '?')} images (training + {split.get('train_from_val', '?')} "
        f"validation), tested once per seed on {split.get('test', '?')} test images: "
        f"**test accuracy {describe_accs(accs)}** (mean +- sd over seeds {seeds}).",
        "",
    ]


def final_note(
    spec: StudySpec, result: Mapping[str, Any], *, next_command: str | None
) -> tuple[optuna.Study, str]:
    """The study final chose from (``result["study"]``: fine, else coarse) and its note with
    final's result in it."""
    stage = "fine" if result.get("study") == st.study_name(spec, "fine") else "coarse"
    study = st.load_existing(spec, stage)
    if study is None:
        raise UsageError(f"no study {result.get('study')!r} in {spec.storage_url()}")
    replicates = spec.fine.replicates if stage == "fine" else spec.coarse.replicates
    text = study_note(study, replicates=replicates, next_command=next_command, final=result)
    return study, text


def write_note(
    study: optuna.Study, text: str, *, warn: Callable[[str], None] | None = None
) -> bool:
    """Save ``text`` as the study's dashboard note, replacing the one before; whether it
    was saved. Never fails the command: without optuna-dashboard, or when the storage
    refuses, ``warn`` (stderr by default) gets one line and the results stay as stored."""
    say = warn or (lambda line: print(line, file=sys.stderr))
    try:
        from optuna_dashboard import save_note
    except ImportError:
        say(
            f"warning: no dashboard note on {study.study_name}: optuna-dashboard is not "
            "installed (pip install optuna-dashboard)"
        )
        return False
    try:
        save_note(study, text)
    except Exception as exc:  # noqa: BLE001 - a note is never worth failing the stage
        first = (str(exc).strip().splitlines() or [""])[0][:200]
        say(
            f"warning: no dashboard note on {study.study_name}: the storage refused it "
            f"({type(exc).__name__}: {first}); the results are stored"
        )
        return False
    return True
