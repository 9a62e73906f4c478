"""The shipped study files search and choose as the benchmark's "coarse2fine as shipped"
does: what ships is what was measured (``bench/peers.py``, the README's search quality)."""

from pathlib import Path

import pytest

from bench import peers
from search.config.study import load_spec
from tests.search.conftest import dump_toml

STUDIES = sorted((peers.REPO / "studies").glob("*.toml"))
# What decides how a search searches and chooses; not what it trains, nor for how long.
MECHANISMS = {
    "optuna": ("pruner", "sampler", "seed_mode", "budget"),
    "coarse": ("replicates", "race_runs", "stop_below_noise"),
    "fine": (
        "narrow",
        "extend",
        "warm_start",
        "replicates",
        "race_top",
        "race_runs",
        "stop_below_noise",
    ),
    "final": ("choose",),
}


def _measured(tmp_path: Path):
    path = tmp_path / "measured.toml"
    path.write_text(dump_toml(peers.study_doc(peers.LANDSCAPES["digits"], "c2f", 0)))
    return load_spec(path)


def test_the_shipped_study_files_are_all_checked():
    names = {p.name for p in STUDIES}
    assert {"quickstart.toml", "cifar10_2layer.toml", "cifar10_3layer_bn.toml"} <= names


def _differences(shipped, measured) -> list[str]:
    pairs = (
        (
            table,
            name,
            getattr(getattr(shipped, table), name),
            getattr(getattr(measured, table), name),
        )
        for table, names in MECHANISMS.items()
        for name in names
    )
    return [f"[{t}] {n}: {a!r} shipped, {b!r} measured" for t, n, a, b in pairs if a != b]


@pytest.mark.parametrize("path", STUDIES, ids=lambda p: p.name)
def test_a_shipped_study_file_searches_as_the_benchmark_measured(path, tmp_path):
    differ = _differences(load_spec(path), _measured(tmp_path))
    assert not differ, f"{path.name}: " + "; ".join(differ)


def test_a_study_file_with_another_pruner_is_caught(tmp_path):
    """The check fails on what it guards against: a shipped file that prunes while the
    benchmark measured no pruner (as the shipped files did until they were mended)."""
    text = (peers.REPO / "studies" / "quickstart.toml").read_text()
    path = tmp_path / "pruned.toml"
    path.write_text(text.replace('pruner = "none"', 'pruner = "percentile"', 1))
    assert _differences(load_spec(path), _measured(tmp_path)) == [
        "[optuna] pruner: 'percentile' shipped, 'none' measured"
    ]
