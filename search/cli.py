"""What every command shares: flags, loading the spec, running a stage with progress."""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence
from pathlib import Path

import optuna

from search import study as st
from search.spec import StudyDefinitionError, StudySpec, load_spec
from search.storage import safe_url

DEFAULT_STUDY = "studies/quickstart.toml"


def base_parser(prog: str, description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("--study", default=DEFAULT_STUDY, help=f"study file (default {DEFAULT_STUDY})")
    p.add_argument("--data-dir", default=None, help="dataset directory (overrides [data] dir)")
    p.add_argument(
        "--storage", default=None, help="Optuna storage URL (default SQLite beside the study file)"
    )
    p.add_argument("--workers", type=int, default=None, help="worker processes")
    p.add_argument("--trials", type=int, default=None, help="target number of finished trials")
    return p


def load(args: argparse.Namespace) -> StudySpec:
    """The spec with the command-line overrides applied."""
    import dataclasses

    spec = load_spec(args.study)
    if args.data_dir:
        spec = dataclasses.replace(
            spec, data=dataclasses.replace(spec.data, dir=str(Path(args.data_dir).resolve()))
        )
    if args.workers is not None and args.workers < 1:
        raise ValueError(f"--workers must be >= 1, got {args.workers}")
    if args.trials is not None and args.trials < 1:
        raise ValueError(f"--trials must be >= 1, got {args.trials}")
    return spec.with_overrides(storage=args.storage, workers=args.workers)


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
    prepared = st.prepare_for(spec)
    study = st.open_study(spec, stage)
    st.record_data(study, prepared)
    study.set_user_attr("ranges", st.describe_ranges(ranges))
    if spec.path:
        # Lets `python -m search.worker --study-name ...` join without --study.
        study.set_user_attr("study_file", str(Path(spec.path).resolve()))
    for k, v in (attrs or {}).items():
        study.set_user_attr(k, v)
    # Trials left RUNNING by a killed run are failed and re-queued before counting.
    st.reap_lost_trials(study)
    queued = st.top_up(study, target, enqueue=list(enqueue))
    c = st.counts(study)
    finished = c["COMPLETE"] + c["PRUNED"]
    print(
        f"study {study.study_name} in {safe_url(spec.storage_url())}: target {target} trials, "
        f"{finished} finished, {queued} newly queued, {spec.optuna.workers} worker(s)",
        flush=True,
    )
    progress = st.Progress(study, target)
    try:
        st.run_workers(
            spec, stage, ranges, prepared, workers=spec.optuna.workers, progress=progress
        )
    finally:
        progress()
        progress.close()
    return study


def same_flags(args: argparse.Namespace) -> str:
    """The flags that name this study's file, data and storage, to print in a next command."""
    import shlex

    flags = []
    if args.study != DEFAULT_STUDY:
        flags += ["--study", args.study]
    if args.data_dir:
        flags += ["--data-dir", args.data_dir]
    if args.storage:
        flags += ["--storage", args.storage]
    return "".join(" " + shlex.quote(f) for f in flags)


def finish(spec: StudySpec, study: optuna.Study, names: list[str], k: int = 10) -> None:
    best = st.top_trials(study, k)
    if best:
        print(f"\ntop {len(best)} trials of {study.study_name}:")
        print(st.format_table(best, names))
    else:
        print(f"\nno completed trials in {study.study_name}")
    print(f"\ndashboard: {st.dashboard_hint(spec)}")


def guarded(main_body):
    """Turn expected errors into one line on stderr and an exit code."""

    def wrapper(argv: list[str] | None = None) -> int:
        try:
            return main_body(argv)
        except (StudyDefinitionError, ValueError, st.DataMismatchError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print(
                "\ninterrupted: finished trials are stored; the running trial was re-queued. "
                "Run the same command again to resume.",
                file=sys.stderr,
            )
            return 130

    return wrapper
