"""optuna-dashboard, started for real, reads a coarse study from SQLite through its JSON API.

``run_dashboard(url)`` and ``get_json`` live in ``tests/search/conftest.py``.
"""

from __future__ import annotations

import urllib.error
import urllib.request

import optuna
import pytest

from search import coarse
from search.config.study import load_spec
from tests.search.conftest import get_json, run_dashboard, write_study

# One worker runs this module: its module-scoped fixture is built once.
pytestmark = pytest.mark.xdist_group("dashboard")


@pytest.fixture(scope="module")
def coarse_study(tmp_path_factory):
    path = write_study(
        tmp_path_factory.mktemp("dashboard"),
        "dash",
        coarse={"trials": 4, "replicates": 1},
        training={"n_cycles": 1},
        optuna={"workers": 1, "n_startup_trials": 1},
    )
    assert coarse.main(["--study", str(path)]) == 0
    return load_spec(path)


def test_dashboard_reads_the_study(coarse_study):
    url = coarse_study.storage_url()
    study = optuna.load_study(study_name="dash-coarse", storage=url)
    db_trials = study.get_trials()
    with run_dashboard(url) as base:
        summaries = get_json(f"{base}/api/studies")["study_summaries"]
        by_name = {s["study_name"]: s for s in summaries}
        assert "dash-coarse" in by_name
        assert by_name["dash-coarse"]["directions"] == ["maximize"]
        detail = get_json(f"{base}/api/studies/{by_name['dash-coarse']['study_id']}")
    assert detail["name"] == "dash-coarse"
    trials = detail["trials"]
    assert len(trials) == len(db_trials) == 4
    assert sorted(t["number"] for t in trials) == [t.number for t in db_trials]
    assert detail["has_intermediate_values"] is True
    for t, db in zip(sorted(trials, key=lambda t: t["number"]), db_trials, strict=True):
        assert t["state"] == db.state.name.capitalize()
        steps = [v["step"] for v in t["intermediate_values"]]
        assert steps and steps == sorted(db.intermediate_values)
        assert {p["name"] for p in t["params"]} == {"l2_lambda", "eta_max"}
        for p in t["params"]:
            assert p["distribution"]["type"] == "FloatDistribution"
            assert p["distribution"]["log"] is True
    space = {p["name"]: p["distribution"] for p in detail["union_search_space"]}
    assert set(space) == {"l2_lambda", "eta_max"} and all(d["log"] for d in space.values())
    attrs = {a["key"] for a in detail["user_attrs"]}
    assert {"ranges", "target", "data_checksum"} <= attrs
    assert detail["objective_names"] == ["val_acc"]  # not "Objective 0"
    for t in trials:  # the trial view lists these: short values, no page of curves
        shown = {a["key"]: a["value"] for a in t["user_attrs"]}
        assert {"wall_time", "epochs_run", "diverged"} <= set(shown) and "curves" not in shown
        assert all(len(str(v)) < 200 for v in shown.values()), shown


def test_run_dashboard_stops_the_server(coarse_study):
    with run_dashboard(coarse_study.storage_url()) as base:
        assert get_json(f"{base}/api/meta")
    with pytest.raises(urllib.error.URLError):
        get_json(f"{base}/api/meta", timeout=2.0)
