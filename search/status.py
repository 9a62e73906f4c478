"""``python -m search.status``: every study in a storage, its trials per state and whether it runs.

A study is

- ``running`` if a RUNNING trial's worker is alive, by the rule every worker's
  reaper uses (:func:`search.sweep.workers.lost.lost_reason`: its process on this
  machine exists and its last heartbeat is newer than the grace period);
- ``stale`` if RUNNING trials have no live worker: their workers were killed.
  Running the stage's command again fails them and retries their parameters;
- ``done`` when its finished trials (complete + pruned) reach the target;
- ``incomplete`` otherwise, with the command that resumes it: a complete command
  to copy, with the study file, the storage and the data directory the study ran with.

Counts per state are :func:`search.sweep.studies.counts`: FAIL holds real failures,
each shown with its reason; trials the sweep re-queued (after an interrupt or a lost
worker) or retired (a duplicate replicate, a lowered target) follow as "re-queued"
and "retired".

Exit codes: 0 listed; 1 the storage cannot be used; 2 bad arguments, or no study
to show (no database yet, or none in it).
"""

from __future__ import annotations

from model.errors import UsageError

if __name__ == "__main__":  # before the slow imports: a signal now ends it at once
    from search.sweep.workers.signals import exit_at_once_while_starting

    exit_at_once_while_starting()

import math
import os
from typing import cast

import optuna

from search import cli
from search.config.space import table_value as value_text
from search.config.study import StudySpec, load_spec
from search.sweep import studies as st
from search.sweep.standing import StudyStatus, standing
from search.sweep.workers import bookkeeping
from search.sweep.workers.storage import make_storage, safe_url, sqlite_path

COMMANDS = ("coarse", "fine")


def resume_command(
    name: str,
    *,
    study_path: str | None,
    storage_flag: str | None,
    data_dir: str | None = None,
    n_val: str | None = None,
) -> str:
    """The command that resumes study ``name``, with every flag it needs."""
    stage = name.rsplit("-", 1)[-1] if "-" in name else ""
    if stage not in COMMANDS:
        return "the command that created it"
    spec_name = name.rsplit("-", 1)[0]
    flags = cli.flags_text(
        study=study_path or f"studies/{spec_name}.toml",
        data_dir=data_dir,
        n_val=n_val,
        storage=storage_flag,
    )
    return f"{cli.command(stage)}{flags}"


def n_val_flag(study: optuna.Study, spec: StudySpec | None) -> str | None:
    """The --n-val the study ran with (user attr ``n_val``), when not the study file's."""
    recorded = study.user_attrs.get("n_val")
    if recorded is None or (spec is not None and spec.data.n_val == recorded):
        return None
    return str(recorded)


def data_dir_flag(
    study: optuna.Study, spec: StudySpec | None, study_path: str | None
) -> str | None:
    """The --data-dir the study ran with (user attr ``data_dir``, relative to the study
    file), as a path from here; None when it is the study file's own [data] dir."""
    recorded = study.user_attrs.get("data_dir")
    if not recorded or not study_path:
        return None
    where = os.path.normpath(os.path.join(os.path.dirname(os.path.abspath(study_path)), recorded))
    if spec is not None and spec.data_dir() == where:
        return None
    here = os.path.relpath(where)
    return where if here.startswith("..") else here


def study_status(
    storage: optuna.storages.BaseStorage,
    name: str,
    *,
    grace_period: float,
    study_path: str | None = None,
    storage_flag: str | None = None,
    spec: StudySpec | None = None,
) -> StudyStatus:
    study = optuna.load_study(study_name=name, storage=storage)
    study_path = study_path or study.user_attrs.get("study_file")
    resume = resume_command(
        name,
        study_path=study_path,
        storage_flag=storage_flag,
        data_dir=data_dir_flag(study, spec, study_path),
        n_val=n_val_flag(study, spec),
    )
    if name.rsplit("-", 1)[-1] in COMMANDS:  # a search stage's, not an experiment's
        # the file it ran from, when it is here to read: is its target lower?
        known = spec or (_spec_or_none(study_path) if study_path else None)
        resume += st.trials_flag(study, known, st.stage_of(name))
    # Ranked as the stage's own table ranks them: by its replicates, when the file is known.
    replicates = 2 if spec is None else spec.search_stage(st.stage_of(name)).replicates
    return standing(study, grace_period=grace_period, resume=resume, replicates=replicates)


def format_status(s: StudyStatus) -> str:
    counts = ", ".join(f"{k} {v}" for k, v in s.counts.items())
    kinds = bookkeeping.Kind
    if own := bookkeeping.shown({kinds.REQUEUED.name: s.requeued, kinds.RETIRED.name: s.retired}):
        counts += "; " + ", ".join(own)
    finished = s.counts["COMPLETE"] + s.counts["PRUNED"] - s.replicates
    target = "?" if s.target is None else str(s.target)
    best = "-"
    if s.best_value is not None:
        params = ", ".join(f"{k}={value_text(v)}" for k, v in s.best_params.items())
        sd = f" +- {s.best_sd:.4f}" if s.best_sd is not None else ""
        best = f"{s.best_value:.4f}{sd} (n={s.best_n}; {params})"
    more = f" (+ {s.replicates} replicate runs)" if s.replicates else ""
    done = f"{finished}/{target} finished"
    if s.steps is not None:  # a budget in steps: pruned and diverged trials count their share
        done = f"{finished} finished, {s.steps:.1f}/{target} trials' steps"
    lines = [
        f"{s.name}: {s.verdict}",
        f"  trials   {done}{more}; {counts}",
        f"  best     {best}",
    ]
    if s.final and isinstance(s.final.get("test_acc"), float):
        f = s.final
        sd = f" +- {f['test_acc_sd']:.4f}" if f.get("test_acc_sd") is not None else ""
        val = f.get("search_val_acc") or {}
        chose = f"configuration {f.get('configuration')}"
        if isinstance(val.get("mean"), float):
            vsd = f" +- {val['sd']:.4f}" if val.get("sd") is not None else ""
            chose += f" (val acc {val['mean']:.4f}{vsd}, n={val.get('n')})"
        params = ", ".join(f"{k}={value_text(v)}" for k, v in (f.get("params") or {}).items())
        rule = RULE.get(str(f.get("choose")), "its rule")
        why = (
            "the best above"
            if f.get("params") == s.best_params
            else f"chosen by {rule}, not the best above"
        )
        lines.append(
            f"  final    {chose}; {params}: test acc {f['test_acc']:.4f}{sd} "
            f"(n={f.get('n_seeds')}); {why}"
        )
    for i, (reason, n) in enumerate(s.failures):
        lines.append(f"  failed   {n} x {reason}")
        if i < len(s.failed_at) and s.failed_at[i]:
            lines.append(f"           at {s.failed_at[i]}")
    return "\n".join(lines)


# How [final] choose chose, in a few words (search.reporting.note says it at length).
RULE = {
    "robust": "the model of the landscape",
    "model": "the model of the landscape",
    "best": "the best mean over seeds",
    "smoothed": "the best mean smoothed over neighbours",
}


def _spec_or_none(path: str) -> StudySpec | None:
    try:
        return load_spec(path)
    except ValueError:
        return None


@cli.guarded
def main(argv: list[str] | None = None) -> int:
    p = cli.parser(
        "python -m search.status", "Studies in a storage: trials per state, best, running or not."
    )
    p.add_argument("--study", default=cli.DEFAULT_STUDY, help="study file whose storage to read")
    p.add_argument("--storage", default=None, help="Optuna storage URL (overrides --study)")
    p.add_argument(
        "--grace-period",
        type=float,
        default=None,
        help="seconds without a heartbeat before a trial is stale (default: the study file's)",
    )
    args = p.parse_args(argv)
    spec = _spec_or_none(args.study)
    if not args.storage and spec is None:
        spec = load_spec(args.study)  # raises the StudyDefinitionError with its message
    url = args.storage or cast(StudySpec, spec).storage_url()
    grace = args.grace_period
    if grace is None:
        grace = spec.optuna.grace_period if spec is not None else 30
    if not 0 < grace < math.inf:  # NaN too: no worker would ever be taken for lost
        raise UsageError(f"--grace-period must be a number of seconds > 0, got {grace}")
    named = args.study if spec is not None and args.study != cli.DEFAULT_STUDY else None
    start = f"run {cli.command('coarse')}{cli.flags_text(study=named, storage=args.storage)} first"
    db = sqlite_path(url)
    if db is not None and not db.exists():
        raise UsageError(f"no database at {db}: no study has run yet; {start}")
    storage = make_storage(url)
    names = sorted(optuna.get_all_study_names(storage))
    if not names:
        raise UsageError(f"no studies in {safe_url(url)}; {start}")
    print(f"storage {safe_url(url)}")
    for name in names:
        mine = spec is not None and name.startswith(spec.name + "-")
        status = study_status(
            storage,
            name,
            grace_period=grace,
            study_path=args.study if mine else None,
            storage_flag=args.storage,
            spec=spec if mine else None,
        )
        print(format_status(status))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
