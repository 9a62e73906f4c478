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

if __name__ == "__main__":  # before the slow imports: a signal now ends it at once
    from search.sweep.workers.signals import exit_at_once_while_starting

    exit_at_once_while_starting()

import os
import re
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import optuna
from optuna.trial import FrozenTrial, TrialState

from search import cli
from search.config.space import table_value as value_text
from search.config.study import StudySpec, load_spec
from search.sweep import replicates as rep
from search.sweep import studies as st
from search.sweep.workers import bookkeeping, lost
from search.sweep.workers.storage import make_storage, safe_url, sqlite_path

STATES = ("COMPLETE", "PRUNED", "FAIL", "RUNNING", "WAITING")
COMMANDS = ("coarse", "fine")


@dataclass(frozen=True)
class StudyStatus:
    name: str
    counts: dict[str, int]
    target: int | None
    best_value: float | None
    best_params: dict[str, Any]
    alive: int
    stale: int
    verdict: str
    failures: tuple[tuple[str, int], ...] = ()
    best_sd: float | None = None  # over the best configuration's seeds
    best_n: int = 1
    replicates: int = 0  # replicate runs finished (on top of the target)
    # Where each failure was raised (its traceback's last frame outside the service), or "".
    failed_at: tuple[str, ...] = ()
    # The sweep's own FAILs, apart from counts["FAIL"] (search.sweep.workers.bookkeeping).
    requeued: int = 0
    retired: int = 0


def liveness(
    running: list[FrozenTrial], *, grace_period: float, now: float | None = None
) -> tuple[int, int]:
    """(alive, stale) counts among the RUNNING trials of a study."""
    now = time.time() if now is None else now
    stale = sum(
        lost.lost_reason(t, grace_period=grace_period, now=now) is not None for t in running
    )
    return len(running) - stale, stale


_FRAME = re.compile(r'^  File "(?P<file>[^"]+)", line (?P<line>\d+), in (?P<func>.+)$', re.M)
_SERVICE = str(Path(__file__).resolve().parent) + os.sep


def raised_at(traceback_text: str) -> str:
    """``"my_net.py:31 in train: raise ValueError(...)"``: the last frame of a stored
    traceback outside the search package (the user's code), or "" if there is none."""
    frames = [m for m in _FRAME.finditer(traceback_text) if not m["file"].startswith(_SERVICE)]
    if not frames:
        return ""
    m = frames[-1]
    code = traceback_text[m.end() :].lstrip("\n").split("\n", 1)[0].strip()
    where = f"{Path(m['file']).name}:{m['line']} in {m['func']}"
    return f"{where}: {code}" if code else where


def _failed_at(study: optuna.Study, reasons: list[tuple[str, int]]) -> tuple[str, ...]:
    """For each reason, where its newest failed trial raised."""
    newest: dict[str, str] = {}
    for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,)):
        # The key cli.failure_reasons counts by.
        lines = str(t.user_attrs.get("reason", "no reason recorded")).splitlines()
        newest[(lines or [""])[0][:200]] = str(t.user_attrs.get("traceback", ""))
    return tuple(raised_at(newest.get(reason, "")) for reason, _ in reasons)


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
    trials = study.get_trials(deepcopy=False)
    every = st.counts(study)
    counts = {s: every[s] for s in STATES}
    configs = rep.configurations(trials, replicates=2)
    best = configs[0] if configs else None
    n_replicates = sum(rep.is_replicate(t) for t in trials if t.state in st.FINISHED)
    running = [t for t in trials if t.state == TrialState.RUNNING]
    alive, stale = liveness(running, grace_period=grace_period)
    target = study.user_attrs.get("target")
    finished = counts["COMPLETE"] + counts["PRUNED"] - n_replicates
    failures = cli.failure_reasons(study)
    if alive:
        verdict = f"running ({alive} trial(s) with live workers)"
    elif stale:
        verdict = (
            f"stale ({stale} RUNNING trial(s) without a live worker: run {resume} "
            "again to retry them)"
        )
    elif target is not None and finished >= target and not counts["WAITING"]:
        verdict = "done"
    else:
        verdict = f"incomplete (resume with {resume})"
    return StudyStatus(
        name=name,
        counts=counts,
        target=target,
        best_value=None if best is None else best.mean,
        best_params={} if best is None else dict(best.params),
        best_sd=None if best is None or best.n < 2 else best.sd,
        best_n=0 if best is None else best.n,
        replicates=n_replicates,
        alive=alive,
        stale=stale,
        verdict=verdict,
        failures=tuple(failures),
        failed_at=_failed_at(study, failures),
        requeued=every[bookkeeping.Kind.REQUEUED.name],
        retired=every[bookkeeping.Kind.RETIRED.name],
    )


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
    lines = [
        f"{s.name}: {s.verdict}",
        f"  trials   {finished}/{target} finished{more}; {counts}",
        f"  best     {best}",
    ]
    for i, (reason, n) in enumerate(s.failures):
        lines.append(f"  failed   {n} x {reason}")
        if i < len(s.failed_at) and s.failed_at[i]:
            lines.append(f"           at {s.failed_at[i]}")
    return "\n".join(lines)


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
    if grace <= 0:
        raise ValueError(f"--grace-period must be > 0, got {grace}")
    named = args.study if spec is not None and args.study != cli.DEFAULT_STUDY else None
    start = f"run {cli.command('coarse')}{cli.flags_text(study=named, storage=args.storage)} first"
    db = sqlite_path(url)
    if db is not None and not db.exists():
        raise ValueError(f"no database at {db}: no study has run yet; {start}")
    storage = make_storage(url)
    names = sorted(optuna.get_all_study_names(storage))
    if not names:
        raise ValueError(f"no studies in {safe_url(url)}; {start}")
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
