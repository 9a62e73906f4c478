"""What every command shares: flags, loading the spec, running a stage with progress,
and turning errors and signals into one line and an exit code."""

from __future__ import annotations

import argparse
import contextlib
import functools
import os
import signal
import sys
from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import optuna
from optuna.trial import TrialState

from search.config.study import StudyDefinitionError, StudySpec, load_spec
from search.sweep import lost, user_train
from search.sweep import replicates as rep
from search.sweep import studies as st
from search.sweep.pool import WorkersFailed
from search.sweep.progress import Progress
from search.sweep.signals import Interrupted, StopFlag, signals_recorded
from search.sweep.storage import StorageUnavailable, safe_url, storage_of

DEFAULT_STUDY = "studies/quickstart.toml"


EXIT_CODES = (
    "exit codes: 0 done; 1 the run failed (a worker failed, the storage stayed "
    "unreachable); 2 bad settings or usage; 130 / 143 / 129 interrupted by SIGINT / "
    "SIGTERM / SIGHUP"
)


def base_parser(prog: str, description: str, *, trains: bool = True) -> argparse.ArgumentParser:
    """The flags every command shares; ``trains`` adds ``--workers`` and ``--trials``."""
    p = argparse.ArgumentParser(prog=prog, description=description, epilog=EXIT_CODES)
    p.add_argument("--study", default=DEFAULT_STUDY, help=f"study file (default {DEFAULT_STUDY})")
    p.add_argument("--data-dir", default=None, help="dataset directory (overrides [data] dir)")
    p.add_argument(
        "--n-val",
        type=n_val_arg,
        default=None,
        help="validation images, or a fraction such as 0.1 (overrides [data] n_val)",
    )
    p.add_argument(
        "--storage", default=None, help="Optuna storage URL (default SQLite beside the study file)"
    )
    if trains:
        p.add_argument(
            "--workers",
            type=int,
            default=None,
            help="worker processes (default: the study file's)",
        )
        p.add_argument(
            "--trials",
            type=int,
            default=None,
            help="target number of finished trials (default: the study file's)",
        )
    return p


def n_val_arg(text: str) -> int | float:
    """--n-val: a number of images >= 1 or a fraction in (0, 1)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if 0 < value < 1:
        return value
    if value >= 1 and value == int(value):
        return int(value)
    raise argparse.ArgumentTypeError(
        f"must be a number of images >= 1 or a fraction in (0, 1), got {text!r}"
    )


def load(args: argparse.Namespace) -> StudySpec:
    """The spec with the command-line overrides applied."""
    import dataclasses

    spec = load_spec(args.study)
    if args.data_dir:
        spec = dataclasses.replace(
            spec, data=dataclasses.replace(spec.data, dir=str(Path(args.data_dir).resolve()))
        )
    if getattr(args, "n_val", None) is not None:
        spec = dataclasses.replace(spec, data=dataclasses.replace(spec.data, n_val=args.n_val))
    workers, trials = getattr(args, "workers", None), getattr(args, "trials", None)
    if workers is not None and workers < 1:
        raise ValueError(f"--workers must be >= 1, got {workers}")
    if trials is not None and trials < 1:
        raise ValueError(f"--trials must be >= 1, got {trials}")
    return spec.with_overrides(storage=args.storage, workers=workers)


def run_stage(
    spec: StudySpec,
    stage: str,
    *,
    target: int,
    ranges: dict[str, tuple[float, float]],
    enqueue: Sequence[dict[str, float]] = (),
    attrs: dict | None = None,
) -> optuna.Study:
    """Create or resume the stage's study, top it up to ``target``, run the workers."""
    user_train.check(spec)  # a user's function that cannot run is refused before any trial
    prepared = st.prepare_for(spec)
    study = st.open_study(spec, stage)
    storage = storage_of(study)
    st.record_data(study, prepared)
    st.record_seed_mode(study, spec)
    study.set_user_attr("ranges", st.describe_ranges(ranges))
    if spec.path:
        # Lets `python -m search.worker --study-name ...` join without --study.
        study.set_user_attr("study_file", str(Path(spec.path).resolve()))
    for k, v in (attrs or {}).items():
        study.set_user_attr(k, v)
    # Trials left RUNNING by a killed run are failed and re-queued before counting.
    study_id = storage.get_study_id_from_name(study.study_name)
    lost.reap(storage, study_id, grace_period=spec.optuna.grace_period)
    queued = st.top_up(study, target, enqueue=list(enqueue))
    c = st.counts(study)
    finished = c["COMPLETE"] + c["PRUNED"]
    workers = spec.optuna.workers
    print(
        f"study {study.study_name} in {safe_url(spec.storage_url())}: target {target} trials, "
        f"{finished} finished, {queued} newly queued, {workers} worker(s)",
        flush=True,
    )

    def run(total: int) -> None:
        st.run_stage_workers(
            spec,
            stage,
            ranges,
            prepared,
            workers=workers,
            progress=Progress(study, total),
            release_first=[storage],
        )

    # The progress line counts every finished trial, replicates of an earlier run too.
    live = study.get_trials(deepcopy=False, states=st.FINISHED + st.LIVE)
    run(target + sum(rep.is_replicate(t) for t in live))
    # Then more seeds of the best configurations, until the best ones all have them.
    st.replicate_rounds(spec, stage, study, run)
    return study


def same_flags(args: argparse.Namespace) -> str:
    """The flags that name this study's file, data and storage, to print in a next command."""
    import shlex

    flags = []
    if args.study != DEFAULT_STUDY:
        flags += ["--study", args.study]
    if args.data_dir:
        flags += ["--data-dir", args.data_dir]
    if getattr(args, "n_val", None) is not None:
        flags += ["--n-val", str(args.n_val)]
    if args.storage:
        flags += ["--storage", args.storage]
    return "".join(" " + shlex.quote(f) for f in flags)


class StageFailed(RuntimeError):
    """Every trial of a stage failed: nothing to go on with."""


def failure_reasons(study: optuna.Study, k: int = 3) -> list[tuple[str, int]]:
    """The ``k`` most common reasons of the study's FAILed trials, with their counts.

    Trials failed by the sweep itself (re-queued after an interrupt or a lost
    worker, or dropped for a lowered target) are not failures of the settings.
    """
    own = ("interrupted", "worker lost", "not needed")
    reasons = Counter(
        str(t.user_attrs.get("reason", "no reason recorded")).splitlines()[0][:200]
        for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        if not str(t.user_attrs.get("reason", "")).startswith(own)
    )
    return reasons.most_common(k)


def finish(spec: StudySpec, study: optuna.Study, names: list[str], k: int = 10) -> bool:
    """The stage's best configurations and the dashboard; whether a trial completed
    (something to go on with). :class:`StageFailed` if every trial failed."""
    stage_spec = spec.fine if study.study_name.endswith("-fine") else spec.coarse
    best = rep.study_configurations(study, stage_spec.replicates)[:k]
    if best:
        print(f"\ntop {len(best)} configurations of {study.study_name} (mean over seeds):")
        print(format_table(best, names))
    else:
        print(f"\nno completed trials in {study.study_name}")
    print(f"\ndashboard: {dashboard_hint(spec)}")
    c = st.counts(study)
    if not c["COMPLETE"] and not c["PRUNED"] and (reasons := failure_reasons(study)):
        lines = "; ".join(f"{n} x {reason}" for reason, n in reasons)
        raise StageFailed(f"every trial of {study.study_name} failed: {lines}")
    return bool(best)


def guarded(main_body):
    """Turn expected errors into one line on stderr and an exit code; own the signals.

    Exit codes: 0 done; 1 the run failed (workers failed, storage lost); 2 bad
    settings or usage; 128 + the signal's number when interrupted (130 SIGINT,
    143 SIGTERM, 129 SIGHUP).
    """

    @functools.wraps(main_body)
    def wrapper(argv: list[str] | None = None) -> int:
        # The commands' own messages say what matters; Optuna's INFO lines would bury them.
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        with signals_recorded(StopFlag(interruptible=True)) as stop:
            try:
                return main_body(argv)
            except (StudyDefinitionError, ValueError, st.DataMismatchError) as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 2
            except (WorkersFailed, StorageUnavailable, StageFailed) as exc:
                print(f"error: {exc}", file=sys.stderr)
                return 1
            except BrokenPipeError:  # the output went to `head` or a closed pager
                with contextlib.suppress(OSError):
                    os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
                return 0
            except (Interrupted, KeyboardInterrupt) as exc:
                signum = getattr(exc, "signum", stop.signum or signal.SIGINT)
                print(
                    f"\ninterrupted ({signal.Signals(signum).name}): finished trials are "
                    "stored, running ones re-queued. Run the same command again to resume.",
                    file=sys.stderr,
                )
                return 128 + signum

    return wrapper


def format_table(configs: list[rep.Configuration], names: list[str]) -> str:
    """One row a configuration: its first trial, mean +- sd of val acc over n seeds."""
    header = f"{'trial':>5}  {'val acc':>7}  {'+- sd':>6}  {'n':>2}  "
    header += "  ".join(f"{n:>10}" for n in names) + f"  {'epochs':>6}  {'time s':>6}"
    lines = [header]
    for c in configs:
        first = min(c.trials, key=lambda t: t.number)
        sd = f"{c.sd:6.4f}" if c.n > 1 else f"{'':>6}"
        cells = "  ".join(f"{c.params.get(n, float('nan')):10.3e}" for n in names)
        lines.append(
            f"{c.number:>5}  {c.mean:7.4f}  {sd}  {c.n:>2}  {cells}  "
            f"{first.user_attrs.get('epochs_run', 0):6.2f}  "
            f"{first.user_attrs.get('wall_time', 0):6.1f}"
        )
    return "\n".join(lines)


def dashboard_hint(spec: StudySpec) -> str:
    url = spec.storage_url()
    if url.startswith("journal:///"):
        # optuna-dashboard opens a journal file by its path, not by a URL.
        return f"optuna-dashboard {url[len('journal:///') :]}"
    return f"optuna-dashboard {safe_url(url)}"
