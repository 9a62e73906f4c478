import numpy as np
import pytest

from model import layers
from model.gradcheck import check_network, format_table
from model.gradcheck import main as gradcheck_main
from model.network import Network
from model.optim import sgd_step

HIDDEN = {2: [50], 3: [50, 50], 4: [50, 30, 20], 9: [20, 15, 10, 10, 10, 10, 10, 10]}


@pytest.mark.parametrize("k", sorted(HIDDEN))
@pytest.mark.parametrize("bn", [False, True])
def test_gradients_match_numerical(k, bn):
    errors = check_network(HIDDEN[k], batch_norm=bn, l2_lambda=0.01)
    # Every parameter is checked: W everywhere, b without BN or on the last layer.
    assert f"W{k}" in errors and f"b{k}" in errors
    assert ("gamma1" in errors) == bn
    assert max(errors.values()) < 1e-6, format_table(errors)


def test_gradcheck_detects_a_wrong_gradient(monkeypatch):
    real = layers.relu_backward
    monkeypatch.setattr(layers, "relu_backward", lambda dH, c, inplace=False: real(dH, c) * 1.01)
    assert max(check_network([20], batch_norm=False).values()) > 1e-3


def test_gradcheck_cli_prints_table(capsys):
    assert gradcheck_main(["--hidden", "10,10", "--bn"]) == 0
    out = capsys.readouterr().out
    assert "gamma" in out and "max relative error" in out


def test_cost_is_loss_plus_l2_on_weights_only(rng):
    net = Network(5, [4], 3, batch_norm=True, dtype=np.float64, seed=rng)
    X, y = rng.standard_normal((8, 5)), rng.integers(0, 3, 8)
    loss, cost, _ = net.loss(X, y, l2_lambda=0.5)
    w2 = sum((net.params[k] ** 2).sum() for k in net.params if k.startswith("W"))
    assert cost == pytest.approx(loss + 0.5 * w2)
    assert "b1" not in net.params and "b2" in net.params  # BN layers carry no bias


def test_init_schemes_set_weight_scale():
    for init, sigma, std in (
        ("he", None, np.sqrt(2 / 1000)),
        ("xavier", None, np.sqrt(1 / 1000)),
        ("sigma", 1e-3, 1e-3),
    ):
        net = Network(1000, [200], 10, init=init, sigma=sigma, seed=0)
        assert net.params["W1"].std() == pytest.approx(std, rel=0.05)
    a, b = Network(30, [5], seed=7), Network(30, [5], seed=7)
    assert np.array_equal(a.params["W1"], b.params["W1"])
    assert Network(30, [5]).params["W1"].dtype == np.float32
    assert Network(30, [5], dtype=np.float64).params["W1"].dtype == np.float64


@pytest.mark.parametrize(
    "kwargs,word",
    [
        ({"init": "magic"}, "init"),
        ({"init": "sigma"}, "sigma"),
        ({"hidden": [0]}, "hidden"),
        ({"bn_alpha": 1.0}, "bn_alpha"),
        ({"dtype": np.int32}, "dtype"),
    ],
)
def test_bad_arguments_name_the_value(kwargs, word):
    args = {"d_in": 10, "hidden": [5], **kwargs}
    with pytest.raises(ValueError, match=word):
        Network(**args)


def test_running_stats_are_moving_averages(rng):
    net = Network(6, [4], 3, batch_norm=True, bn_alpha=0.9, dtype=np.float64, seed=rng)
    X1, X2 = rng.standard_normal((50, 6)), rng.standard_normal((50, 6)) + 3
    y = rng.integers(0, 3, 50)
    sgd_step(net, X1, y, eta=0.0)
    mu1 = (X1 @ net.params["W1"]).mean(0)
    assert np.allclose(net.bn_state["mean1"], mu1)  # first update takes the batch stats
    sgd_step(net, X2, y, eta=0.0)
    mu2 = (X2 @ net.params["W1"]).mean(0)
    assert np.allclose(net.bn_state["mean1"], 0.9 * mu1 + 0.1 * mu2)
    # Evaluation uses the running averages, not the batch: one sample gives finite scores.
    assert np.isfinite(net.predict_scores(X1[:1])).all()


def test_save_and_load_roundtrip(tmp_path, rng):
    net = Network(6, [4, 3], 3, batch_norm=True, seed=rng)
    X, y = rng.standard_normal((20, 6)).astype(np.float32), rng.integers(0, 3, 20)
    sgd_step(net, X, y, eta=0.1, l2_lambda=0.1)
    path = net.save(tmp_path / "n.npz", config={"l2_lambda": 0.1})
    net2, config = Network.load(path)
    assert config == {"l2_lambda": 0.1}
    assert np.array_equal(net.predict_scores(X), net2.predict_scores(X))
    (tmp_path / "bad.npz").write_bytes(b"junk")
    with pytest.raises(ValueError, match="bad.npz"):
        Network.load(tmp_path / "bad.npz")


def test_softmax_is_stable_for_huge_scores():
    loss, d = layers.softmax_cross_entropy(np.array([[1e4, 0.0, -1e4]]), np.array([2]))
    assert np.isfinite(loss) and loss == pytest.approx(2e4)
    assert d is not None and np.isfinite(d).all()
    np.testing.assert_allclose(d, [[1.0, 0.0, -1.0]])


@pytest.mark.parametrize("hidden,bn", [([], False), ([7], False), ([9, 6, 5], True)])
def test_train_gradients_are_the_scaled_gradients_of_the_loss(rng, hidden, bn):
    """The training pass (kept buffers, flat gradients, W1's left as X^T dS1) against
    ``Network.loss``, the reference pass, in float64."""
    net = Network(12, hidden, 4, batch_norm=bn, dtype=np.float64, seed=2)
    X, y = rng.standard_normal((16, 12)), rng.integers(0, 4, 16)
    loss_ref, _, grads = net.loss(X, y)
    correct_ref = int(np.count_nonzero(net.forward(X, train=True)[0].argmax(axis=1) == y))
    loss, n_correct, dS1 = net.train_gradients(X, y, grad_scale=0.3)
    assert loss == pytest.approx(loss_ref, rel=1e-12)
    assert n_correct == correct_ref
    np.testing.assert_allclose(X.T @ dS1, 0.3 * grads["dW1"], rtol=0, atol=1e-12)
    for key in net.params:
        if key != "W1":
            np.testing.assert_allclose(
                net._grad_views[key], 0.3 * grads["d" + key], rtol=0, atol=1e-12, err_msg=key
            )
    # The pass reuses its arrays: the next batch's dS1 is written over this one.
    assert net.train_gradients(X[::-1].copy(), y[::-1].copy(), grad_scale=0.3)[2] is dS1
    if bn:
        # Its batch statistics fold into bn_state as those of the reference pass do.
        ref = Network(12, hidden, 4, batch_norm=bn, dtype=np.float64, seed=2)
        ref.update_running_stats(ref.forward(X[::-1], train=True)[1])
        net.fold_batch_stats()
        for key in ref.bn_state:
            np.testing.assert_allclose(net.bn_state[key], ref.bn_state[key], atol=1e-12)


@pytest.mark.parametrize("bn", [False, True])
def test_evaluation_in_chunks_is_one_forward_pass_in_evaluation_mode(rng, bn):
    """Chunks of rows (the last one short) give the scores, loss and accuracy of one
    reference pass over every row, batch norm on its running statistics."""
    net = Network(12, [9, 6], 4, batch_norm=bn, dtype=np.float64, seed=4)
    X, y = rng.standard_normal((23, 12)), rng.integers(0, 4, 23)
    sgd_step(net, X[:10], y[:10], eta=0.1)  # running statistics that are not the batch's
    scores = net.forward(X, train=False)[0]
    np.testing.assert_allclose(net.predict_scores(X, chunk=5), scores, rtol=1e-12)
    result = net.evaluate(X, y, l2_lambda=0.1)
    assert result["accuracy"] == np.mean(scores.argmax(axis=1) == y)
    shifted = scores - scores.max(axis=1, keepdims=True)
    loss = -np.mean(shifted[np.arange(23), y] - np.log(np.exp(shifted).sum(axis=1)))
    assert result["loss"] == pytest.approx(loss, rel=1e-12)
    assert result["cost"] == pytest.approx(loss + 0.1 * net.l2_penalty(), rel=1e-12)


def test_labels_outside_the_networks_classes_are_refused():
    """The loss reads the score at each label: a label >= n_classes read a neighbour row's
    score and returned a wrong loss without a word."""
    from model.errors import SettingError

    net = Network(4, [5], 3, seed=0)
    X = np.zeros((3, 4))
    with pytest.raises(SettingError, match=r"labels must be classes 0..2 .*got 11"):
        net.evaluate(X, np.array([0, 11, 2]))
    with pytest.raises(SettingError, match="got -1"):
        net.evaluate(X, np.array([0, -1, 2]))
    assert 0.0 <= net.evaluate(X, np.array([0, 1, 2]))["accuracy"] <= 1.0


@pytest.mark.parametrize(
    "args, words",
    [
        (["--hidden", "0"], "hidden sizes must all be >= 1"),
        (["--d-in", "0"], "d_in must be >= 1"),
        (["--samples", "0"], "--samples must be >= 1"),
        (["--samples", "1", "--bn"], "--samples must be >= 2 with --bn"),
        (["--lambda", "-1"], "--lambda must be >= 0"),
    ],
)
def test_gradcheck_refuses_what_it_cannot_check_in_one_line(args, words, capsys):
    with pytest.raises(SystemExit) as exc:
        gradcheck_main(args)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert words in err and "Traceback" not in err
