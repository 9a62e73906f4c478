"""Signals at random moments of a real sweep: hangs, tracebacks, duplicates, overshoot, orphans.

``python -m bench.signal_probe --runs 50``: a 2-worker SQLite sweep of the quick
start (``search.coarse``, its own process group as in a terminal) gets SIGINT
to its process group at a random moment, ``--runs`` times, each run resuming
the last; then SIGKILL, SIGTERM, SIGINT and SIGHUP to the command's PID alone.
Each run is checked for: exit within ``--timeout`` s with 128 + the signal
(SIGKILL: -9), nothing on stderr but the one "interrupted" line (no
traceback, no "Exception ignored"), no process of the group left 5 s later,
no RUNNING trial left behind, no two finished trials with the same
parameters, and never more finished trials than the target. Finally the sweep
is run to its end and must finish exactly its target. Prints one line per run
and a summary; exits 1 if anything was found.
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
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


def group_alive(pgid: int) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def check_study(url: str, target: int) -> dict[str, int]:
    storage = optuna.storages.RDBStorage(url)
    try:
        trials = optuna.load_study(study_name="probe-coarse", storage=storage).get_trials()
    finally:
        storage.engine.dispose()
    finished = [t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED)]
    seen = Counter(tuple(sorted(t.params.items())) for t in finished)
    return {
        "finished": len(finished),
        "running": sum(t.state == TrialState.RUNNING for t in trials),
        "duplicates": sum(n - 1 for n in seen.values() if n > 1),
        "overshoot": max(0, len(finished) - target),
    }


def one_run(cmd: list[str], *, sig: int, to_group: bool, delay: float, timeout: float) -> dict:
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )
    time.sleep(delay)
    finished_early = proc.poll() is not None
    if not finished_early:
        if to_group:
            os.killpg(proc.pid, sig)
        else:
            os.kill(proc.pid, sig)
    t0 = time.monotonic()
    hang = False
    try:
        _, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        hang = True
        os.killpg(proc.pid, signal.SIGKILL)
        _, err = proc.communicate()
    took = time.monotonic() - t0
    time.sleep(5.0 if not to_group or sig == signal.SIGKILL else 0.5)
    left = group_alive(proc.pid)
    if left:
        os.killpg(proc.pid, signal.SIGKILL)
    lines = [ln for ln in err.splitlines() if ln.strip()]
    noise = [
        ln for ln in lines if not ln.startswith("interrupted (") and "dropped trial" not in ln
    ]
    expected = -signal.SIGKILL if sig == signal.SIGKILL else 128 + sig
    return {
        "code": proc.returncode,
        "ok_code": finished_early or proc.returncode == expected,
        "hang": hang,
        "took": took,
        "left": left,
        "noise": noise,
        "early": finished_early,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.signal_probe", description=__doc__)
    p.add_argument("--runs", type=int, default=50, help="SIGINTs to the process group")
    p.add_argument("--trials", type=int, default=400, help="the sweep's target")
    p.add_argument("--timeout", type=float, default=15.0, help="seconds to exit before a hang")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--keep", action="store_true", help="keep the temporary folder")
    args = p.parse_args(argv)
    rng = random.Random(args.seed)
    tmp = Path(tempfile.mkdtemp(prefix="c2f-signal-probe-"))
    study = tmp / "probe.toml"
    text = (REPO / "studies" / "quickstart.toml").read_text()
    study.write_text(text.replace('name = "quickstart"', 'name = "probe"'))
    url = f"sqlite:///{tmp / 'probe.db'}"
    cmd = [
        sys.executable,
        "-m",
        "search.coarse",
        "--study",
        str(study),
        "--storage",
        url,
        "--trials",
        str(args.trials),
        "--workers",
        "2",
    ]
    plan = [(signal.SIGINT, True)] * args.runs + [
        (s, False) for s in (signal.SIGKILL, signal.SIGTERM, signal.SIGINT, signal.SIGHUP)
    ]
    bad = Counter()
    for i, (sig, to_group) in enumerate(plan):
        delay = rng.uniform(1.0, 6.0)
        r = one_run(cmd, sig=sig, to_group=to_group, delay=delay, timeout=args.timeout)
        s = check_study(url, args.trials)
        problems = []
        if r["hang"]:
            problems.append("hang")
        if not r["ok_code"]:
            problems.append(f"exit {r['code']}")
        if r["noise"]:
            problems.append("stderr: " + " | ".join(r["noise"])[:300])
        if r["left"]:
            problems.append("processes left")
        # After a SIGKILL of the command alone its workers re-queue their trials themselves.
        if s["running"]:
            problems.append(f"{s['running']} RUNNING left")
        if s["duplicates"]:
            problems.append(f"{s['duplicates']} duplicate(s)")
        if s["overshoot"]:
            problems.append(f"overshoot {s['overshoot']}")
        for prob in problems:
            bad[prob.split(":")[0].split(" ")[0]] += 1
        where = "group" if to_group else "pid"
        print(
            f"run {i + 1:>3} {signal.Signals(sig).name:>7} to {where:<5} at {delay:4.1f} s: "
            f"exit {r['code']:>4} in {r['took']:4.1f} s, {s['finished']}/{args.trials} finished"
            + ("" if not problems else "  PROBLEM: " + "; ".join(problems))
            + ("  (had finished)" if r["early"] else ""),
            flush=True,
        )
        if s["finished"] >= args.trials:
            break
    last = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=1800)
    s = check_study(url, args.trials)
    end_ok = last.returncode == 0 and s["finished"] == args.trials and not s["duplicates"]
    print(
        f"final run: exit {last.returncode}, {s['finished']}/{args.trials} finished, "
        f"{s['duplicates']} duplicates, {s['running']} running"
    )
    print(
        "summary: "
        + (", ".join(f"{k} {v}" for k, v in bad.items()) if bad else "no problems")
        + f"; {len(plan)} signals; final target {'met' if end_ok else 'NOT met'}"
    )
    if not args.keep:
        shutil.rmtree(tmp, ignore_errors=True)
    else:
        print(f"kept {tmp}")
    return 0 if not bad and end_ok else 1


if __name__ == "__main__":
    raise SystemExit(main())
