"""Tests of model.data: loaders, restricted unpickling, splits and normalisation."""

from __future__ import annotations

import codecs
import gzip
import os
import pickle
import struct
from pathlib import Path

import numpy as np
import pytest

from model.data import (
    DATASETS,
    DataError,
    Dataset,
    Splits,
    load,
    load_cifar10,
    load_cifar10_batch,
    load_cifar10_mat_batch,
    load_digits,
    load_fashion_mnist,
    normalise,
)

REPO_ROOT = Path(__file__).resolve().parents[2]
CIFAR_DIR = REPO_ROOT.parent / "shared" / "data" / "cifar-10-batches-py"
FASHION_DIR = Path("/usr/share/datasets/fashion-mnist")
CIFAR_NAMES = (
    "airplane", "automobile", "bird", "cat", "deer",
    "dog", "frog", "horse", "ship", "truck",
)  # fmt: skip


def _require(path: Path, what: str) -> Path:
    """Skip when test data is absent on a user's machine; fail in CI, which must have it."""
    if path.is_dir():
        return path
    reason = f"{what} not found at {path}"
    if os.environ.get("CI") == "true":
        pytest.fail(f"{reason}; CI must provide it")
    pytest.skip(f"{reason} (it lives outside the repository)")


@pytest.fixture(scope="module")
def cifar_dir() -> Path:
    return _require(CIFAR_DIR, "the CIFAR-10 subset (../shared/data/cifar-10-batches-py)")


# --------------------------------------------------------------------------- synthetic CIFAR


def _batch(n: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    data = rng.integers(0, 256, size=(n, 3072), dtype=np.uint8)
    labels = rng.integers(0, 10, size=n).astype(np.int64)
    return data, labels


def _write_pickle_batch(path: Path, data: object, labels: object) -> None:
    batch = {b"batch_label": b"synthetic", b"labels": labels, b"data": data, b"filenames": []}
    path.write_bytes(pickle.dumps(batch, protocol=2))


def _write_mat_batch(path: Path, data: np.ndarray, labels: np.ndarray) -> None:
    from scipy.io import savemat

    # Like the official cifar-10-batches-mat: labels an (N, 1) uint8 column.
    savemat(path, {"data": data, "labels": labels.reshape(-1, 1).astype(np.uint8)})


SIZES = {"data_batch_1": 7, "data_batch_2": 5, "data_batch_3": 6, "data_batch_4": 4,
         "data_batch_5": 8, "test_batch": 3}  # fmt: skip


def _make_cifar_dir(root: Path, fmt: str) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Six small batches and a batches.meta in the python ("py") or MATLAB ("mat") layout."""
    root.mkdir(parents=True, exist_ok=True)
    batches = {name: _batch(n, seed) for seed, (name, n) in enumerate(SIZES.items())}
    for name, (data, labels) in batches.items():
        if fmt == "py":
            _write_pickle_batch(root / name, data, labels.tolist())
        else:
            _write_mat_batch(root / f"{name}.mat", data, labels)
    if fmt == "py":
        meta = {b"num_cases_per_batch": 10000, b"label_names": [n.encode() for n in CIFAR_NAMES]}
        (root / "batches.meta").write_bytes(pickle.dumps(meta, protocol=2))
    else:
        from scipy.io import savemat

        savemat(root / "batches.meta.mat", {"label_names": np.array(CIFAR_NAMES, dtype=object)})
    return batches


@pytest.fixture(params=["py", "mat"])
def synthetic_cifar(request, tmp_path):
    root = tmp_path / f"cifar-{request.param}"
    return root, _make_cifar_dir(root, request.param)


# --------------------------------------------------------------------------- Dataset


def test_dataset_properties_and_validation():
    ds = Dataset(np.zeros((4, 3), np.float32), np.array([0, 1, 2, 9]))
    assert (ds.n, ds.d, ds.n_classes) == (4, 3, 10)
    with pytest.raises(ValueError, match="2-D"):
        Dataset(np.zeros(4, np.float32), np.zeros(4, np.int64))
    with pytest.raises(ValueError, match="1-D"):
        Dataset(np.zeros((4, 3), np.float32), np.zeros((4, 1), np.int64))
    with pytest.raises(ValueError, match="4 rows but y has 3"):
        Dataset(np.zeros((4, 3), np.float32), np.zeros(3, np.int64))
    with pytest.raises(ValueError, match="label 10 "):
        Dataset(np.zeros((2, 3), np.float32), np.array([0, 10]))
    with pytest.raises(ValueError, match="label -1 "):
        Dataset(np.zeros((2, 3), np.float32), np.array([-1, 0]))
    with pytest.raises(ValueError, match="label_names has 2 names for 10 classes"):
        Dataset(np.zeros((2, 3), np.float32), np.array([0, 1]), label_names=("a", "b"))


# --------------------------------------------------------------------------- real CIFAR-10


def test_real_batch1_shapes_dtype_range_and_names(cifar_dir):
    splits = load_cifar10(cifar_dir)
    for ds in (splits.train, splits.val, splits.test):
        assert ds.X.shape == (1017, 3072)
        assert ds.X.dtype == np.float32 and ds.X.flags.c_contiguous
        assert ds.y.shape == (1017,) and ds.y.dtype == np.int64
        assert 0.0 <= ds.X.min() and ds.X.max() <= 1.0
        assert set(np.unique(ds.y)) == set(range(10))
        assert ds.label_names == CIFAR_NAMES
    # batch1 split: val is data_batch_2, not a slice of data_batch_1.
    assert not np.array_equal(splits.train.X, splits.val.X)
    # The exact scaling: pixel / 255 of the raw uint8 batch.
    with open(cifar_dir / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="bytes")  # trusted fixture file, compared against
    np.testing.assert_array_equal(splits.train.X, raw[b"data"].astype(np.float32) / 255)
    np.testing.assert_array_equal(splits.train.y, raw[b"labels"])


def test_real_all_split_views_one_array(cifar_dir):
    splits = load_cifar10(cifar_dir, split="all", n_val=1000)
    assert (splits.train.n, splits.val.n, splits.test.n) == (4085, 1000, 1017)
    base = splits.train.X.base
    assert base is not None and base.shape == (5085, 3072)
    assert np.shares_memory(splits.val.X, base)
    assert not np.shares_memory(splits.val.X, splits.train.X)
    # The last 1000 images are the end of data_batch_5.
    batch5 = load_cifar10_batch(cifar_dir / "data_batch_5")
    np.testing.assert_array_equal(splits.val.X, batch5.X[-1000:])
    np.testing.assert_array_equal(splits.val.y, batch5.y[-1000:])


def test_real_normalise_uses_train_stats_only(cifar_dir):
    splits = load_cifar10(cifar_dir, split="all", n_val=1000)
    train_raw = splits.train.X.astype(np.float64)
    val_raw = splits.val.X.astype(np.float64)
    mu, sd = train_raw.mean(axis=0), train_raw.std(axis=0)
    train_X = splits.train.X
    out = normalise(splits)
    assert out.train.X is train_X  # in place, no copy
    assert np.shares_memory(out.val.X, out.train.X.base)
    np.testing.assert_allclose(out.train.X.mean(axis=0), 0, atol=1e-4)
    np.testing.assert_allclose(out.train.X.std(axis=0), 1, atol=1e-3)
    np.testing.assert_allclose(out.val.X, (val_raw - mu) / sd, atol=1e-4)
    assert np.abs(out.val.X.mean(axis=0)).max() > 1e-2  # val stats were not used


def test_real_mat_batch_equals_pickle_batch(cifar_dir, tmp_path):
    from scipy.io import savemat

    pickled = load_cifar10_batch(cifar_dir / "data_batch_1")
    with open(cifar_dir / "data_batch_1", "rb") as f:
        raw = pickle.load(f, encoding="bytes")  # trusted fixture file
    labels = np.asarray(raw[b"labels"], dtype=np.uint8).reshape(-1, 1)
    savemat(tmp_path / "data_batch_1.mat", {"data": raw[b"data"], "labels": labels})
    from_mat = load_cifar10_mat_batch(tmp_path / "data_batch_1.mat")
    np.testing.assert_array_equal(from_mat.X, pickled.X)
    np.testing.assert_array_equal(from_mat.y, pickled.y)


# --------------------------------------------------------------------------- synthetic CIFAR-10


def test_pickle_and_mat_directories_load_identically(tmp_path):
    batches = _make_cifar_dir(tmp_path / "py", "py")
    _make_cifar_dir(tmp_path / "mat", "mat")
    for split in ("batch1", "all"):
        a = load_cifar10(tmp_path / "py", split=split, n_val=3)
        b = load_cifar10(tmp_path / "mat", split=split, n_val=3)
        for x, y in zip((a.train, a.val, a.test), (b.train, b.val, b.test), strict=True):
            np.testing.assert_array_equal(x.X, y.X)
            np.testing.assert_array_equal(x.y, y.y)
            assert x.label_names == y.label_names == CIFAR_NAMES
    data, labels = batches["data_batch_1"]
    single = load_cifar10_mat_batch(tmp_path / "mat" / "data_batch_1.mat")
    np.testing.assert_array_equal(single.X, data.astype(np.float32) / 255)
    np.testing.assert_array_equal(single.y, labels)


def test_synthetic_splits_follow_the_batches(synthetic_cifar):
    root, batches = synthetic_cifar
    one = load_cifar10(root)
    np.testing.assert_array_equal(one.val.y, batches["data_batch_2"][1])
    np.testing.assert_array_equal(one.test.X, batches["test_batch"][0] / np.float32(255))
    every = load_cifar10(root, split="all", n_val=10)
    all_data = np.concatenate([batches[f"data_batch_{i}"][0] for i in range(1, 6)])
    all_labels = np.concatenate([batches[f"data_batch_{i}"][1] for i in range(1, 6)])
    assert (every.train.n, every.val.n) == (20, 10)
    assert every.train.X.base is not None and every.train.X.base.shape == (30, 3072)
    assert np.shares_memory(every.val.X, every.train.X.base)
    np.testing.assert_array_equal(every.val.X, all_data[-10:] / np.float32(255))
    np.testing.assert_array_equal(every.train.y, all_labels[:-10])


def test_dtype_is_honoured(tmp_path):
    _make_cifar_dir(tmp_path, "py")
    f64 = load_cifar10(tmp_path, split="all", n_val=3, dtype=np.float64)
    f32 = load_cifar10(tmp_path, split="all", n_val=3)
    assert f64.train.X.dtype == f64.val.X.dtype == f64.test.X.dtype == np.float64
    np.testing.assert_allclose(f64.train.X, f32.train.X, rtol=1e-6)
    with pytest.raises(ValueError, match="floating"):
        load_cifar10(tmp_path, dtype=np.int32)


@pytest.mark.parametrize("n_val", [0, 30, -1])
def test_all_split_rejects_bad_n_val(tmp_path, n_val):
    _make_cifar_dir(tmp_path, "py")
    with pytest.raises(ValueError, match=rf"n_val.*30.*n_val={n_val}"):
        load_cifar10(tmp_path, split="all", n_val=n_val)


def test_unknown_split_lists_allowed(tmp_path):
    _make_cifar_dir(tmp_path, "py")
    with pytest.raises(ValueError, match="batch1, all"):
        load_cifar10(tmp_path, split="batch2")


class _Payload:
    """Pickles as a call of fn(arg): what a hostile 'batch' would contain."""

    def __init__(self, fn, arg):
        self.fn, self.arg = fn, arg

    def __reduce__(self):
        return (self.fn, (self.arg,))


@pytest.mark.parametrize("kind", ["os.system", "builtins.eval"])
def test_malicious_pickle_runs_nothing(tmp_path, kind):
    marker = tmp_path / "pwned"
    if kind == "os.system":
        payload = _Payload(os.system, f"touch {marker}")
        forbidden = f"{os.system.__module__}.system"  # posix.system on Linux
    else:
        payload = _Payload(eval, f"open({str(marker)!r}, 'w').close()")
        forbidden = "builtins.eval"
    path = tmp_path / "data_batch_1"
    _write_pickle_batch(path, payload, [0])
    with pytest.raises(DataError) as info:
        load_cifar10_batch(path)
    assert str(path) in str(info.value) and forbidden in str(info.value)
    assert not marker.exists()


def test_codecs_encode_only_latin1(tmp_path):
    # Python 3 protocol-2 pickles use _codecs.encode(text, "latin1") for bytes; any other
    # codec name is refused rather than looked up.
    path = tmp_path / "data_batch_1"
    path.write_bytes(
        pickle.dumps({b"data": _EncodeCall("abc", "rot13"), b"labels": [0]}, protocol=2)
    )
    with pytest.raises(DataError, match="rot13"):
        load_cifar10_batch(path)


class _EncodeCall:
    def __init__(self, text, encoding):
        self.text, self.encoding = text, encoding

    def __reduce__(self):
        return (codecs.encode, (self.text, self.encoding))


def test_truncated_pickle_names_file(tmp_path):
    data, labels = _batch(20, 0)
    full = tmp_path / "full"
    _write_pickle_batch(full, data, labels.tolist())
    path = tmp_path / "data_batch_1"
    path.write_bytes(full.read_bytes()[: full.stat().st_size // 2])
    with pytest.raises(DataError, match="truncated or corrupt") as info:
        load_cifar10_batch(path)
    assert str(path) in str(info.value)
    path.write_bytes(b"")
    with pytest.raises(DataError, match="data_batch_1"):
        load_cifar10_batch(path)


@pytest.mark.parametrize(
    ("data", "labels", "message"),
    [
        (np.zeros((3, 3072), np.uint8), [0, 1, 10], "label 10 is outside 0..9"),
        (np.zeros((3, 3072), np.uint8), [0, -1, 2], "label -1 is outside 0..9"),
        (np.zeros((3, 100), np.uint8), [0, 1, 2], r"shape \(N, 3072\), got \(3, 100\)"),
        (np.zeros((3, 3072), np.uint8), [0, 1], "3 images but 2 labels"),
        (np.zeros((3, 3072), np.float32), [0, 1, 2], "uint8"),
        (np.zeros((3, 3072), np.uint8), ["a", "b", "c"], "labels"),
    ],
)
def test_bad_batch_contents(tmp_path, data, labels, message):
    path = tmp_path / "data_batch_1"
    _write_pickle_batch(path, data, labels)
    with pytest.raises(DataError, match=message) as info:
        load_cifar10_batch(path)
    assert str(path) in str(info.value)


def test_missing_directory_and_files(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(DataError, match="cifar-10-python.tar.gz") as info:
        load_cifar10(missing)
    assert str(missing) in str(info.value)
    only_one = tmp_path / "partial"
    only_one.mkdir()
    _write_pickle_batch(only_one / "data_batch_1", *_batch(2, 0))
    with pytest.raises(DataError, match="missing data_batch_2, test_batch"):
        load_cifar10(only_one)
    with pytest.raises(DataError, match="data_batch_3"):
        load_cifar10(only_one, split="all")
    (tmp_path / "parent" / "cifar-10-batches-py").mkdir(parents=True)
    with pytest.raises(DataError, match="did you mean .*cifar-10-batches-py"):
        load_cifar10(tmp_path / "parent")
    with pytest.raises(DataError, match="not found"):
        load_cifar10_batch(tmp_path / "absent_batch")


# --------------------------------------------------------------------------- normalise


def _splits(train: np.ndarray, val: np.ndarray, test: np.ndarray) -> Splits:
    def ds(X):
        return Dataset(X, np.zeros(len(X), np.int64))

    return Splits(ds(train), ds(val), ds(test))


def test_normalise_constant_dims_and_train_stats():
    train = np.array([[1.0, 5.0], [3.0, 5.0]], np.float32)
    val = np.array([[2.0, 5.0], [5.0, 6.0]], np.float32)
    test = np.array([[1.0, 4.0]], np.float32)
    out = normalise(_splits(train, val, test))
    assert out.train.X is train and out.val.X is val  # in place
    np.testing.assert_array_equal(out.train.X, [[-1, 0], [1, 0]])
    np.testing.assert_array_equal(out.val.X, [[0, 0], [3, 1]])  # std 0 -> divided by 1
    np.testing.assert_array_equal(out.test.X, [[-1, -1]])
    assert out.train.X.dtype == np.float32


def test_normalise_read_only_and_shared_arrays():
    train = np.array([[0.0], [2.0]], np.float32)
    train.flags.writeable = False
    val = np.array([[4.0]], np.float32)
    out = normalise(_splits(train, val, val))  # val and test are the same array
    np.testing.assert_array_equal(train, [[0.0], [2.0]])  # read-only input untouched
    np.testing.assert_array_equal(out.train.X, [[-1.0], [1.0]])
    # Shared memory must not be normalised twice.
    np.testing.assert_array_equal(out.val.X, [[3.0]])
    np.testing.assert_array_equal(out.test.X, [[3.0]])


# --------------------------------------------------------------------------- digits


def _sorted_rows(m: np.ndarray) -> np.ndarray:
    return m[np.lexsort(m.T[::-1])]


def test_digits_shapes_determinism_and_partition():
    from sklearn.datasets import load_digits as sk_load_digits

    a = load_digits(seed=3)
    assert (a.train.d, a.train.n_classes) == (64, 10)
    assert (a.train.n, a.val.n, a.test.n) == (1197, 300, 300)
    assert a.train.X.dtype == np.float32 and a.train.X.max() == 1.0 and a.train.X.min() == 0.0
    b = load_digits(seed=3)
    c = load_digits(seed=4)
    np.testing.assert_array_equal(a.val.X, b.val.X)
    np.testing.assert_array_equal(a.test.y, b.test.y)
    assert not np.array_equal(a.val.X, c.val.X)
    # The three splits are disjoint and cover every image: same multiset of rows.
    ours = np.concatenate([np.column_stack([s.X * 16, s.y]) for s in (a.train, a.val, a.test)])
    sk = sk_load_digits()
    theirs = np.column_stack([sk.data, sk.target])
    assert len(ours) == 1797
    np.testing.assert_array_equal(_sorted_rows(ours), _sorted_rows(theirs))
    with pytest.raises(ValueError, match="n_val"):
        load_digits(n_val=1000, n_test=1000)


# --------------------------------------------------------------------------- Fashion-MNIST


def _idx_bytes(array: np.ndarray, magic_type: int = 0x08) -> bytes:
    header = struct.pack(">BBBB", 0, 0, magic_type, array.ndim)
    header += struct.pack(f">{array.ndim}I", *array.shape)
    return header + array.astype(np.uint8).tobytes()


def _write_fashion(root: Path, n_train: int, n_test: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(7)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, n_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, n_test, dtype=np.uint8),
    }
    root.mkdir(parents=True, exist_ok=True)
    for name, array in arrays.items():
        if name.startswith("train"):  # gzipped train files, plain t10k files: both readers
            (root / f"{name}.gz").write_bytes(gzip.compress(_idx_bytes(array)))
        else:
            (root / name).write_bytes(_idx_bytes(array))
    return arrays


def test_fashion_mnist_tiny_idx(tmp_path):
    arrays = _write_fashion(tmp_path, n_train=12, n_test=5)
    splits = load_fashion_mnist(tmp_path, n_val=4)
    assert (splits.train.n, splits.val.n, splits.test.n) == (8, 4, 5)
    assert splits.train.d == 784 and splits.train.X.dtype == np.float32
    images = arrays["train-images-idx3-ubyte"].reshape(12, 784) / np.float32(255)
    np.testing.assert_array_equal(splits.val.X, images[8:])
    np.testing.assert_array_equal(splits.train.y, arrays["train-labels-idx1-ubyte"][:8])
    test_images = arrays["t10k-images-idx3-ubyte"].reshape(5, 784) / np.float32(255)
    np.testing.assert_array_equal(splits.test.X, test_images)
    assert np.shares_memory(splits.val.X, splits.train.X.base)
    assert splits.train.label_names[0] == "T-shirt/top"


def test_fashion_mnist_bad_files(tmp_path):
    arrays = _write_fashion(tmp_path, n_train=6, n_test=2)
    bad = tmp_path / "t10k-labels-idx1-ubyte"
    bad.write_bytes(_idx_bytes(arrays["t10k-labels-idx1-ubyte"], magic_type=0x0D))
    with pytest.raises(DataError, match="magic") as info:
        load_fashion_mnist(tmp_path, n_val=2)
    assert str(bad) in str(info.value)
    bad.write_bytes(_idx_bytes(arrays["t10k-labels-idx1-ubyte"])[:-1])
    with pytest.raises(DataError, match="truncated") as info:
        load_fashion_mnist(tmp_path, n_val=2)
    assert str(bad) in str(info.value)
    with pytest.raises(DataError, match="zalandoresearch"):
        load_fashion_mnist(tmp_path / "nowhere")
    bad.unlink()
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte"):
        load_fashion_mnist(tmp_path, n_val=2)


def test_fashion_mnist_real():
    root = _require(FASHION_DIR, "Fashion-MNIST")
    splits = load_fashion_mnist(root, n_val=5000)
    assert splits.train.X.shape == (55000, 784) and splits.val.n == 5000
    assert splits.test.X.shape == (10000, 784)
    assert splits.train.X.dtype == np.float32 and splits.train.X.max() == 1.0


# --------------------------------------------------------------------------- load()


def test_load_dispatcher(tmp_path):
    with pytest.raises(ValueError, match="cifar10, digits, fashion_mnist"):
        load("mnist")
    assert DATASETS == ("cifar10", "digits", "fashion_mnist")
    raw = load("digits", normalize=False, n_val=100)
    assert raw.val.n == 100
    np.testing.assert_array_equal(raw.train.X, load_digits(n_val=100).train.X)
    normed = load("digits", seed=1)
    np.testing.assert_allclose(normed.train.X.mean(axis=0), 0, atol=1e-5)
    with pytest.raises(DataError, match="cifar-10-python.tar.gz"):
        load("cifar10")
    _make_cifar_dir(tmp_path, "py")
    splits = load("cifar10", tmp_path, split="all", n_val=6, dtype=np.float64)
    assert (splits.train.n, splits.val.n, splits.train.X.dtype) == (24, 6, np.float64)
    with pytest.raises(ValueError, match="cifar10 only"):
        load("digits", split="all")
