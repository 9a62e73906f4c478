"""What every command shares: flags, loading the spec, running a stage with progress,
and turning errors and signals into one line and an exit code."""

from __future__ import annotations

import argparse
import atexit
import contextlib
import functools
import gc
import os
import signal
import sys
import traceback
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NoReturn

import optuna

from model.data import n_val_arg
from model.errors import UsageError
from search.config.space import Range
from search.config.study import MAX_TRIALS, StudySpec, load_spec
from search.sweep import replicates as rep
from search.sweep import studies as st
from search.sweep.prepared import CacheWriteError
from search.sweep.standing import failure_reasons
from search.sweep.user_train import FinalDiverged, UserCodeFailed
from search.sweep.workers.pool import WorkersFailed, check_workers
from search.sweep.workers.signals import (
    STOP_SIGNALS,
    Interrupted,
    StopFlag,
    exit_at_once_while_starting,
    signals_recorded,
)
from search.sweep.workers.storage import (
    StorageError,
    StorageUnavailable,
    release_all,
    safe_url,
)

DEFAULT_STUDY = "studies/quickstart.toml"

EXIT_CODES = (
    "exit codes: 0 done; 1 the run failed (every trial failed, a worker failed, the storage "
    "cannot be used or stayed unreachable); 2 bad settings or usage; 130 / 143 / 129 "
    "interrupted by SIGINT / SIGTERM / SIGHUP. --debug (or C2F_DEBUG=1) shows the "
    "traceback of an error."
)

# How the user started the command: "python -m" (search.coarse, ...) or "c2f" (set by
# search.c2f). Hints and --help name the commands the same way.
LAUNCHER = "python -m"
_MODULES = {"train": "model.train", "gradcheck": "model.gradcheck"}


def command(name: str) -> str:
    """The command ``name`` (coarse, fine, ...) as the user would type it."""
    if LAUNCHER == "c2f":
        return f"c2f {name}"
    return f"python -m {_MODULES.get(name, 'search.' + name)}"


def _prog(prog: str) -> str:
    """A parser's ``python -m search.NAME`` as :func:`command` names it."""
    for prefix in ("python -m search.", "python -m model."):
        if prog.startswith(prefix):
            return command(prog[len(prefix) :])
    return prog


class HelpFormatter(argparse.HelpFormatter):
    """--help with each option's default, unless it is None or False or the help says it."""

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        default = action.default
        if (
            not action.option_strings
            or "default" in text
            or default is None
            or default is False
            or default == argparse.SUPPRESS
        ):
            return text
        return f"{text} (default: {default})"


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An argparse parser with defaults and exit codes in --help, and --debug."""
    p = argparse.ArgumentParser(
        prog=_prog(prog), description=description, epilog=EXIT_CODES, formatter_class=HelpFormatter
    )
    p.add_argument("--debug", action="store_true", help="show the traceback of an error")
    # A usage error is one line and exit 2, like every other error.
    p.error = functools.partial(usage_error, p)  # type: ignore[method-assign]
    return p


def base_parser(prog: str, description: str, *, trains: bool = True) -> argparse.ArgumentParser:
    """The flags every command shares; ``trains`` adds ``--workers`` and ``--trials``."""
    p = parser(prog, description)
    p.add_argument("--study", default=DEFAULT_STUDY, help="study file")
    p.add_argument(
        "--data-dir",
        default=None,
        help="dataset directory (overrides [data] dir; cifar10 and fashion_mnist only)",
    )
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
            type=whole_number_arg,
            default=None,
            help="worker processes (default: the study file's [optuna] workers)",
        )
        p.add_argument(
            "--trials",
            type=whole_number_arg,
            default=None,
            help=f"target number of finished trials, at most {MAX_TRIALS:,} (default: the "
            "study file's)",
        )
    return p


def usage_error(p: argparse.ArgumentParser, message: str) -> NoReturn:
    """A usage error in one line, as every other error is (argparse prints the usage
    first, four lines that bury the message): ``error: ...`` and exit 2."""
    print(f"error: {message} ({p.prog} --help lists the flags)", file=sys.stderr)
    raise SystemExit(2)


def whole_number_arg(text: str) -> int:
    """A count (--trials, --workers) written in digits; ``1e3`` is refused with the digits
    to write instead."""
    try:
        return int(text)
    except ValueError:
        pass
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value.is_integer():
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a whole number in digits; write {int(value)}"
        ) from None
    raise argparse.ArgumentTypeError(f"{text!r} is not a whole number")


def check_trials(trials: int | None, flag: str = "--trials") -> None:
    """A target from the command line: 1 to MAX_TRIALS (the queue is filled before training)."""
    if trials is not None and not 1 <= trials <= MAX_TRIALS:
        raise UsageError(
            f"{flag} must be between 1 and {MAX_TRIALS:,} (the trials of a stage are queued "
            f"before training starts), got {trials:,}"
        )


def with_data_dir(spec: StudySpec, data_dir: str | None) -> StudySpec:
    """The spec with ``--data-dir`` in place of its [data] dir; refused for digits, which
    reads no files (a flag that did nothing would be copied into every next command)."""
    import dataclasses

    if not data_dir:
        return spec
    if spec.data.name == "digits":
        raise UsageError(
            f"--data-dir {data_dir}: {spec.path} uses the digits dataset, which ships with "
            "scikit-learn and reads no files; drop --data-dir"
        )
    new_data = dataclasses.replace(spec.data, dir=str(Path(data_dir).expanduser().resolve()))
    return dataclasses.replace(spec, data=new_data)


def load(args: argparse.Namespace) -> StudySpec:
    """The spec with the command-line overrides applied."""
    import dataclasses

    spec = with_data_dir(load_spec(args.study), args.data_dir)
    if getattr(args, "n_val", None) is not None:
        spec = dataclasses.replace(spec, data=dataclasses.replace(spec.data, n_val=args.n_val))
    workers, trials = getattr(args, "workers", None), getattr(args, "trials", None)
    if workers is not None and workers < 1:
        raise UsageError(f"--workers must be >= 1, got {workers}")
    check_trials(trials)
    spec = spec.with_overrides(storage=args.storage, workers=workers)
    if hasattr(args, "workers"):
        where = "--workers" if workers is not None else f"{spec.path}: [optuna.workers]"
        check_workers(spec.optuna.workers, where=where)
    return spec


def same_flags(args: argparse.Namespace) -> str:
    """The flags that name this study's file, data and storage, to print in a next command."""
    n_val = getattr(args, "n_val", None)
    return flags_text(
        study=args.study if args.study != DEFAULT_STUDY else None,
        data_dir=getattr(args, "data_dir", None),
        n_val=None if n_val is None else str(n_val),
        storage=args.storage,
    )


def flags_text(
    *,
    study: str | None = None,
    data_dir: str | None = None,
    n_val: str | None = None,
    storage: str | None = None,
) -> str:
    """`` --study S --data-dir D --n-val N --storage U`` for the ones given, quoted for a
    shell."""
    import shlex

    flags = []
    given = (("--study", study), ("--data-dir", data_dir), ("--n-val", n_val))
    for flag, value in (*given, ("--storage", storage)):
        if value:
            flags += [flag, value]
    return "".join(" " + shlex.quote(f) for f in flags)


def next_command(name: str, args: argparse.Namespace, extra: str = "") -> str:
    """The next command to copy, with the same flags (the ``next:`` line, the note)."""
    return f"{command(name)}{same_flags(args)}{extra}"


def next_step(name: str, args: argparse.Namespace, extra: str = "") -> None:
    """The line that ends a stage: the next command to copy, with the same flags."""
    print(f"next: {next_command(name, args, extra)}")


class StageFailed(RuntimeError):
    """Every trial of a stage failed: nothing to go on with."""


def finish(spec: StudySpec, study: optuna.Study, space: dict[str, Range], k: int = 10) -> bool:
    """The stage's best configurations and the dashboard; whether a trial completed
    (something to go on with). :class:`StageFailed` if every trial failed."""
    stage_spec = spec.search_stage(st.stage_of(study.study_name))
    best = rep.study_configurations(study, stage_spec.replicates)[:k]
    if best:
        print(f"\ntop {len(best)} configurations of {study.study_name} (mean over seeds):")
        print(format_table(best, space))
    else:
        print(f"\nno completed trials in {study.study_name}")
    print(f"\ndashboard: {dashboard_hint(spec)}")
    c = st.counts(study)
    if not c["COMPLETE"] and not c["PRUNED"] and (reasons := failure_reasons(study)):
        lines = "; ".join(f"{n} x {reason}" for reason, n in reasons)
        raise StageFailed(f"every trial of {study.study_name} failed: {lines}")
    return bool(best)


def end_stage(
    spec: StudySpec,
    study: optuna.Study,
    space: dict[str, Range],
    args: argparse.Namespace,
    *,
    next_name: str,
    replicates: int,
) -> None:
    """How a search stage ends: its best configurations, the dashboard's note, ``next:``
    (the note and the next command only when something completed, and only when no
    other command or machine still has work of the stage: the last one to end says it)."""
    if not finish(spec, study, space):
        return
    stage = st.stage_of(study.study_name)
    left = st.unfinished(spec, stage, study)
    if left:
        print(
            f"\n{study.study_name}: {left}, by another command or machine: the table above "
            f"is as it stands; the last one to end goes on (`{command('status')}` says "
            "when the stage is done)"
        )
        return
    failed_lines(spec, study, stage, args)
    from search.reporting.note import study_note, write_note

    next_command_text = next_command(next_name, args)
    write_note(study, study_note(study, replicates=replicates, next_command=next_command_text))
    next_step(next_name, args)


def failed_lines(
    spec: StudySpec, study: optuna.Study, stage: str, args: argparse.Namespace
) -> None:
    """When trials of the stage failed (their settings or code, not the sweep's own
    bookkeeping): how many, why and where, as ``c2f status`` says it, and how to resume."""
    from search.sweep.standing import standing

    again = f"{command(stage)}{same_flags(args)}{st.trials_flag(study, spec, stage)}"
    s = standing(study, grace_period=spec.optuna.grace_period, resume=again)
    if not s.failures or not s.verdict.startswith("incomplete"):
        return  # none failed, or trials run since took their place
    finished = s.counts["COMPLETE"] + s.counts["PRUNED"] - s.replicates
    done = (
        f"{finished} of the target {s.target} finished"
        if s.steps is None
        else f"{s.steps:.1f} of the target {s.target} trials' steps spent"
    )
    print(f"\n{study.study_name}: {s.counts['FAIL']} trial(s) failed; {done}")
    for i, (reason, n) in enumerate(s.failures):
        print(f"  failed   {n} x {reason}")
        if i < len(s.failed_at) and s.failed_at[i]:
            print(f"           at {s.failed_at[i]}")
    print(
        f"fix the cause and run {again} again: it runs the stage on to its target; or go "
        "on with the trials that finished:"
    )


def debugging(argv: Sequence[str] | None) -> bool:
    """Whether errors show their traceback: ``--debug`` or ``C2F_DEBUG=1``."""
    args = sys.argv[1:] if argv is None else argv
    return "--debug" in args or os.environ.get("C2F_DEBUG", "") not in ("", "0")


def _error(exc: BaseException, debug: bool, text: str | None = None) -> None:
    if debug:
        traceback.print_exception(exc)
    print(f"error: {exc if text is None else text}", file=sys.stderr)


def guarded(main_body):
    """Turn errors into one line on stderr and an exit code; own the signals.

    Exit codes: 0 done; 1 the run failed (every trial failed, workers failed, the
    storage cannot be used or was lost); 2 bad settings or usage; 128 + the signal's
    number when interrupted (130 SIGINT, 143 SIGTERM, 129 SIGHUP). An error no one
    expected is one line too; ``--debug`` or ``C2F_DEBUG=1`` adds its traceback.
    """

    @functools.wraps(main_body)
    def wrapper(argv: list[str] | None = None) -> int:
        debug = debugging(argv)
        # The commands' own messages say what matters; Optuna's INFO lines would bury them.
        # Set here, for the command's run only: importing search changes no logging.
        verbosity = optuna.logging.get_verbosity()
        optuna.logging.set_verbosity(optuna.logging.WARNING)
        try:
            return _run(main_body, argv, debug)
        finally:
            optuna.logging.set_verbosity(verbosity)

    return wrapper


def _run(main_body, argv: list[str] | None, debug: bool) -> int:
    """``main_body(argv)`` with the signals owned and every error turned into an exit code.

    When this process is the command itself, a stop signal after the work is done still
    ends it with 128 + the signal and one line, never killed by the raw signal while the
    interpreter tears down (see :func:`_end_after_work`).
    """
    program = _started_as_program()
    with signals_recorded(StopFlag(interruptible=True)) as stop:
        code = _outcome(main_body, argv, debug, stop)
        stop.interruptible = False  # from here a signal is recorded, not raised
        if program:  # and held until the handlers below are in place
            signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
        if stop.signum is not None and not stop.acted:
            # It landed where it could not be raised, and the command ended before it was.
            print(
                f"\ninterrupted ({signal.Signals(stop.signum).name}) {AFTER_WORK}", file=sys.stderr
            )
            code = stop.exit_code
    if program:
        _end_after_work(code)
        signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
    return code


def _started_as_program() -> bool:
    """Whether this process is a command started from the shell: its SIGINT handler is
    still the one :func:`exit_at_once_while_starting` installed (not a test's, not a
    caller's)."""
    handler = signal.getsignal(signal.SIGINT)
    code = getattr(handler, "__code__", None)
    return code is not None and code in exit_at_once_while_starting.__code__.co_consts


AFTER_WORK = "after the command had finished: it is all stored"


def _end_after_work(code: int) -> None:
    """From now until the process is gone, a stop signal ends it with 128 + the signal.

    Python puts the default handlers back before it tears its modules down (a few hundred
    ms), and a Ctrl-C then killed the process with the raw signal. So the exit code is
    given at the exit hooks, after the storages' connections are closed and the output
    flushed, and the teardown (which has nothing left to save) is skipped.
    """

    def close_and_flush() -> None:
        gc.collect()  # storages the command dropped: their connections close as they go
        release_all()
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):
                stream.flush()

    def after_work(signum: int, _frame: object) -> None:
        close_and_flush()
        os.write(2, f"\ninterrupted ({signal.Signals(signum).name}) {AFTER_WORK}\n".encode())
        os._exit(128 + signum)

    def exit_now() -> None:
        close_and_flush()
        os._exit(code)

    for s in STOP_SIGNALS:
        signal.signal(s, after_work)
    atexit.register(exit_now)


def _outcome(main_body, argv: list[str] | None, debug: bool, stop: StopFlag) -> int:
    """The exit code of ``main_body(argv)``, its error or its interruption said in one line."""
    try:
        code = main_body(argv)
    except (UsageError, st.DataMismatchError) as exc:  # a study file's errors among them
        _error(exc, debug)
        return 2
    except (
        WorkersFailed,
        StorageUnavailable,
        StorageError,
        StageFailed,
        CacheWriteError,
        FinalDiverged,
        UserCodeFailed,
    ) as exc:
        _error(exc, debug)
        return 1
    except BrokenPipeError:  # the output went to `head` or a closed pager
        with contextlib.suppress(OSError):
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except (Interrupted, KeyboardInterrupt) as exc:
        signum = getattr(exc, "signum", stop.signum or signal.SIGINT)
        stop.acted = True  # said here: not again as a signal that came after the work
        # final trains seeds, not trials: each seed is kept as it ends (its module's name,
        # also when it runs as `python -m search.final`, is in its globals' __spec__)
        module = getattr(getattr(main_body, "__globals__", {}).get("__spec__"), "name", "")
        kept = (
            "finished trials are stored, running ones re-queued"
            if module != "search.final"
            else "finished seeds are stored"
            if "--force" not in (argv if argv is not None else sys.argv[1:])
            # --force trains every seed again: the seeds kept are for a run without it
            else "finished seeds are stored: run it again without --force to go on from them"
        )
        print(
            f"\ninterrupted ({signal.Signals(signum).name}): {kept}"
            + (". Run the same command again to resume." if "--force" not in kept else "."),
            file=sys.stderr,
        )
        return 128 + signum
    except Exception as exc:  # noqa: BLE001 - one line, the traceback on request
        text = f"{type(exc).__name__}: {exc}".splitlines()[0]
        hint = "" if debug else " (--debug or C2F_DEBUG=1 shows the traceback)"
        _error(exc, debug, f"unexpected {text}{hint}")
        return 1
    return code


def format_table(configs: list[rep.Configuration], space: dict[str, Range]) -> str:
    """One row a configuration: its first trial, mean +- sd of val acc over n seeds, and
    each searched value as its range formats it (log floats in e-notation, integers,
    choices as written)."""
    from search.reporting import tables

    cells_of = [[_cell(space, name, c.params.get(name)) for name in space] for c in configs]
    widths = [max([len(name), *(len(row[i]) for row in cells_of)]) for i, name in enumerate(space)]
    header = f"{'trial':>5}  {'val acc':>7}  {'+- sd':>6}  {'n':>2}  "
    header += "  ".join(f"{n:>{w}}" for n, w in zip(space, widths, strict=True))
    header += f"  {'epochs':>6}  {'time s':>6}"
    lines = [header]
    for c, cells in zip(configs, cells_of, strict=True):
        first = min(c.trials, key=lambda t: t.number)
        sd = f"{c.sd:6.4f}" if c.n > 1 else f"{'':>6}"
        text = "  ".join(f"{v:>{w}}" for v, w in zip(cells, widths, strict=True))
        epochs, wall = tables.run_cost(first, "coarse")
        lines.append(
            f"{c.number:>5}  {c.mean:7.4f}  {sd}  {c.n:>2}  {text}  {epochs:>6}  {wall:>6}"
        )
    return "\n".join(lines)


def _cell(space: dict[str, Range], name: str, value: Any) -> str:
    if value is None:
        return "-"
    r = space[name]
    return r.format(r.decode(value))


def dashboard_hint(spec: StudySpec) -> str:
    url = spec.storage_url()
    if url.startswith("journal:///"):
        # optuna-dashboard opens a journal file by its path, not by a URL.
        return f"optuna-dashboard {url[len('journal:///') :]}"
    if url.startswith("grpc://"):
        # optuna-dashboard reads the database itself, not through the proxy.
        return f"optuna-dashboard DATABASE_URL (the --storage that c2f proxy at {url} serves)"
    return f"optuna-dashboard {safe_url(url)}"
