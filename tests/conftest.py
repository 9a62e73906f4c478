"""Shared fixtures: an rng, a tiny dataset and the real CIFAR-10 subset."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest

from model.data import Dataset, Splits

REPO = Path(__file__).resolve().parents[1]
SHARED_CIFAR = REPO.parent / "shared" / "data" / "cifar-10-batches-py"


def missing(reason: str) -> None:
    """Skip on a user's machine, fail in CI: CI must run every test."""
    if os.environ.get("CI") == "true":
        pytest.fail(f"required in CI: {reason}")
    pytest.skip(reason)


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


@pytest.fixture
def tiny_splits() -> Splits:
    """300/100/100 samples of 20 features, 3 separable-ish classes, float32."""
    r = np.random.default_rng(0)
    centres = r.standard_normal((3, 20)) * 2

    def make(n: int) -> Dataset:
        y = r.integers(0, 3, size=n)
        X = (centres[y] + r.standard_normal((n, 20))).astype(np.float32)
        return Dataset(X, y.astype(np.int64), n_classes=3)

    return Splits(make(300), make(100), make(100))


@pytest.fixture
def cifar_dir() -> Path:
    if not (SHARED_CIFAR / "data_batch_1").exists():
        missing(f"the CIFAR-10 subset is not at {SHARED_CIFAR}")
    return SHARED_CIFAR


@pytest.fixture
def saved_figures(monkeypatch):
    """Every matplotlib figure saved during the test, by file name, for asserting on its axes.

    The figures are still written; they are kept open until the test ends.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.figure import Figure

    figures: dict[str, Figure] = {}
    save = Figure.savefig
    close = plt.close

    def savefig(self, fname, *args, **kwargs):
        figures[Path(str(fname)).name] = self
        return save(self, fname, *args, **kwargs)

    monkeypatch.setattr(Figure, "savefig", savefig)
    monkeypatch.setattr(plt, "close", lambda *a, **k: None)
    yield figures
    for fig in figures.values():
        close(fig)


def check_axes(fig) -> None:
    """Every panel with data has a title, labelled axes and a legend (a colour bar is a
    scale, not a panel: it has its label)."""
    bars = [ax for ax in fig.axes if ax.get_label() == "<colorbar>"]
    for bar in bars:
        assert bar.get_ylabel() or bar.get_xlabel(), "a colour bar without a label"
    panels = [ax for ax in fig.axes if (ax.lines or ax.collections) and ax not in bars]
    assert panels, "an empty figure"
    for ax in panels:
        assert ax.get_title(), "a panel without a title"
        assert ax.get_xlabel() and ax.get_ylabel(), f"unlabelled axes in {ax.get_title()!r}"
        assert ax.get_legend() is not None, f"no legend in {ax.get_title()!r}"
