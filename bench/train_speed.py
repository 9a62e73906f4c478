"""Seconds per training epoch: our NumPy trainer against PyTorch on the CPU.

One epoch is 45,000 random float32 samples of 3072 features (10 classes), batch 100,
a fresh shuffle and a gathered batch per step, plain SGD with L2, for three networks.
Ours is timed through ``model.train.fit`` itself (one constant-rate epoch) with a
1-sample training evaluation and a 10-sample validation set, so the single
evaluation at the end of the epoch costs microseconds. PyTorch does the same work
(same layers, batch norm before ReLU, SGD, batch 100, shuffled gather into a reused
batch tensor); it is skipped when torch does not import. ``--threads`` (default 2)
sets both torch's threads and NumPy's BLAS threads. Each figure is the best of
``--repeats`` runs, ours and torch interleaved. Prints a table, asserts nothing.

    python -m bench.train_speed [--repeats 3] [--n 45000] [--threads 2]
"""

from __future__ import annotations

import argparse
import platform
import time
from collections.abc import Sequence

import numpy as np
from threadpoolctl import threadpool_limits

from model.data import Dataset, Splits
from model.network import Network
from model.train import TrainConfig, fit

NETS: tuple[tuple[str, tuple[int, ...], bool], ...] = (
    ("[50]", (50,), False),
    ("[50,50]+BN", (50, 50), True),
    ("[50,30,20,20,10,10,10,10]+BN", (50, 30, 20, 20, 10, 10, 10, 10), True),
)
D_IN = 3072
N_CLASSES = 10
BATCH = 100
ETA = 0.01
L2_LAMBDA = 1e-3


def make_splits(n: int, *, seed: int = 0) -> Splits:
    """n random samples (n, 3072) float32 for training and 10 for validation."""
    rng = np.random.default_rng(seed)
    X = rng.standard_normal((n, D_IN), dtype=np.float32)
    y = rng.integers(0, N_CLASSES, size=n)
    Xv = rng.standard_normal((10, D_IN), dtype=np.float32)
    yv = rng.integers(0, N_CLASSES, size=10)
    return Splits(Dataset(X, y), Dataset(Xv, yv), Dataset(Xv, yv))


def time_ours(splits: Splits, hidden: Sequence[int], batch_norm: bool, *, seed: int) -> float:
    """Seconds for one epoch of ``fit`` (its evaluation at the end is on 11 samples)."""
    net = Network(D_IN, hidden, N_CLASSES, batch_norm=batch_norm, seed=seed)
    config = TrainConfig(
        l2_lambda=L2_LAMBDA,
        batch_size=BATCH,
        schedule="constant",
        eta=ETA,
        n_epochs=1,
        train_eval_size=1,
        seed=seed,
    )
    t0 = time.perf_counter()
    fit(net, splits, config)
    return time.perf_counter() - t0


def torch_net(torch, hidden: Sequence[int], batch_norm: bool):  # noqa: ANN001, ANN201
    """The same network in torch: Linear (no bias before BN), BatchNorm1d, ReLU, ..., Linear."""
    nn = torch.nn
    mods: list = []
    d = D_IN
    for h in hidden:
        mods.append(nn.Linear(d, h, bias=not batch_norm))
        if batch_norm:
            mods.append(nn.BatchNorm1d(h, eps=1e-5, momentum=0.1))
        mods.append(nn.ReLU())
        d = h
    mods.append(nn.Linear(d, N_CLASSES))
    return nn.Sequential(*mods)


def time_torch(torch, splits: Splits, hidden: Sequence[int], batch_norm: bool, *, seed: int):  # noqa: ANN001, ANN201
    """Seconds for one epoch of the same training in torch (float32, 2 threads)."""
    torch.manual_seed(seed)
    net = torch_net(torch, hidden, batch_norm)
    X = torch.from_numpy(splits.train.X)
    y = torch.from_numpy(splits.train.y)
    weights = [m.weight for m in net if isinstance(m, torch.nn.Linear)]
    others = [p for p in net.parameters() if all(p is not w for w in weights)]
    # Our L2 is lambda * sum W^2, gradient 2 lambda W: SGD weight decay 2 lambda on W only.
    opt = torch.optim.SGD(
        [{"params": weights, "weight_decay": 2 * L2_LAMBDA}, {"params": others}], lr=ETA
    )
    loss_fn = torch.nn.CrossEntropyLoss()
    n = X.shape[0]
    steps = n // BATCH
    Xb = torch.empty((BATCH, D_IN), dtype=torch.float32)
    yb = torch.empty(BATCH, dtype=torch.int64)
    gen = torch.Generator().manual_seed(seed)
    net.train()
    t0 = time.perf_counter()
    order = torch.randperm(n, generator=gen)
    for s in range(steps):
        idx = order[s * BATCH : (s + 1) * BATCH]
        torch.index_select(X, 0, idx, out=Xb)
        torch.index_select(y, 0, idx, out=yb)
        opt.zero_grad(set_to_none=True)
        loss = loss_fn(net(Xb), yb)
        loss.backward()
        opt.step()
    loss.item()
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.train_speed", description=__doc__)
    p.add_argument("--repeats", type=int, default=3, help="best of this many runs")
    p.add_argument("--n", type=int, default=45_000, help="training samples per epoch")
    p.add_argument("--threads", type=int, default=2, help="BLAS / torch threads for both")
    args = p.parse_args(argv)

    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        torch.set_num_threads(args.threads)
    threadpool_limits(args.threads)

    splits = make_splits(args.n)
    print(
        f"one epoch: {args.n} x {D_IN} float32, batch {BATCH}, SGD eta {ETA}, "
        f"L2 {L2_LAMBDA}, shuffled every epoch; best of {args.repeats}"
    )
    print(f"numpy {np.__version__}, python {platform.python_version()}", end="")
    print(f", torch {torch.__version__}" if torch is not None else ", torch: absent", end="")
    print(f"; {args.threads} BLAS/torch thread(s)")
    print("ours = model.train.fit for 1 epoch (final evaluation on 1 train + 10 val samples)")
    print()
    header = f"{'network':<30} {'ours s/epoch':>12} {'torch s/epoch':>13} {'torch/ours':>10}"
    print(header)
    print("-" * len(header))
    for name, hidden, bn in NETS:
        # Interleaved, so a burst of load on a shared machine hits both sides alike.
        ours_times, torch_times = [], []
        for r in range(args.repeats):
            ours_times.append(time_ours(splits, hidden, bn, seed=r))
            if torch is not None:
                torch_times.append(time_torch(torch, splits, hidden, bn, seed=r))
        ours = min(ours_times)
        if torch is None:
            print(f"{name:<30} {ours:>12.3f} {'-':>13} {'-':>10}", flush=True)
            continue
        ref = min(torch_times)
        print(f"{name:<30} {ours:>12.3f} {ref:>13.3f} {ref / ours:>9.2f}x", flush=True)
    gather, matmul = time_floor(splits, repeats=args.repeats)
    floor = gather + matmul
    print(
        f"\nfloor of any trainer of [50] here: the batch gather {gather:.3f} s + the first "
        f"layer's two matmuls (X W and X^T dS) {matmul:.3f} s = {floor:.3f} s per epoch"
    )
    return 0


def time_floor(splits: Splits, *, repeats: int) -> tuple[float, float]:
    """Seconds per epoch of the work no trainer can skip: gathering the shuffled
    batches and the first layer's forward and weight-gradient matmuls (best of
    ``repeats``)."""
    X = splits.train.X
    n = X.shape[0] // BATCH * BATCH
    order = np.random.default_rng(0).permutation(X.shape[0])
    Xb = np.empty((BATCH, D_IN), dtype=np.float32)
    W = np.zeros((D_IN, 50), dtype=np.float32)
    S = np.empty((BATCH, 50), dtype=np.float32)
    dW = np.empty_like(W)
    gather = matmul = float("inf")
    for _ in range(repeats):
        t0 = time.perf_counter()
        for i in range(0, n, BATCH):
            np.take(X, order[i : i + BATCH], axis=0, out=Xb, mode="clip")
        gather = min(gather, time.perf_counter() - t0)
        t0 = time.perf_counter()
        for _ in range(0, n, BATCH):
            np.matmul(Xb, W, out=S)
            np.matmul(Xb.T, S, out=dW)
        matmul = min(matmul, time.perf_counter() - t0)
    return gather, matmul


if __name__ == "__main__":
    raise SystemExit(main())
