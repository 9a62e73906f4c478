"""Datasets as float arrays: CIFAR-10 (pickle or .mat batches), scikit-learn digits, Fashion-MNIST.

Every loader returns a :class:`Splits` of three :class:`Dataset` objects whose ``X`` is
``(N, d)`` float32 (or the ``dtype`` asked for) scaled to ``[0, 1]`` and whose ``y`` is
``(N,)`` int64. :func:`normalise` then subtracts the training mean and divides by the
training standard deviation, per dimension. :func:`load` dispatches on a dataset name.

Nothing here downloads anything: a missing file is a :class:`DataError` that says where
to get it. CIFAR-10 python batches are pickles, so they are read with a restricted
unpickler that only resolves the few NumPy globals a real batch needs.
"""

from __future__ import annotations

import contextlib
import ctypes
import dataclasses
import gzip
import math
import os
import pickle
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from model.errors import SettingError, UsageError

__all__ = [
    "DATASETS",
    "DataError",
    "Dataset",
    "Splits",
    "load",
    "load_cifar10",
    "load_cifar10_batch",
    "load_cifar10_mat_batch",
    "load_digits",
    "load_fashion_mnist",
    "normalise",
]

DATASETS = ("cifar10", "digits", "fashion_mnist")
CIFAR10_SPLITS = ("batch1", "all")
CIFAR10_DIM = 3072  # 32 x 32 pixels x 3 channels (R, G, B planes, row-major)
FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_LABELS = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

_CIFAR_HOWTO = (
    "download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html "
    "and extract it; pass the cifar-10-batches-py directory"
)
_FASHION_HOWTO = (
    "download train-images-idx3-ubyte.gz, train-labels-idx1-ubyte.gz, "
    "t10k-images-idx3-ubyte.gz and t10k-labels-idx1-ubyte.gz from "
    "https://github.com/zalandoresearch/fashion-mnist (data/fashion/) into one directory "
    "and pass that directory"
)
# Rows per chunk when computing statistics: bounds the temporaries to ~1M elements.
_CHUNK_ELEMENTS = 1 << 20


class DataError(UsageError):
    """A data file or directory is missing, corrupt or not what it should be."""


@dataclass(frozen=True, eq=False)
class Dataset:
    """Samples as rows.

    X: (N, d) floating array, C-contiguous (float32 unless a caller asked otherwise).
    y: (N,) integer labels in ``[0, n_classes)``.
    label_names: empty, or one name per class.

    ``eq=False``: arrays do not compare to a single bool, so datasets compare by identity.
    """

    X: np.ndarray
    y: np.ndarray
    n_classes: int = 10
    label_names: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        X, y = self.X, self.y
        if not isinstance(X, np.ndarray) or X.ndim != 2:
            shape = getattr(X, "shape", None)
            raise UsageError(f"X must be a 2-D array (N, d), got shape {shape}")
        if not np.issubdtype(X.dtype, np.floating):
            raise UsageError(f"X must be floating (float32 or float64), got dtype {X.dtype}")
        if not isinstance(y, np.ndarray) or y.ndim != 1:
            shape = getattr(y, "shape", None)
            raise UsageError(f"y must be a 1-D array (N,), got shape {shape}")
        if y.dtype.kind not in "iu":
            raise UsageError(f"y must hold integer labels, got dtype {y.dtype}")
        if len(y) != len(X):
            raise UsageError(f"X has {len(X)} rows but y has {len(y)} labels; they must match")
        if isinstance(self.n_classes, bool) or not isinstance(self.n_classes, int | np.integer):
            raise UsageError(f"n_classes must be an int, got {self.n_classes!r}")
        if self.n_classes < 1:
            raise UsageError(f"n_classes must be >= 1, got {self.n_classes=}")
        if len(y):
            lo, hi = int(y.min()), int(y.max())
            if lo < 0 or hi >= self.n_classes:
                bad = lo if lo < 0 else hi
                raise UsageError(
                    f"label {bad} is outside [0, {self.n_classes}); "
                    f"labels must be 0..{self.n_classes - 1}"
                )
        names = tuple(str(name) for name in self.label_names)
        if names and len(names) != self.n_classes:
            raise UsageError(
                f"label_names has {len(names)} names for {self.n_classes} classes; "
                "give one per class or none"
            )
        object.__setattr__(self, "n_classes", int(self.n_classes))
        object.__setattr__(self, "label_names", names)

    @property
    def n(self) -> int:
        """Number of samples (rows of X)."""
        return int(self.X.shape[0])

    @property
    def d(self) -> int:
        """Number of features (columns of X)."""
        return int(self.X.shape[1])


@dataclass(frozen=True, eq=False)
class Splits:
    """Training, validation and test sets with the same d and n_classes."""

    train: Dataset
    val: Dataset
    test: Dataset


# --------------------------------------------------------------------------- helpers


def _float_dtype(dtype: Any) -> np.dtype:
    dt = np.dtype(dtype)
    if not np.issubdtype(dt, np.floating):
        raise UsageError(f"dtype must be a floating type such as float32, got {dtype=}")
    return dt


def _check_held_out(name: str, value: int | float, total: int, what: str) -> int:
    """value images held out of total: an int with 0 < value < total, or a fraction of
    total in (0, 1) (rounded, at least one image). The number of images."""
    if isinstance(value, float) and 0 < value < 1:
        value = max(1, round(value * total))
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise SettingError(
            f"{name} must be a number of images or a fraction in (0, 1), got {value!r}",
            field=name,
        )
    if not 0 < value < total:
        raise SettingError(
            f"{name} must satisfy 0 < {name} < {total} (the {what}), got {name}={value}; "
            + ("hold out at least one image" if value < 1 else "hold out fewer images"),
            field=name,
        )
    return int(value)


def _scale_into(out: np.ndarray, raw: np.ndarray, scale: float) -> None:
    """Write ``raw / scale`` into ``out`` without a float64 temporary (casts uint8 directly)."""
    out[...] = raw
    out /= scale


def _to_float(raw: np.ndarray, dtype: np.dtype, scale: float) -> np.ndarray:
    out = np.empty(raw.shape, dtype=dtype)
    _scale_into(out, raw, scale)
    return out


def _views(X: np.ndarray, y: np.ndarray, n_train: int, **meta: Any) -> tuple[Dataset, Dataset]:
    """First n_train rows and the rest, as views of X and y (no copies)."""
    return (
        Dataset(X[:n_train], y[:n_train], **meta),
        Dataset(X[n_train:], y[n_train:], **meta),
    )


# --------------------------------------------------------------------------- CIFAR-10 pickle


def _resolve_reconstruct() -> Any:
    # The function ndarray pickles name: numpy.core.multiarray._reconstruct in NumPy 1.x,
    # numpy._core.multiarray._reconstruct in 2.x. Taking it from __reduce__ avoids
    # importing the deprecated numpy.core alias.
    return np.empty(0).__reduce__()[0]


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    # Python 3 writes bytes in protocol-2 pickles as _codecs.encode(str, "latin1")
    # (this is how a NumPy array's buffer is stored when a batch is re-pickled). Only
    # that one encoding is honoured: no codec lookup by an attacker-chosen name.
    if encoding not in ("latin1", "latin-1") or not isinstance(text, str):
        raise pickle.UnpicklingError(f"_codecs.encode with encoding {encoding!r} is not allowed")
    return text.encode("latin1")


def _array_from_buffer(buf: Any, dtype: Any, shape: Any, order: Any) -> np.ndarray:
    # Protocol 5 stores an array as its raw buffer and numpy's _frombuffer(buf, dtype,
    # shape, order). The same arguments, checked: bytes and a plain dtype only.
    if not isinstance(buf, bytes | bytearray | memoryview | pickle.PickleBuffer):
        raise pickle.UnpicklingError(f"_frombuffer of a {type(buf).__name__} is not allowed")
    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError(f"_frombuffer with dtype {dtype!r} is not allowed")
    if not (isinstance(shape, tuple) and all(type(n) is int and n >= 0 for n in shape)):
        raise pickle.UnpicklingError(f"_frombuffer with shape {shape!r} is not allowed")
    if order not in ("C", "F"):
        raise pickle.UnpicklingError(f"_frombuffer with order {order!r} is not allowed")
    return np.frombuffer(memoryview(buf), dtype=dtype).reshape(shape, order=order)


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("numpy.core.multiarray", "_reconstruct"): _resolve_reconstruct(),
    ("numpy._core.multiarray", "_reconstruct"): _resolve_reconstruct(),
    ("numpy.core.numeric", "_frombuffer"): _array_from_buffer,
    ("numpy._core.numeric", "_frombuffer"): _array_from_buffer,
    ("numpy", "ndarray"): np.ndarray,
    ("numpy", "dtype"): np.dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class _ForbiddenGlobal(pickle.UnpicklingError):
    def __init__(self, module: str, name: str) -> None:
        # Protocol-2 pickles spell builtins "__builtin__"; say both so the message is clear.
        qualname = f"{module}.{name}"
        py3_module = _PY2_MODULES.get(module)
        if py3_module:
            qualname += f" ({py3_module}.{name})"
        super().__init__(qualname)
        self.qualname = qualname


_PY2_MODULES = {"__builtin__": "builtins", "copy_reg": "copyreg"}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals a CIFAR-10 batch needs; anything else stops the load.

    The official batches name three globals: numpy.core.multiarray._reconstruct,
    numpy.ndarray and numpy.dtype. A batch re-pickled by Python 3 may name
    _codecs.encode (protocol 2) or numpy's _frombuffer (protocol 5) too: both are
    resolved to checked versions that only build bytes and plain arrays. A batch is
    accepted by what it holds, whatever its protocol. The refusal happens when the
    GLOBAL opcode is read, before any REDUCE could call the object, so a hostile
    pickle runs nothing.
    """

    def find_class(self, module: str, name: str) -> Any:
        try:
            return _ALLOWED_GLOBALS[(module, name)]
        except KeyError:
            raise _ForbiddenGlobal(module, name) from None


def _unpickle(path: Path, what: str) -> Any:
    try:
        with open(path, "rb") as f:
            return _RestrictedUnpickler(f, encoding="bytes").load()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; {_CIFAR_HOWTO}") from None
    except _ForbiddenGlobal as exc:
        raise DataError(
            f"{path}: refusing to unpickle the global {exc.qualname}; a {what} only needs "
            "NumPy arrays. The file is not a genuine CIFAR-10 batch: replace it with one "
            "from the official cifar-10-python.tar.gz"
        ) from None
    except Exception as exc:  # unpickling a damaged file can raise almost anything
        raise DataError(
            f"{path}: truncated or corrupt {what} ({type(exc).__name__}: {exc}); "
            f"extract it again from cifar-10-python.tar.gz"
        ) from None


def _str_keys(path: Path, obj: Any, what: str) -> dict[str, Any]:
    if not isinstance(obj, dict):
        raise DataError(
            f"{path}: expected a dict in a {what}, got {type(obj).__name__}; "
            "is this a CIFAR-10 file?"
        )
    return {(k.decode("latin1") if isinstance(k, bytes) else str(k)): v for k, v in obj.items()}


def _check_batch(path: Path, data: Any, labels: Any) -> tuple[np.ndarray, np.ndarray]:
    """Validate one batch: data (N, 3072) uint8, labels N ints in 0..9."""
    if not isinstance(data, np.ndarray) or data.dtype != np.uint8:
        kind = data.dtype if isinstance(data, np.ndarray) else type(data).__name__
        raise DataError(f"{path}: 'data' must be a uint8 array, got {kind}; is this CIFAR-10?")
    if data.ndim != 2 or data.shape[1] != CIFAR10_DIM:
        raise DataError(
            f"{path}: 'data' must have shape (N, {CIFAR10_DIM}), got {data.shape}; "
            "the file is damaged or not a CIFAR-10 batch"
        )
    try:
        y = np.asarray(labels)
    except Exception as exc:
        raise DataError(f"{path}: 'labels' is not a list of integers ({exc})") from None
    if y.ndim == 2 and 1 in y.shape:  # MATLAB stores labels as an (N, 1) column
        y = y.reshape(-1)
    if y.ndim != 1 or y.dtype.kind not in "iu":
        raise DataError(
            f"{path}: 'labels' must be N integers, got shape {y.shape} dtype {y.dtype}"
        )
    if len(y) != len(data):
        raise DataError(f"{path}: {len(data)} images but {len(y)} labels; the file is damaged")
    if len(y) and (int(y.min()) < 0 or int(y.max()) > 9):
        bad = int(y.min()) if int(y.min()) < 0 else int(y.max())
        raise DataError(f"{path}: label {bad} is outside 0..9; the file is damaged")
    return np.ascontiguousarray(data), y.astype(np.int64)


def _read_pickle_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    batch = _str_keys(path, _unpickle(path, "CIFAR-10 batch"), "CIFAR-10 batch")
    missing = [k for k in ("data", "labels") if k not in batch]
    if missing:
        raise DataError(
            f"{path}: missing key(s) {missing} (has {sorted(batch)}); not a CIFAR-10 batch"
        )
    return _check_batch(path, batch["data"], batch["labels"])


def _read_mat_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    from scipy.io import loadmat

    try:
        mat = loadmat(os.fspath(path), appendmat=False)
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; {_CIFAR_HOWTO}") from None
    except Exception as exc:  # scipy raises several types for damaged or v7.3 files
        raise DataError(
            f"{path}: cannot read this .mat batch ({type(exc).__name__}: {exc}); "
            "extract it again from cifar-10-matlab.tar.gz or use the python batches"
        ) from None
    missing = [k for k in ("data", "labels") if k not in mat]
    if missing:
        raise DataError(f"{path}: missing variable(s) {missing}; not a CIFAR-10 .mat batch")
    return _check_batch(path, mat["data"], mat["labels"])


def load_cifar10_batch(path: str | os.PathLike[str]) -> Dataset:
    """One CIFAR-10 python batch (e.g. ``data_batch_1``) as X (N, 3072) float32 in [0, 1].

    y is (N,) int64. label_names stay empty: they live in ``batches.meta`` (see
    :func:`load_cifar10`). N comes from the arrays, never from ``batches.meta``.
    """
    path = Path(path)
    data, y = _read_pickle_batch(path)
    return Dataset(_to_float(data, np.dtype(np.float32), 255.0), y)


def load_cifar10_mat_batch(path: str | os.PathLike[str]) -> Dataset:
    """One CIFAR-10 MATLAB batch (``data_batch_1.mat``: variables data, labels).

    Returns X (N, 3072) float32 in [0, 1] and y (N,) int64, identical to
    :func:`load_cifar10_batch` on the python batch with the same images.
    """
    path = Path(path)
    data, y = _read_mat_batch(path)
    return Dataset(_to_float(data, np.dtype(np.float32), 255.0), y)


def _cifar_label_names(data_dir: Path, suffix: str) -> tuple[str, ...]:
    meta_path = data_dir / f"batches.meta{suffix}"
    if not meta_path.is_file():
        return ()
    if suffix == ".mat":
        from scipy.io import loadmat

        try:
            names_raw = loadmat(os.fspath(meta_path), appendmat=False).get("label_names")
        except Exception as exc:
            raise DataError(f"{meta_path}: cannot read it ({exc}); extract it again") from None
        if names_raw is None:
            return ()
        arr = np.asarray(names_raw)
        if arr.dtype.kind == "U":  # a char matrix: loadmat gives one padded string per row
            names = [str(s).strip() for s in arr.reshape(-1)]
        else:  # a cell array: each element a 1-element string array
            names = [str(np.asarray(cell).reshape(-1)[0]).strip() for cell in arr.reshape(-1)]
    else:
        meta = _str_keys(meta_path, _unpickle(meta_path, "batches.meta"), "batches.meta")
        raw = meta.get("label_names")
        if raw is None:
            return ()
        if not isinstance(raw, list | tuple):
            raise DataError(f"{meta_path}: label_names must be a list, got {type(raw).__name__}")
        names = [n.decode("utf-8") if isinstance(n, bytes) else str(n) for n in raw]
    if len(names) != 10:
        raise DataError(f"{meta_path}: expected 10 label names, got {len(names)}: {names}")
    return tuple(names)


def _cifar_format(data_dir: Path) -> str:
    """'' for python pickle batches, '.mat' for MATLAB batches."""
    if not data_dir.exists():
        raise DataError(f"CIFAR-10 directory {data_dir} does not exist; {_CIFAR_HOWTO}")
    if not data_dir.is_dir():
        raise DataError(f"{data_dir} is not a directory; {_CIFAR_HOWTO}")
    if (data_dir / "data_batch_1").is_file():
        return ""
    if (data_dir / "data_batch_1.mat").is_file():
        return ".mat"
    hint = _CIFAR_HOWTO
    for sub in ("cifar-10-batches-py", "cifar-10-batches-mat"):
        if (data_dir / sub).is_dir():
            hint = f"did you mean {data_dir / sub}?"
    raise DataError(
        f"{data_dir} holds neither data_batch_1 (python batches) nor data_batch_1.mat "
        f"(MATLAB batches); {hint}"
    )


def load_cifar10(
    data_dir: str | os.PathLike[str],
    *,
    split: str = "batch1",
    n_val: int | float = 5000,
    dtype: Any = np.float32,
) -> Splits:
    """CIFAR-10 from a ``cifar-10-batches-py`` (or ``cifar-10-batches-mat``) directory.

    split="batch1": train data_batch_1, validation data_batch_2, test test_batch
        (n_val is ignored).
    split="all": data_batch_1..5 in one (N, 3072) array; the last n_val rows are the
        validation set, the rest training. Both are views of that one array.
    Test is always test_batch. X is (N, 3072) ``dtype`` in [0, 1], y (N,) int64; the
    format (pickle or .mat) is detected from the files present. Not normalised.
    """
    if split not in CIFAR10_SPLITS:
        raise UsageError(f"unknown CIFAR-10 split {split!r}; allowed: {', '.join(CIFAR10_SPLITS)}")
    dt = _float_dtype(dtype)
    data_dir = Path(data_dir)
    suffix = _cifar_format(data_dir)
    train_names = (
        ["data_batch_1"] if split == "batch1" else [f"data_batch_{i}" for i in range(1, 6)]
    )
    needed = [*train_names, "data_batch_2", "test_batch"]
    missing = [
        n + suffix for n in dict.fromkeys(needed) if not (data_dir / (n + suffix)).is_file()
    ]
    if missing:
        raise DataError(
            f"{data_dir}: missing {', '.join(missing)} for split={split!r}; {_CIFAR_HOWTO}"
        )
    read = _read_mat_batch if suffix == ".mat" else _read_pickle_batch
    meta: dict[str, Any] = {"label_names": _cifar_label_names(data_dir, suffix)}

    def batch(name: str) -> Dataset:
        data, y = read(data_dir / (name + suffix))
        return Dataset(_to_float(data, dt, 255.0), y, **meta)

    if split == "batch1":
        return Splits(
            train=batch("data_batch_1"), val=batch("data_batch_2"), test=batch("test_batch")
        )

    # uint8 is a quarter of float32: keep the raw batches, then fill one float array.
    raws = [read(data_dir / (name + suffix)) for name in train_names]
    total = sum(len(data) for data, _ in raws)
    n_val = _check_held_out("n_val", n_val, total, f"images in data_batch_1..5 of {data_dir}")
    X = np.empty((total, CIFAR10_DIM), dtype=dt)
    y = np.empty(total, dtype=np.int64)
    start = 0
    while raws:
        data, labels = raws.pop(0)  # drop each uint8 batch as soon as it is copied
        _scale_into(X[start : start + len(data)], data, 255.0)
        y[start : start + len(data)] = labels
        start += len(data)
        del data, labels
    train, val = _views(X, y, total - n_val, **meta)
    return Splits(train=train, val=val, test=batch("test_batch"))


def cifar10_train_size(data_dir: str | os.PathLike[str]) -> int:
    """The number of images in data_batch_1..5 of a CIFAR-10 directory (50,000 in the
    official set; a subset has fewer). Reads the batches; raises DataError as the loader."""
    data_dir = Path(data_dir)
    suffix = _cifar_format(data_dir)
    read = _read_mat_batch if suffix == ".mat" else _read_pickle_batch
    total = 0
    for i in range(1, 6):
        path = data_dir / f"data_batch_{i}{suffix}"
        if not path.is_file():
            raise DataError(f"{data_dir}: missing {path.name}; {_CIFAR_HOWTO}")
        total += len(read(path)[1])
    return total


# --------------------------------------------------------------------------- digits


def load_digits(
    *, n_val: int | float = 300, n_test: int | float = 300, seed: int = 0, dtype: Any = np.float32
) -> Splits:
    """scikit-learn's 8x8 digits (1797 images): X (N, 64) in [0, 1] (pixel / 16), y (N,).

    The rows are shuffled with ``np.random.default_rng(seed).permutation`` once; the first
    rows are training, the next n_val validation, the last n_test test (views of one array).
    """
    from sklearn.datasets import load_digits as sk_load_digits

    dt = _float_dtype(dtype)
    digits = sk_load_digits()
    total = len(digits.target)
    n_val = _check_held_out("n_val", n_val, total, "number of digits")
    n_test = _check_held_out("n_test", n_test, total, "number of digits")
    if n_val + n_test >= total:
        raise SettingError(
            f"n_val + n_test must be < {total} (the digits), got {n_val=} + {n_test=}",
            field="n_val",
        )
    perm = np.random.default_rng(seed).permutation(total)
    X = _to_float(digits.data[perm], dt, 16.0)
    y = np.ascontiguousarray(digits.target[perm], dtype=np.int64)
    meta: dict[str, Any] = {"label_names": tuple(str(i) for i in range(10))}
    n_train = total - n_val - n_test
    train, rest = _views(X, y, n_train, **meta)
    val, test = _views(rest.X, rest.y, n_val, **meta)
    return Splits(train=train, val=val, test=test)


# --------------------------------------------------------------------------- Fashion-MNIST


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """An IDX file of unsigned bytes (optionally gzipped) as a read-only uint8 array.

    Header: two zero bytes, type 0x08 (uint8), the number of dimensions, then each
    dimension as a big-endian uint32. The payload must be exactly prod(dims) bytes.
    """
    try:
        if path.suffix == ".gz":
            with gzip.open(path, "rb") as f:
                raw = f.read()
        else:
            raw = path.read_bytes()
    except FileNotFoundError:
        raise DataError(f"{path}: file not found; {_FASHION_HOWTO}") from None
    except (OSError, EOFError, gzip.BadGzipFile) as exc:
        raise DataError(f"{path}: cannot read it ({exc}); download it again") from None
    if len(raw) < 4:
        raise DataError(f"{path}: {len(raw)} bytes is too short for an IDX header")
    zero1, zero2, type_code, n_dims = raw[:4]
    if zero1 or zero2 or type_code != 0x08 or n_dims != ndim:
        raise DataError(
            f"{path}: bad IDX magic number {raw[:4].hex()}, expected "
            f"0000080{ndim} (unsigned bytes, {ndim} dimension(s)); not the right IDX file"
        )
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(f"{path}: truncated IDX header ({len(raw)} bytes); download it again")
    dims = tuple(int(v) for v in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims, dtype=np.int64))
    if len(raw) != expected:
        raise DataError(
            f"{path}: header says dims {dims} ({expected} bytes) but the file has "
            f"{len(raw)} bytes; it is truncated or damaged, download it again"
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def _idx_path(data_dir: Path, stem: str) -> Path:
    for name in (stem, stem + ".gz"):
        if (data_dir / name).is_file():
            return data_dir / name
    raise DataError(f"{data_dir}: missing {stem} (or {stem}.gz); {_FASHION_HOWTO}")


def _fashion_part(data_dir: Path, prefix: str, dt: np.dtype) -> tuple[np.ndarray, np.ndarray]:
    img_path = _idx_path(data_dir, f"{prefix}-images-idx3-ubyte")
    lab_path = _idx_path(data_dir, f"{prefix}-labels-idx1-ubyte")
    images = _read_idx(img_path, 3)
    labels = _read_idx(lab_path, 1)
    if len(images) != len(labels):
        raise DataError(
            f"{img_path} has {len(images)} images but {lab_path} has {len(labels)} labels; "
            "the files do not belong together"
        )
    if len(labels) and int(labels.max()) > 9:
        raise DataError(f"{lab_path}: label {int(labels.max())} is outside 0..9")
    X = _to_float(images.reshape(len(images), -1), dt, 255.0)
    return X, labels.astype(np.int64)


def load_fashion_mnist(
    data_dir: str | os.PathLike[str] = FASHION_MNIST_DIR,
    *,
    n_val: int | float = 5000,
    dtype: Any = np.float32,
) -> Splits:
    """Fashion-MNIST from the four IDX files (``.gz`` or plain) in data_dir.

    X is (N, 784) ``dtype`` in [0, 1] (pixel / 255), y (N,) int64. The last n_val training
    images are the validation set (a view of the training array); test is t10k.
    """
    dt = _float_dtype(dtype)
    data_dir = Path(data_dir)
    if not data_dir.is_dir():
        raise DataError(f"Fashion-MNIST directory {data_dir} does not exist; {_FASHION_HOWTO}")
    X, y = _fashion_part(data_dir, "train", dt)
    n_val = _check_held_out("n_val", n_val, len(X), f"training images in {data_dir}")
    meta: dict[str, Any] = {"label_names": FASHION_MNIST_LABELS}
    train, val = _views(X, y, len(X) - n_val, **meta)
    X_test, y_test = _fashion_part(data_dir, "t10k", dt)
    return Splits(train=train, val=val, test=Dataset(X_test, y_test, **meta))


# --------------------------------------------------------------------------- normalisation


def _train_stats(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-dimension mean and std (both (d,), float64) of X (N, d), in row chunks.

    Chunking keeps temporaries small; sums are accumulated in float64 for accuracy.
    """
    n, d = X.shape
    if n == 0:
        raise UsageError("cannot normalise: the training set has no rows")
    step = max(1, _CHUNK_ELEMENTS // max(d, 1))
    total = np.zeros(d, dtype=np.float64)
    for start in range(0, n, step):
        total += X[start : start + step].sum(axis=0, dtype=np.float64)
    mean = total / n
    mean_x = mean.astype(X.dtype)
    sq = np.zeros(d, dtype=np.float64)
    for start in range(0, n, step):
        dev = X[start : start + step] - mean_x
        np.square(dev, out=dev)
        sq += dev.sum(axis=0, dtype=np.float64)
    std = np.sqrt(sq / n)
    std[std == 0] = 1.0  # constant dimensions: centre them, do not divide by zero
    return mean, std


def normalise(splits: Splits) -> Splits:
    """Standardise every split with the per-dimension mean and std of the TRAINING set.

    X (N, d) of each split becomes ``(X - mean) / std`` with mean, std of shape (d,) taken
    from ``splits.train.X`` only (dimensions with std 0 are divided by 1). Arrays that are
    writable and share no memory with another split are changed in place (no copy);
    read-only arrays (e.g. memory-mapped) and overlapping ones get a new array.
    """
    datasets = (splits.train, splits.val, splits.test)
    d = splits.train.d
    for which, ds in zip(("val", "test"), datasets[1:], strict=True):
        if ds.d != d:
            raise UsageError(f"{which} has {ds.d} features but train has {d}; they must match")
    mean, std = _train_stats(splits.train.X)
    out: list[Dataset] = []
    for i, ds in enumerate(datasets):
        X = ds.X
        mean_x, std_x = mean.astype(X.dtype), std.astype(X.dtype)
        overlaps = any(j != i and np.shares_memory(X, other.X) for j, other in enumerate(datasets))
        if X.flags.writeable and not overlaps:
            X -= mean_x
            X /= std_x
            out.append(ds)
        else:
            Xn = np.subtract(X, mean_x)
            Xn /= std_x
            out.append(dataclasses.replace(ds, X=np.asarray(Xn)))
    # Overlapping arrays were copied above before any in-place write, so order is safe:
    # the in-place branch only runs on arrays no other split can see.
    return Splits(train=out[0], val=out[1], test=out[2])


# --------------------------------------------------------------------------- dispatcher


def load(
    name: str,
    data_dir: str | os.PathLike[str] | None = None,
    *,
    split: str = "batch1",
    n_val: int | float | None = None,
    seed: int = 0,
    dtype: Any = np.float32,
    normalize: bool = True,
) -> Splits:
    """Load a dataset by name ("cifar10", "digits" or "fashion_mnist") and normalise it.

    n_val=None uses the loader's default; a float in (0, 1) is a fraction of the images.
    split applies to cifar10 only (n_val only to its split="all"); seed only to
    digits, whose rows are shuffled. X of every split is (N, d) ``dtype``, y (N,)
    int64; with normalize=True, standardised by :func:`normalise`.
    """
    if name not in DATASETS:
        raise UsageError(f"unknown dataset {name!r}; allowed: {', '.join(DATASETS)}")
    if name != "cifar10" and split != "batch1":
        raise UsageError(f"split={split!r} applies to cifar10 only; leave it out for {name}")
    kwargs: dict[str, Any] = {"dtype": dtype}
    if n_val is not None:
        kwargs["n_val"] = n_val
    if name == "cifar10":
        if data_dir is None:
            raise DataError(f"cifar10 needs data_dir: {_CIFAR_HOWTO}")
        splits = load_cifar10(data_dir, split=split, **kwargs)
    elif name == "digits":
        if data_dir is not None:
            raise UsageError(
                f"digits ships with scikit-learn and reads no files; got {data_dir=}, pass None"
            )
        splits = load_digits(seed=seed, **kwargs)
    else:
        splits = load_fashion_mnist(FASHION_MNIST_DIR if data_dir is None else data_dir, **kwargs)
    splits = normalise(splits) if normalize else splits
    _return_freed_memory()
    return splits


def _return_freed_memory() -> None:
    """Hand the heap glibc keeps after the loaders' temporary arrays back to the OS.

    The raw uint8 batches of CIFAR-10 (about 120 MB for all of it) are freed once
    converted, but glibc keeps that heap resident; malloc_trim returns it.
    """
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):  # not glibc (e.g. musl): nothing to do
        ctypes.CDLL("libc.so.6").malloc_trim(0)


def n_val_arg(text: str) -> int | float:
    """The ``--n-val`` flag of every command: a number of images >= 1 or a fraction in
    (0, 1), as ``[data] n_val`` takes it."""
    import argparse

    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if 0 < value < 1:
        return value
    if value >= 1 and math.isfinite(value) and value == int(value):
        return int(value)
    raise argparse.ArgumentTypeError(
        f"must be a number of images >= 1 or a fraction in (0, 1), got {text!r}"
    )
