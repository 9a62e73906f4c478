"""The dashboard note: each stage tells the service's choice where optuna-dashboard shows it.

``run_dashboard(url)`` and ``get_json`` live in ``tests/search/conftest.py``.
"""

from __future__ import annotations

import contextlib
import io
import sys

import optuna
import optuna_dashboard
import pytest
from optuna.distributions import FloatDistribution
from optuna.storages import InMemoryStorage
from optuna.trial import create_trial

from search import cli, coarse, final, fine
from search.config import space as sp
from search.config.study import load_spec
from search.reporting import note
from search.reporting.tables import narrowing_text
from search.sweep import replicates as rep
from search.sweep import studies as st
from search.sweep.retrain import describe_accs
from search.sweep.workers.storage import make_storage
from tests.search.conftest import get_json, run_dashboard, write_study

# One worker runs this module: its module-scoped fixture is built once.
pytestmark = pytest.mark.xdist_group("note")

# One cycle a stage: these tests are about what the note says, not how well it trains.
FAST = {"n_cycles": 1, "evals_per_cycle": 4}


def _study_file(directory, name: str, **sections):
    return write_study(
        directory,
        name,
        training=FAST,
        optuna={"workers": 1, "n_startup_trials": 2, "pruner": "none"},
        **sections,
    )


def _run(main, path, *flags: str) -> str:
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main(["--study", str(path), *flags]) == 0
    return out.getvalue()


def _next_line(out: str) -> str:
    return next(line for line in out.splitlines() if line.startswith("next: "))[len("next: ") :]


@pytest.fixture(scope="module")
def stages(tmp_path_factory):
    """coarse, fine and final on one replicated study; each stage's output and note."""
    path = _study_file(
        tmp_path_factory.mktemp("note"),
        "nt",
        coarse={"trials": 6, "replicates": 2},
        fine={"trials": 4, "top_k": 2, "replicates": 2, "training": {"n_cycles": 1}},
        final={"seeds": 2, "training": {"n_cycles": 1}},
    )
    spec = load_spec(path)
    got = {"spec": spec}
    for stage, main in (("coarse", coarse.main), ("fine", fine.main)):
        out = _run(main, path)
        got[stage] = (out, optuna_dashboard.get_note(st.load_existing(spec, stage)))
    out = _run(final.main, path)
    got["final"] = (out, optuna_dashboard.get_note(st.load_existing(spec, "fine")))
    return got


def test_the_coarse_note_names_the_chosen_configuration_its_n_and_the_next_command(stages):
    spec = stages["spec"]
    out, text = stages["coarse"]
    study = st.load_existing(spec, "coarse")
    chosen = rep.study_configurations(study, spec.coarse.replicates)[0]
    assert chosen.n == 2
    assert f"**Chosen: configuration {chosen.number}**" in text
    assert f"**{chosen.describe()}**" in text and "(n=2)" in chosen.describe()
    for name, value in chosen.params.items():
        assert f"| {name.replace('l2_', '')} | {sp.table_value(value)} |" in text
    assert "**Noise:** the sd of one run over seeds is" in text
    # The command the stage printed on its next: line, the same text.
    assert _next_line(out) == f"{cli.command('fine')} --study {spec.path}"
    assert f"```\n{_next_line(out)}\n```" in text


def test_the_fine_note_carries_the_ranges_and_why(stages):
    spec = stages["spec"]
    out, text = stages["fine"]
    study = st.load_existing(spec, "fine")
    attrs = study.user_attrs
    assert attrs["narrowing"]["sigma"] is not None  # the coarse stage was replicated
    assert narrowing_text(attrs) in text  # the narrowing's sigma, notes and extensions
    assert f"{attrs['narrowing']['sigma']:.4f}" in text
    for name, r in sp.from_record(attrs["ranges"]).items():
        label = name.replace("l2_", "")
        assert f"| {label} | {r.describe()} | {spec.search[name].describe()} |" in text
    chosen = rep.study_configurations(study, spec.fine.replicates)[0]
    assert f"**Chosen: configuration {chosen.number}**" in text
    assert f"```\n{_next_line(out)}\n```" in text and "search.final" in _next_line(out)


def test_the_final_note_gives_the_test_accuracy_over_seeds_on_the_study_it_chose_from(stages):
    spec = stages["spec"]
    out, text = stages["final"]
    result = st.load_existing(spec, "fine").user_attrs["final"]
    assert len(result["test_accs"]) == 2
    assert f"**test accuracy {describe_accs(result['test_accs'])}**" in text
    assert f"**Chosen: configuration {result['configuration']}** (retrained by final)" in text
    assert "### Fine ranges" in text  # the fine study's note, kept whole
    assert f"```\n{_next_line(out)}\n```" in text and "search.report" in _next_line(out)


def test_the_dashboard_serves_the_note_on_the_study_page(stages):
    spec = stages["spec"]
    with run_dashboard(spec.storage_url()) as base:
        summaries = get_json(f"{base}/api/studies")["study_summaries"]
        ids = {s["study_name"]: s["study_id"] for s in summaries}
        served = {
            stage: get_json(f"{base}/api/studies/{ids[st.study_name(spec, stage)]}")["note"]
            for stage in ("coarse", "fine")
        }
    assert served["coarse"]["body"] == stages["coarse"][1]
    assert served["fine"]["body"] == stages["final"][1]
    # Other code that reads the study still sees only its own attrs.
    study = st.load_existing(spec, "coarse")
    assert not any(k.startswith("dashboard:") for k in study.user_attrs)


def test_a_resumed_stage_replaces_the_note_rather_than_adding_to_it(tmp_path):
    path = _study_file(tmp_path, "rs", coarse={"trials": 3, "replicates": 1})
    spec = load_spec(path)
    _run(coarse.main, path)
    first = optuna_dashboard.get_note(st.load_existing(spec, "coarse"))
    out = _run(coarse.main, path, "--trials", "6")
    study = st.load_existing(spec, "coarse")
    second = optuna_dashboard.get_note(study)
    assert "from 3 configuration(s), 3 completed run(s)" in first
    assert "from 6 configuration(s), 6 completed run(s)" in second
    assert second.count("## Coarse search") == 1 and second.count("### Next") == 1
    assert second == note.study_note(study, replicates=1, next_command=_next_line(out))
    # A shorter note leaves no tail of the longer one behind.
    assert note.write_note(study, "short")
    assert optuna_dashboard.get_note(study) == "short"


def _config(study, params: dict, values: list[float]) -> None:
    dist = {k: FloatDistribution(1e-5, 1.0, log=True) for k in params}
    for i, value in enumerate(values):
        study.add_trial(
            create_trial(
                params=params, distributions=dist, value=value, user_attrs={"replicate": i}
            )
        )


def test_the_note_says_why_the_dashboards_best_run_is_not_the_choice():
    study = optuna.create_study(direction="maximize", study_name="why-coarse")
    _config(study, {"l2_lambda": 1e-3}, [0.95, 0.96, 0.97])  # configuration 0: 0.96, n=3
    _config(study, {"l2_lambda": 1e-2}, [0.99, 0.90, 0.89])  # 3: the best run, mean 0.9267
    _config(study, {"l2_lambda": 1e-1}, [0.985])  # 6: one lucky seed
    text = note.study_note(study, replicates=3, next_command=None)
    assert study.best_trial.number == 3
    assert "**Chosen: configuration 0**" in text and "**0.9600 +- 0.0100 (n=3)**" in text
    assert 'The dashboard\'s "Best Trial" is trial 3 (0.9900, one run)' in text
    assert (
        "its configuration 3 has val acc 0.9267 +- 0.0551 (n=3), below the chosen mean 0.9600"
        in text
    )
    # Without that run, the best is the lucky single seed, ranked after the means of 3.
    study = optuna.create_study(direction="maximize", study_name="lucky-coarse")
    _config(study, {"l2_lambda": 1e-3}, [0.95, 0.96, 0.97])
    _config(study, {"l2_lambda": 1e-1}, [0.985])
    text = note.study_note(study, replicates=3, next_command=None)
    assert "has val acc 0.9850 (n=1): it was run with 1 seed(s) and the chosen one with 3" in text
    assert "### Next" not in text


@pytest.mark.parametrize(
    "choose, moved, said",
    [
        ("smoothed", None, "final chose the best smoothed over neighbouring configurations (0."),
        ("model", None, "final chose the best predicted by the model of the landscape (0.9561) ("),
        ("robust", "note: chose", "the one furthest from the search's diverged runs ([final]"),
        ("robust", None, "the best prediction of the model of the landscape (0.9561) ([final]"),
        ("best", None, 'final chose the best mean over seeds ([final] choose = "best")'),
        (None, None, "final chose by its predicted value (0.9561) (a result that does not say"),
    ],
)
def test_the_final_note_names_the_rule_final_chose_by(choose, moved, said):
    study = optuna.create_study(direction="maximize", study_name="smooth-fine")
    _config(study, {"l2_lambda": 1e-3}, [0.95, 0.96, 0.97])  # the best mean: configuration 0
    _config(study, {"l2_lambda": 1e-2}, [0.99, 0.90, 0.89])  # the best run: trial 3
    _config(study, {"l2_lambda": 2e-3}, [0.955, 0.95, 0.96])  # final's choice: 6
    result = {
        "configuration": 6,
        "choose": choose,
        "kept_off_the_edge": moved,
        "search_val_acc": {"mean": 0.955, "sd": 0.005, "n": 3, "smoothed": 0.9561},
        "test_accs": [0.96, 0.97],
        "seeds": [0, 1],
        "split": {"train": 1397, "train_from_val": 200, "test": 300},
    }
    text = note.study_note(
        study, replicates=3, next_command="python -m search.report", final=result
    )
    assert "**Chosen: configuration 6** (retrained by final)" in text
    assert "**test accuracy 0.9650 +- 0.0071 (n=2)**" in text
    assert said in text


def test_a_note_of_a_study_whose_best_run_is_the_choice_says_so():
    study = optuna.create_study(direction="maximize", study_name="same-coarse")
    _config(study, {"l2_lambda": 1e-3}, [0.97, 0.96])
    _config(study, {"l2_lambda": 1e-2}, [0.965, 0.96])
    text = note.study_note(study, replicates=2, next_command="python -m search.fine")
    assert "is trial 0 (0.9700, one run): a run of the chosen configuration." in text
    assert "1 other configuration(s) are within one standard error" in text


def test_the_note_is_replaced_whole_on_every_storage_kind(any_storage_url):
    study = optuna.create_study(
        storage=make_storage(any_storage_url), study_name="kinds-coarse", direction="maximize"
    )
    long = "## the first note\n\n" + "x" * 5000  # several system attrs of 2045 characters
    assert note.write_note(study, long)
    assert note.write_note(study, "## the second note")
    again = optuna.load_study(study_name="kinds-coarse", storage=make_storage(any_storage_url))
    assert optuna_dashboard.get_note(again) == "## the second note"
    assert again.user_attrs == {}  # the note is no user attr: tables and status never see it


class RefusingStorage(InMemoryStorage):
    def set_study_system_attr(self, study_id, key, value):
        raise RuntimeError("attempt to write a readonly database")


def test_a_refused_note_is_one_warning_line_and_never_an_error():
    study = optuna.create_study(storage=RefusingStorage(), study_name="ro-coarse")
    said: list[str] = []
    assert note.write_note(study, "text", warn=said.append) is False
    assert said == [
        "warning: no dashboard note on ro-coarse: the storage refused it (RuntimeError: "
        "attempt to write a readonly database); the results are stored"
    ]


def test_a_stage_without_optuna_dashboard_still_succeeds_and_says_so(
    tmp_path, monkeypatch, capsys
):
    monkeypatch.setitem(sys.modules, "optuna_dashboard", None)  # import fails
    path = _study_file(tmp_path, "nd", coarse={"trials": 2, "replicates": 1})
    assert coarse.main(["--study", str(path)]) == 0
    captured = capsys.readouterr()
    assert captured.err.count("warning: no dashboard note") == 1
    assert "optuna-dashboard is not installed (pip install optuna-dashboard)" in captured.err
    assert captured.out.rstrip().splitlines()[-1].startswith("next: ")
