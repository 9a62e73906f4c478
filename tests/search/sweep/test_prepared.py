"""The prepared-data checksum: what changes it, what does not, and a mismatch stops a run."""

import shutil

import pytest

from search import coarse
from search.config.study import DataSpec
from search.sweep.prepared import checksum, prepare
from tests.model.test_data import _batch, _make_cifar_dir, _write_pickle_batch
from tests.search.conftest import write_study


@pytest.fixture
def cifar(tmp_path):
    root = tmp_path / "machine-a" / "cifar"
    _make_cifar_dir(root, "py")
    return root


ALL = DataSpec(name="cifar10", split="all", n_val=5)


def test_checksum_follows_bytes_and_settings_not_paths(cifar, tmp_path):
    base = checksum(ALL, str(cifar))
    # Same files elsewhere (another machine's path): same data.
    other = tmp_path / "machine-b" / "somewhere"
    shutil.copytree(cifar, other)
    assert checksum(ALL, str(other)) == base
    # Files no loader reads do not count.
    (other / "readme.html").write_text("<p>CIFAR-10</p>")
    (other / "cifar-10-python.tar.gz").write_bytes(b"archive")
    assert checksum(ALL, str(other)) == base
    # One byte of one batch does.
    raw = bytearray((other / "data_batch_3").read_bytes())
    raw[-10] ^= 0xFF
    (other / "data_batch_3").write_bytes(bytes(raw))
    assert checksum(ALL, str(other)) != base
    # So does every preparation setting.
    assert checksum(DataSpec(name="cifar10", split="all", n_val=6), str(cifar)) != base
    assert checksum(DataSpec(name="cifar10", split="batch1"), str(cifar)) != base
    assert checksum(ALL, str(cifar), seed=1) != base


def test_cache_is_keyed_by_checksum(cifar, tmp_path):
    a = prepare(ALL, str(cifar), tmp_path / "cache", log=lambda *_: None)
    b = prepare(ALL, str(cifar), tmp_path / "cache", log=lambda *_: None)
    assert a.path == b.path and a.path.name == a.checksum[:16]
    c = prepare(
        DataSpec(name="cifar10", split="all", n_val=6),
        str(cifar),
        tmp_path / "cache",
        log=lambda *_: None,
    )
    assert c.path != a.path
    assert c.open().val.n == 6 and a.open().val.n == 5


def test_a_machine_with_other_data_refuses_to_run(cifar, tmp_path, capsys):
    path = write_study(
        tmp_path,
        "cf",
        data={"name": "cifar10", "split": "all", "n_val": 5},
        network={"hidden": [8]},
        training={"batch_size": 5, "n_s": 2, "n_cycles": 1, "evals_per_cycle": 2},
        coarse={"trials": 2},
        final={"holdout": 2},
        optuna={"workers": 1, "pruner": "none"},
    )
    assert coarse.main(["--study", str(path), "--data-dir", str(cifar)]) == 0
    other = tmp_path / "machine-b" / "cifar"
    shutil.copytree(cifar, other)
    data, labels = _batch(3, seed=99)  # other pixels in a valid batch
    _write_pickle_batch(other / "test_batch", data, labels.tolist())
    capsys.readouterr()
    code = coarse.main(["--study", str(path), "--data-dir", str(other), "--trials", "3"])
    err = capsys.readouterr().err
    assert code == 2 and "the source files or the [data] settings differ" in err


def test_cache_dir_from_the_environment(tmp_path, monkeypatch):
    from search.config.study import load_spec
    from search.sweep import studies as st

    spec = load_spec(write_study(tmp_path, "env"))
    monkeypatch.setenv("C2F_CACHE_DIR", str(tmp_path / "shared-cache"))
    prepared = st.prepare_for(spec, log=lambda *_: None)
    assert prepared.path.parent == tmp_path / "shared-cache"
    monkeypatch.delenv("C2F_CACHE_DIR")
    assert st.prepare_for(spec, log=lambda *_: None).path.parent == tmp_path / "cache"


def test_source_files_of_each_format():
    from search.sweep.prepared import _is_source

    for name in ("data_batch_1", "data_batch_5.mat", "test_batch", "batches.meta.mat"):
        assert _is_source("cifar10", name), name
    for name in ("readme.html", "cifar-10-python.tar.gz", "data_batch_6", ".DS_Store"):
        assert not _is_source("cifar10", name), name
    for name in ("train-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte"):
        assert _is_source("fashion_mnist", name), name
    assert not _is_source("fashion_mnist", "fashion-mnist.tar")
