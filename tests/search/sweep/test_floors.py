"""The floors of the search package: imports point down, and each job has one home."""

from __future__ import annotations

import ast
from pathlib import Path

SEARCH = Path(__file__).resolve().parents[3] / "search"
# What the workers' floor must not know: networks, objectives, stages, study meaning.
ABOVE_WORKERS = (
    "model",
    "search.sweep.objective",
    "search.sweep.user_train",
    "search.sweep.builtin",
    "search.sweep.stage",
    "search.sweep.studies",
    "search.sweep.narrowing",
    "search.sweep.replicates",
    "search.sweep.grid",
    "search.sweep.retrain",
    "search.config.space",
    "search.config.experiment",
    "search.reporting",
)


def _imports(path: Path) -> set[str]:
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
            names |= {f"{node.module}.{a.name}" for a in node.names}
        elif isinstance(node, ast.Import):
            names |= {a.name for a in node.names}
    return names


# Below every floor: the exception a command says as a usage error (exit 2), no network.
BELOW_ALL = "model.errors"


def test_the_workers_floor_imports_no_network_objective_or_stage():
    for path in sorted((SEARCH / "sweep" / "workers").glob("*.py")):
        bad = {
            name
            for name in _imports(path)
            if any(name == a or name.startswith(a + ".") for a in ABOVE_WORKERS)
            and not (name == BELOW_ALL or name.startswith(BELOW_ALL + "."))
        }
        assert not bad, f"{path.name} imports {sorted(bad)}"


def test_no_floor_below_reporting_imports_matplotlib_or_the_commands():
    commands = {"search.cli", "search.coarse", "search.fine", "search.final", "search.worker"}
    for path in sorted((SEARCH / "sweep").rglob("*.py")) + sorted(
        (SEARCH / "config").glob("*.py")
    ):
        names = _imports(path)
        assert not {n for n in names if n.startswith("matplotlib")}, path
        assert not names & commands, f"{path} imports a command"


def test_one_stage_driver_every_command_that_trains_calls_it():
    for command in ("coarse.py", "fine.py", "worker.py"):
        text = (SEARCH / command).read_text()
        assert "run_workers" not in text and "replicate_rounds" not in text, command
        assert "stage" in text, command
    grid = (SEARCH / "sweep" / "grid.py").read_text()
    assert "run_workers" not in grid and "from search.sweep.stage import drive" in grid


def test_one_objective_for_every_network():
    sources = "\n".join(p.read_text() for p in (SEARCH / "sweep").glob("*.py"))
    assert "class UserObjective" not in sources and "def fit_and_record" not in sources
    assert sources.count("class Objective") == 1
