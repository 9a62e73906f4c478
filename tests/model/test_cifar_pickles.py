"""A CIFAR-10 batch is accepted by what it holds, whatever its pickle protocol; the
restricted unpickler still refuses every global a batch does not need."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest

from model.data import DataError, load_cifar10, load_cifar10_batch


def genuine(cifar_dir, name: str = "test_batch") -> dict:
    # The shared copy is the official file: trusted, so plain pickle may read it here.
    with open(cifar_dir / name, "rb") as f:
        return pickle.load(f, encoding="bytes")


@pytest.mark.parametrize("protocol", [2, 3, 4, 5])
def test_a_genuine_batch_re_pickled_with_any_protocol_loads_the_same_images(
    cifar_dir, tmp_path, protocol
):
    batch = genuine(cifar_dir)
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps(batch, protocol=protocol))
    ds = load_cifar10_batch(path)
    assert np.array_equal(ds.X, batch[b"data"].astype(np.float32) / 255.0)
    assert ds.y.tolist() == batch[b"labels"]


def test_a_directory_re_pickled_with_protocol_5_loads_as_the_original(cifar_dir, tmp_path):
    for name in ("data_batch_1", "data_batch_2", "test_batch", "batches.meta"):
        (tmp_path / name).write_bytes(pickle.dumps(genuine(cifar_dir, name), protocol=5))
    theirs = load_cifar10(str(cifar_dir), split="batch1")
    ours = load_cifar10(str(tmp_path), split="batch1")
    for part in ("train", "val", "test"):
        assert np.array_equal(getattr(ours, part).X, getattr(theirs, part).X)
        assert np.array_equal(getattr(ours, part).y, getattr(theirs, part).y)
    assert ours.train.label_names == theirs.train.label_names


class _Call:
    def __init__(self, fn, *args):
        self.fn, self.args = fn, args

    def __reduce__(self):
        return (self.fn, self.args)


def test_a_protocol_5_pickle_naming_another_global_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "data_batch_1"
    batch = {b"data": _Call(os.system, f"touch {marker}"), b"labels": [0]}
    path.write_bytes(pickle.dumps(batch, protocol=5))
    with pytest.raises(DataError, match=r"refusing to unpickle the global posix\.system"):
        load_cifar10_batch(path)
    assert not marker.exists()


def test_numpys_frombuffer_builds_plain_arrays_only(tmp_path):
    frombuffer = np.empty(0).__reduce_ex__(5)[0]  # numpy's own _frombuffer, as pickled
    path = tmp_path / "data_batch_1"
    for args, words in [
        ((b"\0" * 8, np.dtype(object), (1,), "C"), "dtype"),
        (("text", np.dtype(np.uint8), (4,), "C"), "_frombuffer of a str"),
        ((b"\0" * 4, np.dtype(np.uint8), "4", "C"), "shape"),
    ]:
        path.write_bytes(pickle.dumps({b"data": _Call(frombuffer, *args)}, protocol=5))
        with pytest.raises(DataError, match=words):
            load_cifar10_batch(path)
