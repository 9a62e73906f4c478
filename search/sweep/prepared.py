"""The prepared dataset: loaded, split and normalised once, cached as float32 ``.npy``.

Workers open the arrays memory-mapped and read-only, so N workers share one copy
of the data in the page cache instead of holding N. Normalisation happens here,
before any worker starts: a worker that normalised its own view would make a
private full-size copy.

The cache directory is named by a checksum of the source files and the
preparation settings, so a worker never trains on stale or different data; the
checksum is recorded on each study and compared by every worker that joins.
"""

from __future__ import annotations

import errno
import hashlib
import importlib.metadata
import json
import os
import shutil
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from model import data as data_mod
from search.config.study import DataSpec

PARTS = ("train", "val", "test")
CACHE_VERSION = 1


@dataclass(frozen=True)
class Prepared:
    """Where a prepared dataset lives and the checksum that names it."""

    path: Path
    checksum: str

    def sizes(self) -> dict[str, int]:
        """Images per part: {"train": ..., "val": ..., "test": ...}."""
        return dict(json.loads((self.path / "meta.json").read_text())["sizes"])

    def open(self) -> data_mod.Splits:
        """The splits as read-only memory maps (X float32 (N, d), y int64 (N,))."""
        meta = json.loads((self.path / "meta.json").read_text())
        parts = []
        for part in PARTS:
            X = np.load(self.path / f"{part}_X.npy", mmap_mode="r")
            y = np.load(self.path / f"{part}_y.npy")
            parts.append(
                data_mod.Dataset(
                    X, y, n_classes=meta["n_classes"], label_names=tuple(meta["label_names"])
                )
            )
        return data_mod.Splits(*parts)


def _source_files(spec: DataSpec, data_dir: str | None) -> list[Path]:
    if spec.name == "digits":
        return []
    if data_dir is None:
        if spec.name == "fashion_mnist":
            data_dir = "/usr/share/datasets/fashion-mnist"
        else:
            # Let the loader raise its own error, which says how to get the data.
            data_mod.load(spec.name, None)
    root = Path(data_dir)  # type: ignore[arg-type]
    if not root.is_dir():
        data_mod.load(spec.name, str(root))  # raises DataError naming the directory
    # Only the files a loader reads: a README or the downloaded archive beside them
    # must not make two machines' data look different.
    return sorted(p for p in root.iterdir() if p.is_file() and _is_source(spec.name, p.name))


_CIFAR_STEMS = {f"data_batch_{i}" for i in range(1, 6)} | {"test_batch", "batches.meta"}
_FASHION_STEMS = {
    f"{prefix}-{kind}"
    for prefix in ("train", "t10k")
    for kind in ("images-idx3-ubyte", "labels-idx1-ubyte")
}


def _is_source(dataset: str, name: str) -> bool:
    if dataset == "cifar10":
        return name.removesuffix(".mat") in _CIFAR_STEMS
    return name.removesuffix(".gz") in _FASHION_STEMS


def checksum(spec: DataSpec, data_dir: str | None, *, seed: int = 0) -> str:
    """SHA-256 over the source files' bytes and the preparation settings."""
    h = hashlib.sha256()
    settings = {**asdict(spec), "dir": None, "seed": seed, "version": CACHE_VERSION}
    if spec.name == "digits":
        settings["sklearn"] = importlib.metadata.version("scikit-learn")
    h.update(json.dumps(settings, sort_keys=True).encode())
    for path in _source_files(spec, data_dir):
        h.update(path.name.encode())
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def prepare(
    spec: DataSpec, data_dir: str | None, cache_root: Path, *, seed: int = 0, log=print
) -> Prepared:
    """Load, split and normalise once; reuse the cache when the checksum matches."""
    digest = checksum(spec, data_dir, seed=seed)
    target = Path(cache_root) / digest[:16]
    if (target / "meta.json").exists():
        return Prepared(target, digest)
    log(f"preparing {spec.name} data (once) into {target}")
    splits = data_mod.load(spec.name, data_dir, split=spec.split, n_val=spec.n_val, seed=seed)
    needed = sum(getattr(splits, p).X.size * 4 + getattr(splits, p).n * 8 for p in PARTS)
    writing = target.parent
    tmp: Path | None = None
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        # Written to a temporary directory and renamed, so a killed run leaves no half cache.
        tmp = Path(tempfile.mkdtemp(prefix=".tmp-", dir=target.parent))
        for part in PARTS:
            ds = getattr(splits, part)
            writing = tmp / f"{part}_X.npy"
            np.save(writing, np.ascontiguousarray(ds.X, dtype=np.float32))
            writing = tmp / f"{part}_y.npy"
            np.save(writing, ds.y.astype(np.int64))
        meta = {
            "checksum": digest,
            "dataset": spec.name,
            "n_classes": splits.train.n_classes,
            "label_names": list(splits.train.label_names),
            "sizes": {p: getattr(splits, p).n for p in PARTS},
        }
        writing = tmp / "meta.json"
        writing.write_text(json.dumps(meta, indent=2))
        try:
            os.rename(tmp, target)
        except OSError:
            if not (target / "meta.json").exists():  # not a concurrent identical writer
                raise
    except OSError as exc:
        if tmp is not None:  # first: the room it held counts as free in the message
            shutil.rmtree(tmp, ignore_errors=True)
        # The file as it would have been named, not its temporary directory's name.
        shown = target / writing.name if tmp is not None and writing.parent == tmp else writing
        raise CacheWriteError(_cannot_write(exc, shown, target, needed)) from exc
    finally:
        if tmp is not None and tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return Prepared(target, digest)


class CacheWriteError(RuntimeError):
    """The prepared data could not be written (a full or read-only disk); the message says
    which file, which disk and what to do."""


def _cannot_write(exc: OSError, path: Path, target: Path, needed: int) -> str:
    """One line for a failed write of the prepared data: the file, the disk, the fix.

    NumPy reports a short write as ``OSError("76608 requested and 37856 written")``, with
    no errno: a disk with less room than the data needs is taken to be the reason then.
    """
    existing = target
    while not existing.exists() and existing != existing.parent:
        existing = existing.parent
    mount = existing.resolve()
    while not os.path.ismount(mount) and mount != mount.parent:
        mount = mount.parent
    try:
        free = shutil.disk_usage(existing).free
    except OSError:
        free = None
    elsewhere = (
        "or set C2F_CACHE_DIR to a directory on another disk, then run the same command again"
    )
    mb = 1 << 20
    if exc.errno == errno.ENOSPC or (exc.errno is None and free is not None and free < needed):
        room = (
            ""
            if free is None
            else f" ({free / mb:.1f} MB free, the data needs {needed / mb:.1f} MB)"
        )
        return (
            f"cannot write the prepared data {path}: the disk holding {target.parent} "
            f"(mounted at {mount}) is full{room}; free some space {elsewhere}"
        )
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        why = "read-only file system" if exc.errno == errno.EROFS else "permission denied"
        return (
            f"cannot write the prepared data {path} ({why}): make {target.parent} writable "
            f"{elsewhere}"
        )
    return (
        f"cannot write the prepared data {path} ({type(exc).__name__}: {exc}); check the disk "
        f"holding {target.parent} (mounted at {mount}) {elsewhere}"
    )
