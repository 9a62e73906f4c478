"""Memory of N search workers sharing one memory-mapped CIFAR-sized dataset.

Synthetic CIFAR-10 batches in the official python format (random uint8 pixels,
50,000 training and 10,000 test images of 3072 values) go through the real
preparation (``search.sweep.studies.prepare_for``: load, split 45,000/5,000, normalise once
in this process, write the float32 cache), then
a short coarse search ([50] network, one epoch per trial so every worker reads
every training row, ``train_eval_size`` keeping evaluation cheap) runs on it with
``--workers`` workers: this process runs one, loky processes the others. While
they run, each worker (this process or a descendant, once it maps the cache's
``train_X.npy``; this process's count includes the bench's own memory) is
sampled: Pss and its split into the data files and the rest from
``/proc/<pid>/smaps``, VmHWM from ``/proc/<pid>/status``.

Pss divides each shared page among the processes that map it, so N workers
reading one page-cache copy of the data add up to one copy; a worker that made a
private copy (normalising, ``astype``, fancy indexing of the whole array) would
show it as anonymous Pss of that size. Workers are read one after another, so a
sample's sum can count a page a little more than once while pages are faulted in
(an overestimate). Sizes are MiB. VmHWM counts shared pages in full, so it
is about one copy per worker even when nothing is copied. The goal is total Pss
<= one float32 copy of the data + 150 MB per worker. Prints a table, asserts nothing.

    python -m bench.worker_memory [--workers 4] [--trials 12] [--epochs 1]
"""

from __future__ import annotations

import argparse
import os
import pickle
import tempfile
import threading
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from search.config.study import load_spec
from search.sweep import stage
from search.sweep import studies as st
from search.sweep.prepared import PARTS
from tests.search.conftest import write_study

BATCH = 10_000
N_VAL = 5_000
D = 3072
N_CLASSES = 10
MB = 1 << 20
ALLOWANCE_MB = 150


def write_cifar_batches(root: Path, *, seed: int = 0) -> None:
    """Synthetic CIFAR-10 in the official python format: 5 x 10,000 training and
    10,000 test images of random uint8 pixels, with ``batches.meta``."""
    root.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {
            b"batch_label": name.encode(),
            b"data": rng.integers(0, 256, size=(BATCH, D), dtype=np.uint8),
            b"labels": rng.integers(0, N_CLASSES, size=BATCH).tolist(),
            b"filenames": [f"{name}_{i}.png".encode() for i in range(BATCH)],
        }
        (root / name).write_bytes(pickle.dumps(batch, protocol=2))
    meta = {b"label_names": [f"class{i}".encode() for i in range(N_CLASSES)]}
    (root / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))


def descendants(root: int) -> list[int]:
    """Every process whose parent chain leads to ``root`` (scans /proc)."""
    parent: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/status") as f:
                for line in f:
                    if line.startswith("PPid:"):
                        parent[int(entry.name)] = int(line.split()[1])
                        break
        except OSError:
            continue
    children: dict[int, list[int]] = defaultdict(list)
    for pid, ppid in parent.items():
        children[ppid].append(pid)
    found, todo = [], [root]
    while todo:
        for child in children.get(todo.pop(), []):
            found.append(child)
            todo.append(child)
    return found


def sample(pid: int, data_dir: Path) -> dict[str, float] | None:
    """Pss (total, of the data files, anonymous), Rss and VmHWM of ``pid`` in MB; None if
    the process is gone or does not map the data."""
    pss = pss_data = pss_anon = rss = 0
    maps_data = False
    prefix = str(data_dir)
    current_is_data = False
    try:
        with open(f"/proc/{pid}/smaps") as f:
            for line in f:
                head = line.split(None, 1)[0]
                if not head.endswith(":"):  # a mapping's header line: range perms ... path
                    parts = line.split()
                    current_is_data = len(parts) >= 6 and parts[5].startswith(prefix)
                    maps_data = maps_data or current_is_data
                elif head == "Pss:":
                    kb = int(line.split()[1])
                    pss += kb
                    if current_is_data:
                        pss_data += kb
                elif head == "Rss:":
                    rss += int(line.split()[1])
        with open(f"/proc/{pid}/smaps_rollup") as f:
            for line in f:
                if line.startswith("Pss_Anon:"):
                    pss_anon = int(line.split()[1])
        with open(f"/proc/{pid}/status") as f:
            status = {k: v for k, _, v in (ln.partition(":") for ln in f)}
    except (OSError, ValueError, IndexError):
        return None
    if not maps_data:
        return None
    return {
        "pss": pss / 1024,
        "pss_data": pss_data / 1024,
        "pss_rest": (pss - pss_data) / 1024,
        "pss_anon": pss_anon / 1024,
        "rss": rss / 1024,
        "hwm": int(status["VmHWM"].split()[0]) / 1024,
    }


class Sampler(threading.Thread):
    """Samples this process and its workers every ``interval`` seconds until stopped."""

    def __init__(self, data_dir: Path, interval: float = 0.25) -> None:
        super().__init__(daemon=True)
        self.data_dir = data_dir
        self.interval = interval
        self.stop = threading.Event()
        self.samples: list[dict[int, dict[str, float]]] = []

    def run(self) -> None:
        me = os.getpid()
        while not self.stop.is_set():
            now = {}
            for pid in [me, *descendants(me)]:
                s = sample(pid, self.data_dir)
                if s is not None:
                    now[pid] = s
            if now:
                self.samples.append(now)
            self.stop.wait(self.interval)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workers", type=int, default=4)
    p.add_argument("--trials", type=int, default=12)
    p.add_argument("--epochs", type=int, default=1, help="training epochs per trial")
    p.add_argument("--train-eval-size", type=int, default=1000)
    args = p.parse_args(argv)

    with tempfile.TemporaryDirectory(prefix="bench-memory-") as tmp:
        write_cifar_batches(Path(tmp) / "cifar")
        batch = 100
        n_train = 5 * BATCH - N_VAL
        steps_per_epoch = n_train // batch
        study_file = write_study(
            Path(tmp),
            "memory",
            data={
                "name": "cifar10",
                "split": "all",
                "n_val": N_VAL,
                "dir": str(Path(tmp) / "cifar"),
            },
            network={"hidden": [50]},
            training={
                "batch_size": batch,
                "n_s": steps_per_epoch // 2,  # one cycle = one epoch
                "n_cycles": args.epochs,
                "evals_per_cycle": 2,
                "train_eval_size": args.train_eval_size,
            },
            coarse={"trials": args.trials},
            optuna={"pruner": "none", "workers": args.workers},
        )
        spec = load_spec(study_file)
        # The real path: load the batches, normalise once in this process, write the
        # float32 cache that every worker then maps.
        t0 = time.perf_counter()
        prepared = st.prepare_for(spec, log=lambda *a: None)
        t_write = time.perf_counter() - t0
        study = st.open_study(spec, "coarse")
        st.record_data(study, prepared)
        st.top_up(study, args.trials)
        sampler = Sampler(prepared.path)
        sampler.start()
        t0 = time.perf_counter()
        stage.run_stage_workers(spec, "coarse", dict(spec.search), prepared, workers=args.workers)
        wall = time.perf_counter() - t0
        sampler.stop.set()
        sampler.join()
        c = st.counts(study)
        data_mb = sum((prepared.path / f"{part}_X.npy").stat().st_size for part in PARTS) / MB
        train_mb = (prepared.path / "train_X.npy").stat().st_size / MB

    samples = sampler.samples
    print(
        f"{args.workers} workers, synthetic CIFAR-10 batches ({n_train} + {N_VAL} + {BATCH} "
        f"x {D}, prepared as float32 in {t_write:.1f} s), [50] network, "
        f"{args.epochs} epoch(s)/trial, train_eval_size {args.train_eval_size}"
    )
    print(
        f"search: {c['COMPLETE']} complete, {c['PRUNED']} pruned, {c['FAIL']} failed in "
        f"{wall:.1f} s; {len(samples)} samples"
    )
    if not samples:
        print("no worker was sampled (did the workers start?)")
        return 0
    totals = [sum(s["pss"] for s in now.values()) for now in samples]
    i_max = int(np.argmax(totals))
    at_max = samples[i_max]
    per_worker: dict[int, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for now in samples:
        for pid, s in now.items():
            for k, v in s.items():
                per_worker[pid][k] = max(per_worker[pid][k], v)
    print(
        f"\n{'worker pid':>10}  {'max Pss':>8}  {'Pss data':>8}  {'Pss rest':>8}  "
        f"{'Pss anon':>8}  {'max Rss':>8}  {'VmHWM':>8}   (MiB, maxima over samples)"
    )
    for pid in sorted(per_worker):
        w = per_worker[pid]
        print(
            f"{pid:>10}  {w['pss']:8.1f}  {w['pss_data']:8.1f}  {w['pss_rest']:8.1f}  "
            f"{w['pss_anon']:8.1f}  {w['rss']:8.1f}  {w['hwm']:8.1f}"
        )
    total = totals[i_max]
    data_total = sum(s["pss_data"] for s in at_max.values())
    rest_total = sum(s["pss_rest"] for s in at_max.values())
    anon_total = sum(s["pss_anon"] for s in at_max.values())
    budget = data_mb + ALLOWANCE_MB * args.workers
    print(
        f"\nmax total Pss {total:.1f} MiB over {len(at_max)} workers at that sample: "
        f"data files {data_total:.1f}, rest {rest_total:.1f} (anonymous {anon_total:.1f})"
    )
    print(
        f"one float32 copy: train {train_mb:.1f} MiB, all splits {data_mb:.1f} MiB; budget "
        f"{data_mb:.1f} + {args.workers} x {ALLOWANCE_MB} = {budget:.1f} MiB -> "
        f"{'within' if total <= budget else 'OVER'} budget ({total / budget:.2f} of it)"
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
