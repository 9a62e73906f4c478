"""What a user sees after many Ctrl-Cs, and after two commands on one study.

``python -m bench.bookkeeping_probe --interrupts 10 --trials 8``: a 2-worker
SQLite coarse search of the quick start (``search.coarse`` in its own process
group, as in a terminal) gets SIGINT to its group at a random moment (up to
``--max-delay`` s) after a trial starts training, ``--interrupts`` times, each
run resuming the last; then it runs to its end.
Then ``--pairs`` studies are each run by two ``search.coarse`` commands
started together (whether both queue the same replicates is a race).
For each, prints the last progress line of every command, the ``top_up``
line of the last one and what ``search.status`` shows, so the counts a user
reads ("failed", "re-queued", "retired", finished of the target) can be
compared before and after a change, and what the database holds: the FAILed
trials per recorded reason.
"""

from __future__ import annotations

import argparse
import os
import random
import re
import signal
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

import optuna
from optuna.trial import TrialState

REPO = Path(__file__).resolve().parents[1]


def study_file(directory: Path, name: str, *, trials: int, n_cycles: int) -> Path:
    """The quick start named ``name`` with ``trials`` coarse trials of ``n_cycles`` cycles."""
    text = (REPO / "studies" / "quickstart.toml").read_text()
    text = re.sub(r'^name = ".*"$', f'name = "{name}"', text, count=1, flags=re.M)
    text = re.sub(r"^n_cycles = \d+", f"n_cycles = {n_cycles}", text, count=1, flags=re.M)
    text = re.sub(r"^trials = 40$", f"trials = {trials}", text, count=1, flags=re.M)
    path = directory / f"{name}.toml"
    path.write_text(text)
    return path


def command(path: Path, url: str) -> list[str]:
    return [sys.executable, "-m", "search.coarse", "--study", str(path), "--storage", url]


def failed_reasons(url: str, name: str) -> dict[str, int]:
    """The FAILed trials of study ``name`` per recorded reason (its first two words)."""
    storage = optuna.storages.RDBStorage(url)
    try:
        trials = optuna.load_study(study_name=name, storage=storage).get_trials()
    finally:
        storage.engine.dispose()
    reasons = Counter(
        " ".join(str(t.user_attrs.get("reason", "?")).split()[:2])
        for t in trials
        if t.state == TrialState.FAIL
    )
    return dict(reasons)


def training(url: str, name: str) -> bool:
    """Whether a trial of study ``name`` trains now (RUNNING with its parameters drawn)."""
    storage = optuna.storages.RDBStorage(url)
    try:
        trials = optuna.load_study(study_name=name, storage=storage).get_trials()
    except Exception:  # noqa: BLE001 - the command is still creating it
        return False
    finally:
        storage.engine.dispose()
    return any(t.state == TrialState.RUNNING and t.params for t in trials)


def progress_lines(out: str) -> list[str]:
    return [line for line in out.splitlines() if re.match(r"^\d+/\d+ finished", line)]


def status(path: Path, url: str) -> str:
    cmd = [sys.executable, "-m", "search.status", "--study", str(path), "--storage", url]
    return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=120).stdout


def interrupted_run(
    directory: Path, *, interrupts: int, trials: int, n_cycles: int, max_delay: float
) -> None:
    path = study_file(directory, "probe-int", trials=trials, n_cycles=n_cycles)
    url = f"sqlite:///{directory / 'int.db'}"
    sent = 0
    rng = random.Random(0)
    for _ in range(interrupts):
        proc = subprocess.Popen(
            command(path, url),
            cwd=REPO,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            start_new_session=True,
        )
        while proc.poll() is None and not training(url, "probe-int-coarse"):
            time.sleep(0.05)
        time.sleep(rng.uniform(0, max_delay))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGINT)
            sent += 1
        out, err = proc.communicate(timeout=60)
        if proc.returncode == 0:
            break  # the study finished before a trial trained: no more to interrupt
        if proc.returncode != 130:
            raise SystemExit(f"exit {proc.returncode} after SIGINT: {err}")
    last = subprocess.run(command(path, url), cwd=REPO, capture_output=True, text=True)
    if last.returncode != 0:
        raise SystemExit(f"the resumed run exited {last.returncode}: {last.stderr}")
    print(f"== {sent} SIGINTs to a running coarse search of {trials} trials, then resumed")
    print("resumed run:", next(x for x in last.stdout.splitlines() if x.startswith("study ")))
    print("resumed run, last progress line:", progress_lines(last.stdout)[-1])
    print(status(path, url), end="")
    print("in the database, FAILed trials per reason:", failed_reasons(url, "probe-int-coarse"))


def two_commands(directory: Path, *, trials: int, n_cycles: int, run: int) -> None:
    path = study_file(directory, "probe-two", trials=trials, n_cycles=n_cycles)
    url = f"sqlite:///{directory / f'two{run}.db'}"
    # The first creates the study and its data cache; the second starts on its heels.
    first = subprocess.Popen(command(path, url), cwd=REPO, stdout=subprocess.PIPE, text=True)
    while not training(url, "probe-two-coarse"):
        time.sleep(0.05)
    second = subprocess.Popen(command(path, url), cwd=REPO, stdout=subprocess.PIPE, text=True)
    outs = [first.communicate(timeout=600)[0], second.communicate(timeout=600)[0]]
    print(f"== two coarse commands on one study of {trials} trials (pair {run})")
    for i, out in enumerate(outs, 1):
        lines = progress_lines(out)
        print(f"command {i}, last progress line:", lines[-1] if lines else "(none)")
    print(status(path, url), end="")
    print("in the database, FAILed trials per reason:", failed_reasons(url, "probe-two-coarse"))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.bookkeeping_probe", description=__doc__)
    p.add_argument("--interrupts", type=int, default=10)
    p.add_argument("--trials", type=int, default=8)
    p.add_argument("--n-cycles", type=int, default=6, help="per trial: long enough to interrupt")
    p.add_argument("--max-delay", type=float, default=1.0, help="s after training starts")
    p.add_argument("--pairs", type=int, default=1, help="studies run by two commands at once")
    args = p.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        if args.interrupts:
            interrupted_run(
                Path(tmp),
                interrupts=args.interrupts,
                trials=args.trials,
                n_cycles=args.n_cycles,
                max_delay=args.max_delay,
            )
        for run in range(args.pairs):
            two_commands(Path(tmp), trials=args.trials, n_cycles=args.n_cycles, run=run)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
