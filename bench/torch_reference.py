"""Test accuracy of our trainer against an independent PyTorch implementation.

Data: the CIFAR-10 subset (``--data-dir``) through ``model.data.load("cifar10", ...,
split="all", n_val=1017)``: training data_batch_1..4 (4,068 images), validation
data_batch_5 (1,017), test test_batch (1,017), scaled to [0, 1] and standardised with
the training mean and std. Both implementations train on exactly these arrays.

Configurations (batch 100, cyclical eta 1e-5..1e-1 with n_s = 80 for 2 cycles = 320
steps = 8 epochs, a fresh shuffle each epoch with the 68 leftover images dropped,
cost = mean cross-entropy + lambda * sum of squared weights, weights only):

- A: 3072-50-10, init normal(0, 1/d_in) ("xavier" in our Network), lambda 1e-4 and 1e-3;
- B: 3072-50-50-10 with batch norm before each ReLU, He init normal(0, 2/d_in),
  lambda 0.005. A layer followed by batch norm has no bias (in both).

The PyTorch side uses nn.Linear / nn.BatchNorm1d / SGD with the learning rate set
every step. Its batch norm differs from ours in two small ways: the running variance
is updated with the unbiased batch variance (times N/(N-1) = 100/99), and the running
averages start from 0 and 1 where ours take the first batch's statistics as they are
(ours: alpha = 0.9 on the old value, the same as torch momentum = 0.1). Neither
matters after 320 steps at the precision of a test accuracy.

Runs without torch (ours only). Prints a table; std is the sample std over seeds.

    python -m bench.torch_reference [--seeds-ours 5] [--seeds-torch 10]
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from model.data import Splits, load
from model.network import Network
from model.train import TrainConfig, fit

DEFAULT_DATA_DIR = Path(__file__).resolve().parents[2] / "shared" / "data" / "cifar-10-batches-py"
BATCH = 100
ETA_MIN, ETA_MAX, N_S, N_CYCLES = 1e-5, 1e-1, 80, 2


@dataclass(frozen=True)
class Case:
    name: str
    hidden: tuple[int, ...]
    batch_norm: bool
    init: str  # "xavier" (variance 1/d_in) or "he" (variance 2/d_in)
    l2_lambda: float
    earlier: str  # test accuracy of an earlier independent PyTorch run, 10 seeds


CASES = (
    Case("A [50] lambda=1e-4", (50,), False, "xavier", 1e-4, "41.3 +- 0.8"),
    Case("A [50] lambda=1e-3", (50,), False, "xavier", 1e-3, "41.3 +- 1.1"),
    Case("B [50,50]+BN lambda=5e-3", (50, 50), True, "he", 5e-3, "-"),
)


def lr_at(step: int) -> float:
    """Triangular cyclical learning rate, written out again for the torch side."""
    t = step % (2 * N_S)
    frac = t / N_S if t < N_S else 2.0 - t / N_S
    return ETA_MIN + frac * (ETA_MAX - ETA_MIN)


def run_ours(splits: Splits, case: Case, seed: int) -> float:
    """Test accuracy (%) of model.train.fit on one seed."""
    net = Network(
        splits.train.d,
        case.hidden,
        splits.train.n_classes,
        batch_norm=case.batch_norm,
        init=case.init,
        seed=seed,
    )
    config = TrainConfig(
        l2_lambda=case.l2_lambda,
        batch_size=BATCH,
        schedule="cyclical",
        eta_min=ETA_MIN,
        eta_max=ETA_MAX,
        n_s=N_S,
        n_cycles=N_CYCLES,
        seed=seed,
    )
    fit(net, splits, config)
    return 100.0 * net.evaluate(splits.test.X, splits.test.y)["accuracy"]


def run_torch(torch, splits: Splits, case: Case, seed: int) -> float:  # noqa: ANN001
    """Test accuracy (%) of the same training written in PyTorch, on one seed."""
    nn = torch.nn
    torch.manual_seed(seed)
    mods: list = []
    linears: list = []
    d = splits.train.d
    for h in (*case.hidden, splits.train.n_classes):
        last = len(linears) == len(case.hidden)
        lin = nn.Linear(d, h, bias=last or not case.batch_norm)
        std = (2.0 / d) ** 0.5 if case.init == "he" else (1.0 / d) ** 0.5
        with torch.no_grad():
            lin.weight.normal_(0.0, std)
            if lin.bias is not None:
                lin.bias.zero_()
        linears.append(lin)
        mods.append(lin)
        if not last:
            if case.batch_norm:
                mods.append(nn.BatchNorm1d(h, eps=1e-5, momentum=0.1))
            mods.append(nn.ReLU())
        d = h
    net = nn.Sequential(*mods)
    opt = torch.optim.SGD(net.parameters(), lr=ETA_MIN)
    X = torch.from_numpy(splits.train.X)
    y = torch.from_numpy(splits.train.y)
    n = X.shape[0]
    steps_per_epoch = n // BATCH
    total = 2 * N_S * N_CYCLES
    gen = torch.Generator().manual_seed(seed)
    net.train()
    order = torch.empty(0, dtype=torch.int64)
    for step in range(total):
        pos = step % steps_per_epoch
        if pos == 0:
            order = torch.randperm(n, generator=gen)  # the last n % BATCH are dropped
        idx = order[pos * BATCH : (pos + 1) * BATCH]
        for group in opt.param_groups:
            group["lr"] = lr_at(step)
        scores = net(X[idx])
        loss = nn.functional.cross_entropy(scores, y[idx])
        loss = loss + case.l2_lambda * sum((lin.weight**2).sum() for lin in linears)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    net.eval()
    with torch.no_grad():
        pred = net(torch.from_numpy(splits.test.X)).argmax(dim=1).numpy()
    return 100.0 * float(np.mean(pred == splits.test.y))


def _summary(values: list[float]) -> str:
    if not values:
        return "-"
    std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
    return f"{np.mean(values):.2f} +- {std:.2f} (n={len(values)})"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.torch_reference", description=__doc__)
    p.add_argument("--data-dir", default=str(DEFAULT_DATA_DIR), help="cifar-10-batches-py")
    p.add_argument("--seeds-ours", type=int, default=5)
    p.add_argument("--seeds-torch", type=int, default=10)
    args = p.parse_args(argv)

    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        torch.set_num_threads(2)

    splits = load("cifar10", args.data_dir, split="all", n_val=1017)
    print(
        f"CIFAR-10 subset {args.data_dir}: {splits.train.n} train / {splits.val.n} val / "
        f"{splits.test.n} test; batch {BATCH}, cyclical eta {ETA_MIN:g}..{ETA_MAX:g}, "
        f"n_s {N_S}, {N_CYCLES} cycles; test accuracy in %, mean +- sample std over seeds"
    )
    print(f"torch {torch.__version__}" if torch is not None else "torch: absent (ours only)")
    print()
    header = (
        f"{'config':<26} {'ours':>22} {'torch (this run)':>22} {'ours - torch':>12} "
        f"{'earlier torch run':>18}"
    )
    print(header)
    print("-" * len(header))
    t0 = time.perf_counter()
    for case in CASES:
        ours = [run_ours(splits, case, s) for s in range(args.seeds_ours)]
        ref: list[float] = []
        if torch is not None:
            ref = [run_torch(torch, splits, case, s) for s in range(args.seeds_torch)]
        diff = f"{np.mean(ours) - np.mean(ref):+.2f}" if ref else "-"
        print(
            f"{case.name:<26} {_summary(ours):>22} {_summary(ref):>22} {diff:>12} "
            f"{case.earlier:>18}",
            flush=True,
        )
    print(f"\n({time.perf_counter() - t0:.0f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
