"""``python -m search.worker``: one more machine joins an existing study and runs its queue.

Start it on as many machines as you like, at any time, against a shared storage
(PostgreSQL for many machines)::

    python -m search.worker --storage postgresql+psycopg2://user@host/db \\
        --study-name quickstart-coarse --study studies/quickstart.toml

The worker never creates a study: the target (a queue of WAITING trials) is set
up once, by ``search.coarse`` / ``search.fine`` or by ``--create``. Each worker
pops WAITING trials until none is waiting or running, so any number of workers
run exactly the target between them; a killed worker's trial is re-queued with
the same parameters once its heartbeat is stale and another worker runs it.

The stage comes from the study name's suffix (``-coarse`` or ``-fine``): coarse
ranges are the study file's ``[search]``, fine ranges the ones recorded on the
study (user attr ``ranges``). The study file may be omitted when the study
records one (user attr ``study_file``, written by ``--create``).

With ``--backend dask --scheduler tcp://HOST:8786`` the ``--workers`` run on an
existing Dask cluster instead of this machine (``pip install -e ".[dask]"``): each is a
task that forks one worker process on its cluster machine, against a storage every
machine reaches (PostgreSQL, or ``c2f proxy``). Ctrl-C or a kill of this command stops
them there, and their trials are re-queued.

Every flag can also be given as an environment variable ``C2F_<FLAG>``
(``C2F_STORAGE``, ``C2F_STUDY_NAME``, ``C2F_THREADS``, ...), which is how the
containers in ``docker/compose.yaml`` are configured; a flag wins over the variable.
"""

from __future__ import annotations

from model.errors import UsageError

if __name__ == "__main__":  # before the slow imports: a signal now ends it at once
    from search.sweep.workers.signals import exit_at_once_while_starting

    exit_at_once_while_starting()

import argparse
import contextlib
import dataclasses
import os
import re
import sys
from typing import Any

import joblib
import optuna

from search import cli
from search.config.study import StudySpec, load_spec
from search.sweep import stage as stage_driver
from search.sweep import studies as st
from search.sweep import user_train
from search.sweep.prepared import Prepared
from search.sweep.workers.pool import check_workers, register_backends, threads_per
from search.sweep.workers.storage import check_storage, make_storage, safe_url, sqlite_path

ENV_PREFIX = "C2F_"
BACKENDS = ("fork", "dask")
DASK_EXTRA = 'pip install -e ".[dask]" (or pip install "coarse2fine[dask]")'


def _env(name: str, default: str | None = None) -> str | None:
    return os.environ.get(ENV_PREFIX + name.upper().replace("-", "_"), default)


def _env_number(p: argparse.ArgumentParser, name: str, kind: type, default: Any) -> Any:
    """``C2F_<NAME>`` as an int or a float, ``default`` when unset or empty; a value that
    is not one is a usage error naming the variable (exit 2)."""
    raw = _env(name)
    if raw is None or raw == "":
        return default
    try:
        return kind(raw)
    except ValueError:
        what = "an integer" if kind is int else "a number"
        # an integer written as a float (1e3): say how to write it
        whole = (
            re.fullmatch(r"[0-9]+(?:\.[0-9]*)?(?:[eE]\+?[0-9]+)?", raw) and float(raw).is_integer()
        )
        hint = f" (write {int(float(raw))})" if kind is int and whole else ""
        p.error(f"{ENV_PREFIX}{name.upper()}={raw!r}: must be {what}{hint}")


def build_parser() -> argparse.ArgumentParser:
    """The worker's flags; defaults come from ``C2F_*`` environment variables."""
    p = cli.parser(
        "python -m search.worker",
        "Join an existing study on a shared storage and run its queued trials until "
        "none is left. Every flag can also be set as C2F_<FLAG> in the environment.",
    )
    p.add_argument(
        "--storage",
        default=_env("storage"),
        help="Optuna storage URL, e.g. postgresql+psycopg2://user@host/db (C2F_STORAGE)",
    )
    p.add_argument(
        "--study-name",
        default=_env("study_name"),
        help="the study to join, NAME-coarse or NAME-fine (default with --create: NAME-coarse)",
    )
    p.add_argument(
        "--study",
        default=_env("study"),
        help="study file (default: the one recorded on the study by --create)",
    )
    p.add_argument(
        "--data-dir", default=_env("data_dir"), help="dataset directory on this machine"
    )
    p.add_argument(
        "--n-val",
        type=cli.n_val_arg,
        default=_env("n_val"),
        help="validation images or a fraction (the study's creator's --n-val, if it gave one)",
    )
    p.add_argument(
        "--cache-dir",
        default=_env("cache_dir"),
        help="where prepared data is cached (default: cache/ beside the study file)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=_env_number(p, "workers", int, 1),
        help="worker processes on this machine (default 1)",
    )
    p.add_argument(
        "--backend",
        choices=BACKENDS,
        default=_env("backend", "fork"),
        help="where the workers run: fork (processes on this machine, the default) or dask "
        "(tasks on the Dask cluster of --scheduler) (C2F_BACKEND)",
    )
    p.add_argument(
        "--scheduler",
        default=_env("scheduler"),
        help="with --backend dask: the Dask scheduler's address, e.g. tcp://HOST:8786 "
        "(C2F_SCHEDULER)",
    )
    p.add_argument(
        "--threads",
        type=int,
        default=_env_number(p, "threads", int, 0) or None,
        help="BLAS threads per worker (default 1: measured fastest on a shared machine)",
    )
    p.add_argument(
        "--poll",
        type=float,
        default=_env_number(p, "poll", float, 1.0),
        help="seconds between looks at the queue while others finish (default 1)",
    )
    p.add_argument(
        "--create",
        action="store_true",
        default=(_env("create", "") or "").lower() in ("1", "true", "yes"),
        help="create the coarse study and queue its target, then exit (no training)",
    )
    p.add_argument(
        "--trials",
        type=int,
        default=_env_number(p, "trials", int, 0) or None,
        help="with --create: target number of trials (default: the study file's [coarse])",
    )
    return p


def split_name(name: str) -> tuple[str, str]:
    """``"quickstart-coarse"`` -> ``("quickstart", "coarse")``."""
    for stage in st.STAGES:
        if name.endswith(f"-{stage}") and len(name) > len(stage) + 1:
            return name[: -len(stage) - 1], stage
    raise UsageError(
        f"study name {name!r} must end in "
        + " or ".join(f"-{s}" for s in st.STAGES)
        + " (e.g. quickstart-coarse)"
    )


def load_worker_spec(args: argparse.Namespace, path: str) -> StudySpec:
    spec = cli.with_data_dir(load_spec(path), args.data_dir)
    user_train.check(spec)  # a user's function that cannot run is refused before any trial
    if args.n_val is not None:
        n_val = cli.n_val_arg(args.n_val) if isinstance(args.n_val, str) else args.n_val
        spec = dataclasses.replace(spec, data=dataclasses.replace(spec.data, n_val=n_val))
    return spec.with_overrides(storage=args.storage)


def prepare_data(spec: StudySpec, cache_dir: str | None) -> Prepared:
    return st.prepare_for(spec, cache_dir=cache_dir)


def create(args: argparse.Namespace) -> int:
    """Create the coarse study (or load it), record data and ranges, queue its target."""
    if not args.study:
        raise UsageError("--create needs --study PATH (the study file to create the study from)")
    spec = load_worker_spec(args, args.study)
    name = args.study_name or st.study_name(spec, "coarse")
    prefix, stage = split_name(name)
    if stage != "coarse" or prefix != spec.name:
        raise UsageError(
            f"--create makes the coarse study of {spec.path}, named "
            f"{st.study_name(spec, 'coarse')!r}, got --study-name {name!r}; "
            "a fine study is set up by python -m search.fine"
        )
    if not spec.search:
        raise UsageError(f"{spec.path}: [search] is empty; give at least l2_lambda = [low, high]")
    cli.check_trials(args.trials)
    check_storage(spec.storage_url())  # a bad storage: refused before anything is written
    prepared = prepare_data(spec, args.cache_dir)
    target = args.trials or spec.coarse_trials
    study, queued = stage_driver.create_stage(spec, target=target, prepared=prepared)
    c = st.counts(study)
    print(
        f"study {name} in {safe_url(spec.storage_url())}: {st.target_text(study, target)}, "
        f"{c['COMPLETE'] + c['PRUNED']} finished, {queued} newly queued, "
        f"{c['WAITING']} waiting; start workers with: {cli.command('worker')}"
        f"{cli.flags_text(storage=args.storage)} --study-name {name}",
        flush=True,
    )
    return 0


def join(args: argparse.Namespace) -> int:
    """Load the existing study, check the data, run its queue until it is empty."""
    if not args.study_name:
        raise UsageError("--study-name is required (the study to join, e.g. quickstart-coarse)")
    prefix, stage = split_name(args.study_name)
    if args.workers < 1:
        raise UsageError(f"--workers must be >= 1, got {args.workers}")
    if args.backend == "dask":
        check_cluster_flags(args)
    else:
        check_workers(args.workers)
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1, got {args.threads}")
    db = sqlite_path(args.storage)
    if db is not None and not db.is_file():
        raise UsageError(f"no database file {db}; a worker only joins an existing study")
    check_storage(args.storage)
    storage = make_storage(args.storage)
    names = sorted(s.study_name for s in storage.get_all_studies())
    if args.study_name not in names:
        raise UsageError(
            f"no study {args.study_name!r} in {safe_url(args.storage)}; it holds "
            f"{names or 'no studies'}. A worker only joins a study; create it first with "
            f"{cli.command('worker')} --create --study PATH{cli.flags_text(storage=args.storage)}"
            f" (or {cli.command('coarse')} --study PATH{cli.flags_text(storage=args.storage)})"
        )
    recorded = optuna.load_study(study_name=args.study_name, storage=storage).user_attrs
    recorded_file = recorded.get("study_file")
    if args.n_val is None and recorded.get("n_val") is not None:
        args.n_val = recorded["n_val"]  # the --n-val the study was created with
    path = args.study or recorded_file
    if not path:
        raise UsageError(
            f"study {args.study_name!r} records no study file; pass --study PATH "
            "(the same study file it was created from)"
        )
    spec = load_worker_spec(args, path)
    if spec.name != prefix:
        raise UsageError(
            f"study file {spec.path} defines study {spec.name!r}, but {args.study_name!r} "
            f"belongs to {prefix!r}; pass the study file it was created from"
        )
    study = st.open_study(spec, stage, storage, create=False)
    st.check_settings(study, spec, stage)  # a machine with an edited study file: refused
    prepared = prepare_data(spec, args.cache_dir)
    stage_driver.space_of(spec, stage, study)  # a fine study without ranges: refused here
    target = study.user_attrs.get("target")
    threads = args.threads or threads_per(args.workers)
    with contextlib.ExitStack() as stack:
        where = ""
        if args.backend == "dask":
            client = stack.enter_context(on_cluster(args.scheduler, args.workers))
            where = f" on the Dask cluster at {client.scheduler.address}"
        c = st.counts(study)
        print(
            f"{args.workers} worker(s){where} joined {args.study_name} in "
            f"{safe_url(args.storage)} ({stage} stage, {threads} thread(s) each): "
            f"{c['COMPLETE'] + c['PRUNED']} finished, {c['RUNNING']} running, "
            f"{c['WAITING']} waiting, target {target}",
            flush=True,
        )
        stage_driver.join_stage(
            spec, stage, study, prepared, workers=args.workers, threads=threads, poll=args.poll
        )
    print(f"queue of {args.study_name} empty: {st.finished_text(study, target)}", flush=True)
    # The last process to end a stage says what comes next (the commands say it too).
    if st.unfinished(spec, stage, study) is None:
        after = "fine" if stage == "coarse" else "final"
        study_flag = cli.flags_text(study=spec.path, storage=args.storage)
        print(f"next: {cli.command(after)}{study_flag}", flush=True)
    return 0


def check_cluster_flags(args: argparse.Namespace) -> None:
    """``--backend dask`` needs a scheduler, Dask installed, and a storage that every
    machine of the cluster reaches: ValueError naming the fix otherwise."""
    if not args.scheduler:
        raise UsageError(
            "--backend dask needs --scheduler tcp://HOST:8786 (the Dask scheduler's address)"
        )
    if sqlite_path(args.storage) is not None or args.storage.startswith("journal:"):
        raise UsageError(
            f"--backend dask cannot use --storage {safe_url(args.storage)}: a file on this "
            "machine, which the cluster's machines do not share; give a server they all "
            "reach, postgresql+psycopg2://USER@HOST/DB (or a c2f proxy, grpc://HOST:PORT)"
        )
    cluster_module()


def cluster_module() -> Any:
    """:mod:`search.sweep.workers.cluster`, or ValueError naming the extra to install."""
    try:
        from search.sweep.workers import cluster
    except ImportError as exc:
        if (exc.name or "").split(".")[0] not in ("dask", "distributed"):
            raise
        raise UsageError(f"--backend dask needs Dask, an optional extra: {DASK_EXTRA}") from None
    return cluster


@contextlib.contextmanager
def on_cluster(scheduler: str, workers: int) -> Any:
    """While inside, the workers run on the Dask cluster of ``scheduler`` (joblib's active
    backend is the service's ``"c2f-dask"``); yields the client, closed after."""
    cluster = cluster_module()
    register_backends()
    with cluster.connect(scheduler) as client:
        threads = sum(client.nthreads().values())
        if workers > threads:
            print(
                f"warning: {workers} workers on a Dask cluster of {threads} thread(s): "
                f"{workers - threads} wait for a free thread, which a worker leaves only "
                "when the queue is empty",
                file=sys.stderr,
            )
        with joblib.parallel_config(backend="c2f-dask", client=client):
            yield client


@cli.guarded
def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if not args.storage:
        raise UsageError("--storage is required (or C2F_STORAGE), e.g. postgresql+psycopg2://...")
    # Storage failures (an unreachable server, ...) are one line from cli.guarded, exit 1.
    return create(args) if args.create else join(args)


if __name__ == "__main__":
    raise SystemExit(main())
