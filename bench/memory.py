"""Peak memory of loading a full-size CIFAR-10 and training on it.

Writes a synthetic CIFAR-10 in the python-batch format (data_batch_1..5 and test_batch,
10,000 random uint8 images of 3072 values each, pickled like the official files) to a
temporary directory, then, in a fresh subprocess so nothing else in this process (torch,
say) counts, runs ``model.data.load("cifar10", dir, split="all", n_val=5000)`` and one
epoch of ``model.train.fit`` on 3072-50-50-10 with batch norm (450 steps, then one
evaluation on all 45,000 training and 5,000 validation images). It prints the resident
set size (VmRSS) and its peak (VmHWM, and getrusage ru_maxrss) after each stage.

One float32 copy of the 50,000 x 3072 training+validation array is 614 MB and the
float32 test set 123 MB; a float64 copy would be twice that, and a second float32 copy
of the training data another 553 MB. Asserts nothing.

    python -m bench.memory [--keep DIR]
"""

from __future__ import annotations

import argparse
import ctypes
import pickle
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

N_PER_BATCH = 10_000
D = 3072
MB = 1e6


def write_synthetic_cifar(directory: Path, *, seed: int = 0) -> None:
    """data_batch_1..5, test_batch and batches.meta with random images, as protocol-2 pickles."""
    directory.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    names = [f"data_batch_{i}" for i in range(1, 6)] + ["test_batch"]
    for name in names:
        batch = {
            b"batch_label": name.encode(),
            b"labels": rng.integers(0, 10, N_PER_BATCH).tolist(),
            b"data": rng.integers(0, 256, (N_PER_BATCH, D), dtype=np.uint8),
            b"filenames": [],
        }
        with open(directory / name, "wb") as f:
            pickle.dump(batch, f, protocol=2)
    meta = {b"label_names": [f"class{i}".encode() for i in range(10)]}
    with open(directory / "batches.meta", "wb") as f:
        pickle.dump(meta, f, protocol=2)


def _status() -> dict[str, float]:
    """VmRSS and VmHWM of this process in MB, and ru_maxrss in MB (Linux reports KiB)."""
    values = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM"):
                values[key] = int(rest.split()[0]) * 1024 / MB
    values["ru_maxrss"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / MB
    return values


def _reset_peak() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0); False where that is not allowed."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def _malloc_trim() -> bool:
    """Return glibc's free heap to the OS (a diagnostic: what is left is really in use)."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        return False
    return True


def child(data_dir: str) -> int:
    """Load, then train one epoch, printing memory after each stage."""
    from model.data import load
    from model.network import Network
    from model.train import TrainConfig, fit

    rows = [("imports done", _status(), "")]
    t0 = time.perf_counter()
    splits = load("cifar10", data_dir, split="all", n_val=5000)
    rows.append(("after load + normalise", _status(), f"{time.perf_counter() - t0:.1f} s"))
    held = {
        "train+val X (one array)": splits.train.X.base
        if splits.train.X.base is not None
        else splits.train.X,
        "test X": splits.test.X,
    }
    shares = np.shares_memory(splits.train.X, held["train+val X (one array)"])
    reset = _reset_peak()
    net = Network(D, [50, 50], 10, batch_norm=True, seed=0)
    config = TrainConfig(l2_lambda=0.005, schedule="constant", eta=0.01, n_epochs=1, seed=0)
    t0 = time.perf_counter()
    history = fit(net, splits, config)
    rows.append(("after 1 epoch of fit", _status(), f"{time.perf_counter() - t0:.1f} s"))
    trimmed = _malloc_trim()
    if trimmed:
        rows.append(("then malloc_trim(0)", _status(), "diagnostic: frees glibc's retained heap"))

    print(
        f"data: train {splits.train.X.shape} {splits.train.X.dtype}, "
        f"val {splits.val.X.shape}, test {splits.test.X.shape}; "
        f"train is a view of the 50,000-row array: {shares}"
    )
    for name, arr in held.items():
        print(f"  {name:<24} {arr.shape} {arr.dtype} = {arr.nbytes / MB:7.1f} MB")
    data_mb = sum(a.nbytes for a in held.values()) / MB
    print(f"  {'all data held':<24} {'':>20} = {data_mb:7.1f} MB")
    print(f"fit: {len(history)} evaluation(s), val acc {history.metrics['val_acc'][-1]:.3f}")
    print()
    header = f"{'stage':<26} {'VmRSS MB':>9} {'VmHWM MB':>9} {'ru_maxrss MB':>13}  note"
    print(header)
    print("-" * len(header))
    for stage, v, note in rows:
        print(f"{stage:<26} {v['VmRSS']:>9.0f} {v['VmHWM']:>9.0f} {v['ru_maxrss']:>13.0f}  {note}")
    base = rows[0][1]["VmRSS"]
    load_peak = rows[1][1]["VmHWM"]
    print()
    print(f"peak while loading - baseline      = {load_peak - base:7.0f} MB")
    if reset:
        train_peak = rows[2][1]["VmHWM"]
        print(
            f"peak while training - after load   = {train_peak - rows[1][1]['VmRSS']:7.0f} MB"
            "  (VmHWM reset after loading; ru_maxrss cannot be reset)"
        )
    if trimmed:
        retained = rows[2][1]["VmRSS"] - rows[3][1]["VmRSS"]
        print(f"freed heap kept resident by glibc  = {retained:7.0f} MB  (returned by the trim)")
    print(
        f"for scale: one float32 copy of train+val = {50_000 * D * 4 / MB:.0f} MB, "
        f"a float64 copy = {50_000 * D * 8 / MB:.0f} MB"
    )
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.memory", description=__doc__)
    p.add_argument("--keep", default=None, help="write the synthetic data here and keep it")
    p.add_argument("--child", default=None, help=argparse.SUPPRESS)
    p.add_argument("--write", default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child is not None:
        return child(args.child)
    if args.write is not None:
        write_synthetic_cifar(Path(args.write))
        return 0

    with tempfile.TemporaryDirectory(prefix="c2f-memory-") as tmp:
        data_dir = Path(args.keep) if args.keep else Path(tmp) / "cifar-10-batches-py"
        repo = Path(__file__).resolve().parents[1]
        if not (data_dir / "test_batch").is_file():
            print(f"writing synthetic CIFAR-10 (6 x {N_PER_BATCH} x {D} uint8) to {data_dir}")
            # In its own process: a child inherits its parent's ru_maxrss at fork.
            cmd = [sys.executable, "-m", "bench.memory", "--write", str(data_dir)]
            subprocess.run(cmd, cwd=repo, check=True)
        cmd = [sys.executable, "-m", "bench.memory", "--child", str(data_dir)]
        print(f"measuring in a subprocess: {' '.join(cmd)}\n", flush=True)
        return subprocess.run(cmd, cwd=repo, check=False).returncode


if __name__ == "__main__":
    raise SystemExit(main())
