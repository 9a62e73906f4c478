"""What a pip install gets: every package, the shipped study files, the c2f command."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]


def test_the_package_list_holds_every_package():
    """pyproject lists the packages (search.studies is mapped onto studies/): a new package
    left out of the list would be missing from every installed copy."""
    setuptools = pytest.importorskip("setuptools")
    listed = set(
        tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    )
    found = set(setuptools.find_packages(str(REPO), include=["model*", "search*"]))
    assert found <= listed and listed - found == {"search.studies", "search.studies.experiments"}


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    """A wheel built from a copy of the checkout, offline (no build isolation)."""
    pytest.importorskip("setuptools")
    src = tmp_path_factory.mktemp("src")
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    ignore = shutil.ignore_patterns("__pycache__", "*.db", "*.db-*", "*.log", "out", "cache")
    for name in ("model", "search", "studies"):
        shutil.copytree(REPO / name, src / name, ignore=ignore)
    out = tmp_path_factory.mktemp("dist")
    code = (
        "import sys; from setuptools import build_meta; "
        f"print(build_meta.build_wheel({str(out)!r}))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=src, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return zipfile.ZipFile(out / done.stdout.strip().splitlines()[-1])


def test_a_wheel_holds_the_study_files_and_the_c2f_command(wheel):
    names = set(wheel.namelist())
    shipped = sorted(p.relative_to(REPO / "studies") for p in (REPO / "studies").rglob("*.toml"))
    assert len(shipped) == 10
    for rel in shipped:
        assert f"search/studies/{rel.as_posix()}" in names, rel
        assert (
            wheel.read(f"search/studies/{rel.as_posix()}") == (REPO / "studies" / rel).read_bytes()
        )
    assert "search/c2f.py" in names and "model/train.py" in names
    entry_points = next(n for n in names if n.endswith(".dist-info/entry_points.txt"))
    assert "c2f = search.c2f:main" in wheel.read(entry_points).decode()
    assert not [n for n in names if n.endswith(".db") or n.startswith("tests/")]
