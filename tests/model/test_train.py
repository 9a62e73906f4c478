import json

import numpy as np
import pytest

from model.data import Dataset, Splits
from model.network import Network
from model.optim import init_velocity, sgd_step
from model.schedules import Constant, Cyclical, StepDecay
from model.train import METRICS, TrainConfig, TrainingDiverged, fit, main


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
    # a batch larger than the training set: one line with the split's sizes, no traceback
    assert main(["--dataset", "digits", "--schedule", "step", "--batch-size", "2000"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: batch_size=2000 is larger than the training set (1197)")
    assert "300 of the 1497 images are held out for validation; fewer: --n-val" in err


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
        ({"train_metrics": "exact"}, "train_metrics must be one of"),
        ({"train_metrics": 1}, "train_metrics must be a string"),
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


# ------------------------------------------------------------ training metrics


@pytest.mark.parametrize("bn,rho", [(False, 0.0), (True, 0.9)])
def test_running_metrics_are_the_mean_over_the_batches_since_the_last_point(tiny_splits, bn, rho):
    """Each point's running loss and accuracy are those of the batches trained on since the
    previous point, computed apart by the reference pass (``Network.loss``, ``forward``)
    on a twin network stepped alongside; points fall mid-epoch and the last window is
    short (30 steps, a point every 7)."""
    cfg = TrainConfig(
        schedule="constant",
        eta=0.05,
        n_epochs=3,
        batch_size=30,
        eval_every=7,
        l2_lambda=0.01,
        rho=rho,
        seed=3,
    )
    h = fit(Network(20, [16, 8], 3, batch_norm=bn, seed=5), tiny_splits, cfg)
    twin = Network(20, [16, 8], 3, batch_norm=bn, seed=5)
    velocity = init_velocity(twin) if rho else None
    X, y = tiny_splits.train.X, tiny_splits.train.y
    rng = np.random.default_rng(cfg.seed)
    losses: list[float] = []
    correct: list[int] = []
    expected = []
    for step in range(30):
        if step % 10 == 0:
            order = rng.permutation(300)
        idx = order[(step % 10) * 30 : (step % 10 + 1) * 30]
        Xb, yb = X[idx], y[idx]
        losses.append(twin.loss(Xb, yb, train=True)[0])
        correct.append(int(np.sum(twin.forward(Xb, train=True)[0].argmax(axis=1) == yb)))
        sgd_step(twin, Xb, yb, eta=0.05, l2_lambda=0.01, rho=rho, velocity=velocity)
        if (step + 1) % 7 == 0 or step + 1 == 30:
            loss = float(np.mean(losses))
            l2 = sum(np.sum(np.square(twin.params[f"W{l}"], dtype=np.float64)) for l in (1, 2, 3))
            cost = loss + 0.01 * float(l2)
            expected.append((step + 1, loss, cost, sum(correct) / (30 * len(correct))))
            losses, correct = [], []
    assert h.step == [s for s, *_ in expected] == [7, 14, 21, 28, 30]
    np.testing.assert_allclose(h.metrics["train_loss"], [e[1] for e in expected], rtol=1e-5)
    np.testing.assert_allclose(h.metrics["train_cost"], [e[2] for e in expected], rtol=1e-5)
    # The same scores in float32, summed in another order: a tie could flip one sample.
    np.testing.assert_allclose(h.metrics["train_acc"], [e[3] for e in expected], atol=1 / 210)
    # The weights trained alike: validation at the last point is the twin's.
    val = twin.evaluate(tiny_splits.val.X, tiny_splits.val.y, l2_lambda=0.01)
    assert h.metrics["val_acc"][-1] == val["accuracy"]
    assert h.metrics["val_loss"][-1] == pytest.approx(val["loss"], rel=1e-5)


def test_running_metrics_match_a_full_evaluation_when_the_weights_stand_still(tiny_splits):
    """With a learning rate too small to move float32 weights and no batch norm (training
    and evaluation mode agree), a point each epoch sees every training sample once, so the
    running accuracy is the full evaluation's and the running loss its loss."""

    def run(train_metrics: str) -> dict[str, list[float]]:
        cfg = TrainConfig(
            schedule="constant",
            eta=1e-30,
            n_epochs=3,
            batch_size=30,
            l2_lambda=0.1,
            train_metrics=train_metrics,
        )
        return fit(Network(20, [16], 3, seed=2), tiny_splits, cfg).metrics

    running, full = run("running"), run("full")
    assert running["train_acc"] == full["train_acc"] and len(full["train_acc"]) == 3
    np.testing.assert_allclose(running["train_loss"], full["train_loss"], rtol=1e-5)
    np.testing.assert_allclose(running["train_cost"], full["train_cost"], rtol=1e-5)
    for m in ("val_loss", "val_cost", "val_acc"):
        assert running[m] == full[m]


def test_full_train_metrics_evaluate_the_first_train_eval_size_samples(tiny_splits):
    net = Network(20, [16], 3, batch_norm=True, seed=0)
    cfg = TrainConfig(batch_size=30, n_cycles=1, train_metrics="full", train_eval_size=50)
    h = fit(net, tiny_splits, cfg)
    # The last point is the end of training: the network as fit left it, in evaluation mode.
    X, y = tiny_splits.train.X, tiny_splits.train.y
    tr = net.evaluate(X[:50], y[:50], l2_lambda=cfg.l2_lambda)
    assert h.final["train_acc"] == tr["accuracy"] and h.final["train_loss"] == tr["loss"]
    assert net.evaluate(X, y)["loss"] != tr["loss"]


def test_every_point_reports_validation_and_every_curve_either_way(tiny_splits):
    """The pruner's value (val_acc) at every point, and the same curves, running or full;
    how the training curve is measured changes nothing else: the networks train alike."""
    histories = {}
    for train_metrics in ("running", "full"):
        seen = []
        cfg = TrainConfig(
            batch_size=30, n_cycles=2, evals_per_cycle=4, train_metrics=train_metrics, rho=0.5
        )
        net = Network(20, [8, 8], 3, batch_norm=True, seed=0)
        h = fit(net, tiny_splits, cfg, on_evaluate=lambda s, m, seen=seen: seen.append((s, m)))
        assert [s for s, _ in seen] == h.step == list(range(10, 81, 10))
        assert all(set(m) == set(METRICS) for _, m in seen)
        assert [m["val_acc"] for _, m in seen] == h.metrics["val_acc"]
        assert set(h.to_dict()) == {"step", "epoch", "eta", "wall_time", "epochs_run", *METRICS}
        histories[train_metrics] = h
    running, full = histories["running"].metrics, histories["full"].metrics
    for m in ("val_loss", "val_cost", "val_acc"):
        assert running[m] == full[m]
    assert running["train_loss"] != full["train_loss"]


def test_fit_refuses_data_with_more_classes_than_the_network():
    from model.data import load
    from model.errors import SettingError
    from model.network import Network

    splits = load("digits")
    net = Network(splits.train.d, [10], 5, seed=0)
    with pytest.raises(SettingError, match=r"training labels must be classes 0..4 .*got 9"):
        fit(net, splits, TrainConfig(n_cycles=1))


def test_cli_takes_n_val_as_a_fraction_as_the_study_files_do(tmp_path, capsys):
    assert main(["--n-val", "0.1", "--cycles", "1", "--quiet", "--out", str(tmp_path)]) == 0
    assert "1317 train / 180 val" in capsys.readouterr().out  # a tenth of the 1,497
    with pytest.raises(SystemExit):
        main(["--n-val", "1.5"])
    assert "a fraction in (0, 1)" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, words",
    [
        (["--sigma", "0.1"], "--sigma is used with --init sigma only"),
        (["--dataset", "cifar10", "--n-val", "100"], "--n-val applies to --split all"),
    ],
)
def test_cli_refuses_flags_it_would_ignore(args, words, capsys):
    with pytest.raises(SystemExit) as exc:
        main(args)
    assert exc.value.code == 2 and words in capsys.readouterr().err


def test_messages_name_settings_as_the_user_writes_them(capsys):
    assert main(["--schedule", "step", "--epochs", "0"]) == 2
    assert "n_epochs must be >= 1, got n_epochs=0" in capsys.readouterr().err  # not self.
    from model.data import load
    from model.errors import SettingError

    with pytest.raises(SettingError, match="got n_val=0; hold out at least one image"):
        load("digits", n_val=0)
    with pytest.raises(SettingError, match="hold out fewer images"):
        load("digits", n_val=5000)
