import json

import numpy as np
import pytest

from model.data import Dataset, Splits
from model.network import Network
from model.schedules import Constant, Cyclical, StepDecay
from model.train import TrainConfig, TrainingDiverged, fit, main


def test_cyclical_schedule_is_triangular():
    s = Cyclical(1e-5, 1e-1, 10)
    assert s.lr_at(0) == pytest.approx(1e-5)
    assert s.lr_at(10) == pytest.approx(1e-1)
    assert s.lr_at(5) == pytest.approx((1e-5 + 1e-1) / 2)
    assert s.lr_at(20) == pytest.approx(1e-5) and s.lr_at(30) == pytest.approx(1e-1)
    assert StepDecay(0.1, 0.5, 10).lr_at(25) == pytest.approx(0.025)
    assert Constant(0.3).lr_at(99) == 0.3
    with pytest.raises(ValueError, match="eta_max"):
        Cyclical(1e-1, 1e-2, 10)


def test_config_validation_names_the_field():
    with pytest.raises(ValueError, match="l2_lambda"):
        TrainConfig(l2_lambda=-1)
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="cosine")
    with pytest.raises(ValueError, match="unknown TrainConfig fields"):
        TrainConfig.from_dict({"lamda": 1})
    c = TrainConfig(batch_size=100, n_cycles=2)
    assert (
        c.resolved_n_s(4068) == 80 and c.total_steps(4068) == 320 and c.eval_interval(4068) == 16
    )


def test_fit_learns_and_reports_every_evaluation(tiny_splits):
    net = Network(20, [16], 3, seed=0)
    seen = []
    cfg = TrainConfig(batch_size=30, eta_min=1e-3, eta_max=0.2, n_cycles=2, evals_per_cycle=4)
    h = fit(net, tiny_splits, cfg, on_evaluate=lambda s, m: seen.append((s, m["val_acc"])))
    assert len(h) == 8 and [s for s, _ in seen] == h.step
    assert h.metrics["val_acc"][-1] > 0.9
    assert h.metrics["train_loss"][-1] < h.metrics["train_loss"][0]
    assert all(
        c >= l for c, l in zip(h.metrics["train_cost"], h.metrics["train_loss"], strict=True)
    )
    assert h.epochs_run == pytest.approx(cfg.total_steps(300) / 10)


def test_fit_is_reproducible(tiny_splits):
    cfg = TrainConfig(
        batch_size=30, n_cycles=1, rho=0.9, schedule="step", eta=0.01, decay=0.9, n_epochs=3
    )
    a = fit(Network(20, [8], 3, seed=1), tiny_splits, cfg)
    b = fit(Network(20, [8], 3, seed=1), tiny_splits, cfg)
    assert a.metrics == b.metrics and len(a) == 3


def test_divergence_raises_with_step_and_eta(tiny_splits):
    net = Network(20, [16], 3, init="sigma", sigma=10.0, seed=0)
    cfg = TrainConfig(schedule="constant", eta=1e6, batch_size=30)
    with pytest.raises(TrainingDiverged) as info:
        fit(net, tiny_splits, cfg)
    assert info.value.eta == 1e6 and info.value.step >= 0
    assert "diverged" in str(info.value)


def test_callback_can_stop_training(tiny_splits):
    class Stop(Exception):
        pass

    def cb(step, m):
        raise Stop

    with pytest.raises(Stop):
        fit(Network(20, [8], 3), tiny_splits, TrainConfig(batch_size=30), on_evaluate=cb)


def test_overfits_100_images(cifar_dir):
    from model.data import load

    s = load("cifar10", cifar_dir)
    small = Splits(Dataset(s.train.X[:100], s.train.y[:100]), s.val, s.test)
    net = Network(small.train.d, [50], 10, init="xavier", seed=0)
    cfg = TrainConfig(schedule="constant", eta=0.05, n_epochs=200, batch_size=10, eval_every=500)
    h = fit(net, small, cfg)
    assert h.metrics["train_acc"][-1] > 0.95
    assert h.metrics["train_loss"][-1] < 0.1


def test_cli_trains_and_writes_curves(tmp_path, capsys):
    rc = main(
        [
            "--dataset",
            "digits",
            "--hidden",
            "20",
            "--cycles",
            "1",
            "--quiet",
            "--out",
            str(tmp_path),
        ]
    )
    assert rc == 0
    out = capsys.readouterr().out
    assert "test accuracy" in out
    acc = float(out.split("test accuracy")[1].split()[0])
    assert acc > 0.7
    hist = json.loads((tmp_path / "history.json").read_text())
    assert hist["step"][-1] == 44 and len(hist["val_acc"]) == len(hist["step"]) >= 10


def test_cli_reports_bad_values(capsys):
    assert main(["--dataset", "digits", "--eta-min", "1", "--eta-max", "0.1"]) == 2
    assert "eta_max" in capsys.readouterr().err


def test_two_layer_cifar_subset_matches_reference_accuracy(cifar_dir):
    """DD2424 setting on the real subset: an independent PyTorch run gets 41.3% +- 0.8."""
    from model.data import load

    s = load("cifar10", cifar_dir, split="all", n_val=1017)
    assert s.train.n == 4068
    accs = []
    for seed in (0, 1):
        net = Network(3072, [50], 10, init="xavier", seed=seed)
        cfg = TrainConfig(l2_lambda=1e-4, eta_min=1e-5, eta_max=1e-1, n_s=80, seed=seed)
        fit(net, s, cfg)
        accs.append(net.evaluate(s.test.X, s.test.y)["accuracy"])
    assert 0.385 < float(np.mean(accs)) < 0.44, accs


@pytest.mark.parametrize("rho", [0.0, 0.9])
@pytest.mark.parametrize("bn", [False, True])
def test_fit_takes_the_textbook_step(tiny_splits, rho, bn):
    """The fused update (eta folded into dscores, L2 as weight decay) is plain SGD on the cost."""
    as64 = Splits(
        *(
            Dataset(d.X.astype(np.float64), d.y, n_classes=3)
            for d in (tiny_splits.train, tiny_splits.val, tiny_splits.test)
        )
    )
    X, y = as64.train.X, as64.train.y
    lam, eta = 0.05, 0.1
    cfg = TrainConfig(
        schedule="constant", eta=eta, n_epochs=3, batch_size=300, l2_lambda=lam, rho=rho
    )
    net = Network(20, [16, 8], 3, batch_norm=bn, dtype=np.float64, seed=3)
    ref = Network(20, [16, 8], 3, batch_norm=bn, dtype=np.float64, seed=3)
    fit(net, as64, cfg)
    # One batch of all 300 samples per epoch: the shuffle changes nothing in the step.
    v = {k: np.zeros_like(P) for k, P in ref.params.items()}
    for _ in range(3):
        _, _, grads = ref.loss(X, y, l2_lambda=lam)
        for k, P in ref.params.items():
            v[k] = rho * v[k] - eta * grads["d" + k]
            P += v[k]
    for k in ref.params:
        np.testing.assert_allclose(net.params[k], ref.params[k], rtol=1e-10, atol=1e-12)


def test_fit_limits_blas_threads_and_can_leave_them(tiny_splits):
    from threadpoolctl import threadpool_info

    def blas_threads():
        return {i["num_threads"] for i in threadpool_info() if i["user_api"] == "blas"}

    cfg = TrainConfig(batch_size=30, n_cycles=1, evals_per_cycle=1)
    seen: list[set[int]] = []
    fit(
        Network(20, [8], 3), tiny_splits, cfg, on_evaluate=lambda s, m: seen.append(blas_threads())
    )
    assert seen == [{1}]
    outside = blas_threads()
    fit(
        Network(20, [8], 3),
        tiny_splits,
        cfg,
        on_evaluate=lambda s, m: seen.append(blas_threads()),
        blas_threads=None,
    )
    assert seen[1] == outside and blas_threads() == outside
    with pytest.raises(ValueError, match="blas_threads"):
        fit(Network(20, [8], 3), tiny_splits, cfg, blas_threads=0)


@pytest.mark.parametrize(
    "values,words",
    [
        ({"batch_size": 50.5}, "batch_size must be an integer"),
        ({"n_cycles": 1.5}, "n_cycles must be an integer"),
        ({"n_s": float("nan")}, "n_s must be an integer"),
        ({"batch_size": True}, "batch_size must be an integer"),
        ({"train_eval_size": 0}, "train_eval_size must be >= 1"),
        ({"eta_min": float("nan")}, "eta_min must be a finite number"),
        ({"l2_lambda": float("inf")}, "l2_lambda must be a finite number"),
        ({"rho": "0.9"}, "rho must be a number"),
        ({"seed": -1}, "seed must be >= 0"),
    ],
)
def test_config_fields_have_their_types(values, words):
    with pytest.raises(ValueError, match=words):
        TrainConfig(**values)
    assert TrainConfig(n_s=np.int64(5), eta_max=np.float32(0.5)).n_s == 5  # NumPy numbers pass
