"""The DD2424 experiments as grid studies: every file runs, resumes, covers its grid, draws."""

from __future__ import annotations

import json
import shutil
import tomllib
from collections import Counter
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from search import experiment as ex
from search.config import experiment as cfg
from search.config.study import StudyDefinitionError
from search.reporting import experiment_figures as figures
from search.reporting import gradcheck
from search.sweep import grid as sweep
from search.sweep import studies as st
from search.sweep.objective import curves_of
from tests.conftest import check_axes
from tests.search.conftest import dump_toml

REPO = Path(__file__).resolve().parents[2]
EXPERIMENTS = REPO / "studies" / "experiments"
FILES = cfg.list_experiments(EXPERIMENTS)


def tiny_copy(source: Path, directory: Path, **sections) -> Path:
    """The experiment file in ``directory`` with a tiny training budget (and its DB there)."""
    doc = tomllib.loads(source.read_text())
    training = doc.setdefault("training", {})
    if training.get("schedule", "cyclical") == "cyclical":
        training |= {"n_cycles": 1, "evals_per_cycle": 2}
        if "n_s_epochs" in doc.get("experiment", {}):
            doc["experiment"]["n_s_epochs"] = 1
    else:
        training["n_epochs"] = 2
    training["train_eval_size"] = 200
    doc.setdefault("optuna", {})["workers"] = 1
    for section, values in sections.items():
        doc.setdefault(section, {}).update(values)
    path = directory / source.name
    path.write_text(dump_toml(doc))
    return path


def finished_trials(path: Path) -> tuple[cfg.Experiment, list[optuna.trial.FrozenTrial]]:
    experiment = cfg.load_experiment(path)
    study = optuna.load_study(
        study_name=experiment.study_name, storage=experiment.spec.storage_url()
    )
    return experiment, study.get_trials(deepcopy=False)


def test_the_five_experiments_are_shipped():
    names = {p.stem for p in FILES}
    assert {"bn_vs_none", "sensitivity_init", "lambda_bn", "momentum_decay", "overfit"} <= names
    for path in FILES:
        experiment = cfg.load_experiment(path)
        assert experiment.spec.data.name == "digits", f"{path.name} must run offline by default"
        assert len(experiment.points()) >= 2


def test_bn_vs_none_has_the_assignment_grid_and_n_s():
    experiment = cfg.load_experiment(EXPERIMENTS / "bn_vs_none.toml")
    hidden = {tuple(p["hidden"]) for p in experiment.points()}
    assert hidden == {(50, 50), (50, 30, 20, 20, 10, 10, 10, 10)}
    assert {p["batch_norm"] for p in experiment.points()} == {True, False}
    point = experiment.points()[0]
    # n_s = 5 * 45000 / 100 on full CIFAR-10, whatever the file's default data.
    assert experiment.train_config(point, 45000, seed=0).n_s == 2250
    assert experiment.train_config(point, 45000, seed=0).l2_lambda == 0.005


@pytest.mark.parametrize("source", FILES, ids=[p.stem for p in FILES])
def test_every_experiment_runs_covers_its_grid_and_draws(source, tmp_path, capsys, saved_figures):
    path = tiny_copy(source, tmp_path)
    assert ex.main([str(path)]) == 0
    experiment, trials = finished_trials(path)
    assert all(t.state in (TrialState.COMPLETE, TrialState.PRUNED) for t in trials)
    keys = Counter(sweep.params_key(t.params) for t in trials)
    expected = {sweep.params_key(experiment.params(p)) for p in experiment.points()}
    assert set(keys) == expected and set(keys.values()) == {1}, "one trial per grid point"
    for t in trials:
        assert {"wall_time", "epochs_run", "diverged"} <= set(t.user_attrs) and curves_of(t)
        if t.state == TrialState.COMPLETE:
            assert 0.0 <= t.user_attrs["test_acc"] <= 1.0
    section, paths = figures.draw(path, tmp_path / "out")
    assert section.startswith("### ") and "test acc" in section
    assert section.count("\n| ") == len(expected) + 1  # header + one row per point
    assert paths and all(p.suffix == ".png" and p.stat().st_size > 10_000 for p in paths)
    assert "| " in capsys.readouterr().out
    for p in paths:
        fig = saved_figures[p.name]
        check_axes(fig)
        assert fig._suptitle is not None and fig._suptitle.get_text()
        for ax in fig.axes:
            if "λ" in ax.get_xlabel():
                assert ax.get_xscale() == "log", ax.get_title()
    if experiment.kind == "lambda":
        assert sum(ax.get_xscale() == "log" for ax in saved_figures[paths[0].name].axes) == 2


def test_rerun_trains_nothing_and_a_larger_grid_only_the_new_points(tmp_path, capsys):
    path = tiny_copy(EXPERIMENTS / "momentum_decay.toml", tmp_path, grid={"rho": [0.0, 0.9]})
    assert ex.main([str(path)]) == 0
    _, first = finished_trials(path)
    assert len(first) == 2
    capsys.readouterr()
    assert ex.main([str(path)]) == 0
    assert "0 newly queued" in capsys.readouterr().out
    _, second = finished_trials(path)
    assert [(t.number, t.datetime_complete) for t in second] == [
        (t.number, t.datetime_complete) for t in first
    ]
    tiny_copy(EXPERIMENTS / "momentum_decay.toml", tmp_path, grid={"rho": [0.0, 0.5, 0.9]})
    assert ex.main([str(path)]) == 0
    assert "1 newly queued" in capsys.readouterr().out
    _, third = finished_trials(path)
    assert sorted(t.params["rho"] for t in third) == [0.0, 0.5, 0.9]


def test_a_changed_grid_runs_its_new_points(tmp_path, capsys):
    path = tiny_copy(EXPERIMENTS / "momentum_decay.toml", tmp_path, grid={"rho": [0.0, 0.9]})
    assert ex.main([str(path)]) == 0
    # Other values now: the two finished points are no longer in the grid.
    tiny_copy(EXPERIMENTS / "momentum_decay.toml", tmp_path, grid={"rho": [0.5, 0.99]})
    assert ex.main([str(path)]) == 0
    _, trials = finished_trials(path)
    assert sorted(t.params["rho"] for t in trials if t.state in st.FINISHED) == [
        0.0,
        0.5,
        0.9,
        0.99,
    ]


def test_a_failed_point_is_queued_again(tmp_path):
    path = tiny_copy(EXPERIMENTS / "overfit.toml", tmp_path, grid={"batch_norm": [False]})
    experiment = cfg.load_experiment(path)
    study = sweep.open_study(experiment)
    study.add_trial(
        optuna.create_trial(
            state=TrialState.FAIL,
            params={"batch_norm": False},
            distributions=experiment.distributions(),
        )
    )
    assert sweep.queue_grid(study, experiment) == 1
    assert sweep.queue_grid(study, experiment) == 0  # queued once, not twice


def test_two_workers_share_the_grid_without_duplicates(tmp_path):
    path = tiny_copy(EXPERIMENTS / "sensitivity_init.toml", tmp_path, grid={"sigma": [0.1, 1e-3]})
    assert ex.main([str(path), "--workers", "2"]) == 0
    experiment, trials = finished_trials(path)
    assert len(trials) == len(experiment.points()) == 4
    assert len({sweep.params_key(t.params) for t in trials}) == 4


def test_overfit_reaches_high_training_accuracy_on_100_digits(tmp_path):
    path = tmp_path / "overfit.toml"
    shutil.copy(EXPERIMENTS / "overfit.toml", path)
    assert ex.main([str(path)]) == 0
    _, trials = finished_trials(path)
    assert trials and all(t.state == TrialState.COMPLETE for t in trials)
    for t in trials:
        assert t.user_attrs["n_train"] == 100
        assert curves_of(t)["train_acc"][-1] > 0.95, t.params


def test_a_diverged_run_is_recorded_and_drawn(tmp_path):
    path = tiny_copy(
        EXPERIMENTS / "momentum_decay.toml",
        tmp_path,
        grid={"rho": [0.0, 0.99]},
        training={"eta": 50.0, "decay": 1.0},
    )
    assert ex.main([str(path)]) == 0
    _, trials = finished_trials(path)
    assert [t.user_attrs["diverged"] for t in trials] == [True, True]
    assert all(t.state == TrialState.PRUNED for t in trials)
    section, paths = figures.draw(path, tmp_path / "out")
    assert "**yes**" in section and paths[0].exists()


def test_draw_before_running_raises_and_creates_no_database(tmp_path):
    path = tiny_copy(EXPERIMENTS / "bn_vs_none.toml", tmp_path)
    with pytest.raises(LookupError, match="has not been run: python -m search.experiment"):
        figures.draw(path, tmp_path / "out")
    other = f"sqlite:///{tmp_path / 'other.db'}"
    with pytest.raises(LookupError, match=f"search.experiment {path} --storage {other}$"):
        figures.draw(path, tmp_path / "out", storage=other)  # the hint keeps the flag
    assert not list(tmp_path.glob("*.db"))
    # A study that exists but has no finished trial is not drawn either.
    experiment = cfg.load_experiment(path)
    sweep.queue_grid(sweep.open_study(experiment), experiment)
    with pytest.raises(LookupError):
        figures.draw(path, tmp_path / "out")


def test_data_and_n_s_overrides(tmp_path, capsys):
    path = tiny_copy(EXPERIMENTS / "overfit.toml", tmp_path, grid={"batch_norm": [False]})
    # overfit trains with the constant schedule, which does not read n_s
    assert ex.main([str(path), "--n-val", "200", "--n-s", "7"]) == 2
    assert "--n-s 7: no point of" in capsys.readouterr().err
    assert ex.main([str(path), "--n-val", "200"]) == 0
    assert "(100 train / 200 val / 300 test)" in capsys.readouterr().out
    experiment = cfg.load_experiment(path, data={"n_val": 200})
    assert experiment.spec.data.n_val == 200
    cyclical = tiny_copy(EXPERIMENTS / "bn_vs_none.toml", tmp_path)
    experiment = cfg.load_experiment(cyclical, n_s=7)
    assert experiment.train_config(experiment.points()[0], 100, seed=0).n_s == 7
    # an n_train the data cannot hold: the file and its field named
    (tmp_path / "big").mkdir()
    big = tiny_copy(EXPERIMENTS / "overfit.toml", tmp_path / "big", experiment={"n_train": 10**5})
    assert ex.main([str(big)]) == 2
    assert "[experiment.n_train] n_train = 100000 exceeds the 1197 training samples" in (
        capsys.readouterr().err
    )
    # --split on data without splits would be ignored: refused, naming the flag
    assert ex.main([str(path), "--split", "batch1"]) == 2
    assert "--split batch1: only cifar10 has splits" in capsys.readouterr().err
    # A study refuses other data: runs on other data need their own database.
    assert ex.main([str(path), "--n-val", "250"]) == 2
    assert "--storage" in capsys.readouterr().err


def test_the_same_file_runs_on_the_cifar_subset(tmp_path, cifar_dir, capsys):
    path = tiny_copy(EXPERIMENTS / "bn_vs_none.toml", tmp_path, grid={"batch_norm": [True]})
    argv = [str(path), "--cifar", str(cifar_dir), "--n-val", "1017", "--n-s", "5"]
    assert ex.main(argv) == 0
    out = capsys.readouterr().out
    assert "data cifar10 (4068 train / 1017 val" in out
    _, trials = finished_trials(path)
    assert {t.user_attrs["config"]["n_s"] for t in trials} == {5}


@pytest.mark.parametrize(
    ("grid", "field"),
    [
        ({"momentum": [0.1]}, "grid.momentum"),
        ({"rho": []}, "grid.rho"),
        ({"rho": [0.5, 0.5]}, "grid.rho"),
        ({"hidden": [50, 50]}, "grid.hidden"),
        ({"rho": [0.5, 1.5]}, "grid"),  # rho must be < 1: checked per point
    ],
)
def test_bad_grids_name_the_field(tmp_path, grid, field):
    path = tiny_copy(EXPERIMENTS / "momentum_decay.toml", tmp_path)
    doc = tomllib.loads(path.read_text())
    doc["grid"] = grid
    path.write_text(dump_toml(doc))
    with pytest.raises(StudyDefinitionError) as info:
        cfg.load_experiment(path)
    assert info.value.field == field
    assert ex.main([str(path)]) == 2


def test_bad_experiment_table(tmp_path):
    path = tiny_copy(EXPERIMENTS / "lambda_bn.toml", tmp_path, experiment={"kind": "bars"})
    with pytest.raises(StudyDefinitionError, match="experiment.kind"):
        cfg.load_experiment(path)


def test_gradcheck_section_is_a_table_and_cached(tmp_path, monkeypatch):
    monkeypatch.setattr(gradcheck, "GRADCHECK_HIDDEN", {2: [6], 3: [6, 5]})
    section = gradcheck.gradcheck_section(tmp_path)
    assert "| network | BN | layer | W | b | gamma | beta |" in section
    assert section.count("\n| ") == 1 + (2 + 3) * 2  # header + a row per layer and BN
    assert (tmp_path / "gradcheck.json").exists()
    largest = float(section.rsplit("Largest relative error: ", 1)[1].split(".\n")[0])
    assert largest < 1e-5
    calls = []
    monkeypatch.setattr("model.gradcheck.check_network", lambda *a, **k: calls.append(1))
    assert gradcheck.gradcheck_section(tmp_path) == section
    assert not calls, "the cached errors are reused"
    # ... but not once the model code changed: the cache names the code it checked.
    cache = tmp_path / "gradcheck.json"
    saved = json.loads(cache.read_text())
    saved["settings"]["model_code"] = "0" * 16
    cache.write_text(json.dumps(saved))
    monkeypatch.setattr(
        "model.gradcheck.check_network", lambda *a, **k: calls.append(1) or {"W1": 0.5}
    )
    assert "Largest relative error: 5.0e-01" in gradcheck.gradcheck_section(tmp_path)
    assert len(calls) == 4


def test_report_all_draws_the_experiments_beside_the_study(tmp_path, capsys, monkeypatch):
    """``search.report --all`` for real: gradient checks, a run experiment, one not run yet."""
    from search import report

    monkeypatch.setattr(gradcheck, "GRADCHECK_HIDDEN", {2: [6], 3: [6, 5]})
    from tests.search.conftest import write_study

    exp_dir = tmp_path / "experiments"
    exp_dir.mkdir()
    ran = tiny_copy(EXPERIMENTS / "momentum_decay.toml", exp_dir, grid={"rho": [0.0, 0.9]})
    tiny_copy(EXPERIMENTS / "overfit.toml", exp_dir)
    assert ex.main([str(ran)]) == 0
    study = write_study(tmp_path, "qs")  # experiments/ beside it; its own study never ran
    out = tmp_path / "report"
    assert report.main(["--study", str(study), "--all", "--out", str(out)]) == 0
    md = (out / "report.md").read_text()
    assert md.index("Gradient check") < md.index("momentum_decay") < md.index("overfit")
    assert "| network | BN | layer | W | b | gamma | beta |" in md
    assert (out / "gradcheck.json").exists(), "the gradient check is cached beside the report"
    assert "Not run yet" in md and "search.experiment" in md
    pngs = [p for p in out.glob("momentum_decay*.png")]
    assert pngs and all(p.stat().st_size > 10_000 for p in pngs)
    for p in pngs:
        assert f"]({p.name})" in md, f"{p.name} is not linked from the report"
    missing_dir = ["--study", str(study), "--all", "--experiments-dir", str(tmp_path / "nope")]
    assert report.main([*missing_dir, "--out", str(out)]) == 2
    assert "--experiments-dir" in capsys.readouterr().err


def _settings(name: str):
    experiment = cfg.load_experiment(EXPERIMENTS / f"{name}.toml")
    points = experiment.points()
    configs = [experiment.train_config(p, 45000, seed=0) for p in points]
    nets = [experiment.spec_for(p).network for p in points]
    return experiment, points, configs, nets


def test_every_experiment_has_the_assignment_settings():
    # 2. batch norm vs none: cyclical 1e-5..1e-1, lambda 0.005, n_s 2250, 2 cycles.
    _, points, configs, nets = _settings("bn_vs_none")
    assert len(points) == 4
    for c in configs:
        assert (c.schedule, c.eta_min, c.eta_max) == ("cyclical", 1e-5, 1e-1)
        assert (c.l2_lambda, c.n_s, c.n_cycles, c.batch_size) == (0.005, 2250, 2, 100)
    # 3. sensitivity to initialisation: sigma in {1e-1, 1e-3, 1e-4} x batch norm, 2 cycles.
    _, points, configs, nets = _settings("sensitivity_init")
    assert sorted((n.sigma, n.batch_norm) for n in nets) == sorted(
        (s, bn) for s in (1e-1, 1e-3, 1e-4) for bn in (False, True)
    )
    assert all(n.init == "sigma" and n.hidden == (50, 50) for n in nets)
    assert all(c.n_cycles == 2 and c.l2_lambda == 0.005 and c.eta_max == 1e-1 for c in configs)
    # 4. lambda with and without batch norm: the same 8 log-spaced values in 1e-5..1e-1.
    _, points, configs, nets = _settings("lambda_bn")
    pairs = list(zip(configs, nets, strict=True))
    by_bn = {bn: sorted(c.l2_lambda for c, n in pairs if n.batch_norm == bn) for bn in (0, 1)}
    assert by_bn[0] == by_bn[1] and len(by_bn[1]) == 8
    assert by_bn[1] == pytest.approx(np.logspace(-5, -1, 8), rel=5e-3)
    # 5. momentum and decay: 2-layer, rho in {0, .5, .9, .99}, step decay 0.95 per epoch.
    _, points, configs, nets = _settings("momentum_decay")
    assert sorted(c.rho for c in configs) == [0.0, 0.5, 0.9, 0.99]
    assert all(len(n.hidden) == 1 for n in nets)
    for c in configs:
        assert (c.schedule, c.decay) == ("step", 0.95)
        schedule = c.make_schedule(45000)
        per_epoch = c.steps_per_epoch(45000)
        assert schedule.lr_at(per_epoch) == pytest.approx(c.eta * 0.95)
        assert schedule.lr_at(per_epoch - 1) == pytest.approx(c.eta)
    # 6. overfitting: 100 training images, no regularisation.
    experiment, points, configs, nets = _settings("overfit")
    assert experiment.n_train == 100 and all(c.l2_lambda == 0.0 for c in configs)


def test_cifar_holds_out_a_tenth_and_a_grid_that_cannot_run_fails_loudly(tmp_path, capsys):
    from tests.model.test_data import SIZES, _make_cifar_dir

    cifar = tmp_path / "cifar"
    _make_cifar_dir(cifar, "py")
    n_images = sum(n for name, n in SIZES.items() if name.startswith("data_batch"))
    args = ex.build_parser().parse_args(["x.toml", "--cifar", str(cifar)])
    assert ex.data_overrides(args)["n_val"] == n_images // 10
    args = ex.build_parser().parse_args(["x.toml", "--cifar", str(cifar), "--n-val", "5"])
    assert ex.data_overrides(args)["n_val"] == 5
    # Batches of 100 from 27 training images: refused before any run, naming the field.
    path = tiny_copy(EXPERIMENTS / "bn_vs_none.toml", tmp_path)
    assert ex.main([str(path), "--cifar", str(cifar)]) == 2
    err = capsys.readouterr().err
    assert "[training.batch_size] batch_size = 100 is larger than the training set (27" in err


# A diverged run recorded and drawn: the test of that name above (the suite's time budget).
@pytest.mark.slow
def test_diverged_and_blown_up_runs_stay_visible_and_do_not_squash_the_rest(
    tmp_path, saved_figures
):
    # eta_max 10: the 3-layer net without batch norm blows up (loss ~1e13, finite).
    path = tiny_copy(EXPERIMENTS / "bn_vs_none.toml", tmp_path, training={"eta_max": 10.0})
    assert ex.main([str(path)]) == 0
    _, paths = figures.draw(path, tmp_path / "out")
    fig = saved_figures[paths[0].name]
    loss_axes = [ax for ax in fig.axes if ax.get_title().endswith(": loss")]
    assert loss_axes
    for ax in loss_axes:
        assert ax.get_ylim()[1] <= 1.15 * figures.BLOWN_UP_LOSS  # the sound runs fill the panel
    blown = [ax for ax in loss_axes if any(t.get_text().startswith("blown-up") for t in ax.texts)]
    assert blown and any(line.get_marker() == "x" for ax in blown for line in ax.lines)

    # eta_max 50: without batch norm the runs diverge before their first evaluation.
    other = tmp_path / "lam"
    other.mkdir()
    path = tiny_copy(
        EXPERIMENTS / "lambda_bn.toml",
        other,
        grid={"l2_lambda": [1e-4, 1e-2], "batch_norm": [False, True]},
        training={"eta_max": 50.0},
    )
    assert ex.main([str(path)]) == 0
    section, paths = figures.draw(path, other / "out")
    assert "**yes**" in section and "e+" not in section.split("|")[0]
    acc = saved_figures[paths[0].name].axes[0]
    marks = [line for line in acc.lines if line.get_marker() == "x"]
    assert len(marks) == 1 and "diverged" in marks[0].get_label()
    assert sorted(marks[0].get_xdata()) == [1e-4, 1e-2]


def test_report_of_one_experiment_needs_no_study_file(tmp_path, monkeypatch):
    from search import report

    path = tiny_copy(EXPERIMENTS / "overfit.toml", tmp_path)
    assert ex.main([str(path)]) == 0
    monkeypatch.chdir(tmp_path)  # no studies/quickstart.toml here
    assert report.main(["--experiment", str(path)]) == 0
    out = tmp_path / "out" / "overfit"
    assert (out / "overfit.md").read_text().startswith("### ")
    assert (out / "overfit_overfit.png").stat().st_size > 10_000


def test_a_changed_categorical_grid_is_refused_with_the_fix(tmp_path, capsys):
    path = tiny_copy(EXPERIMENTS / "overfit.toml", tmp_path, grid={"batch_norm": [False]})
    assert ex.main([str(path)]) == 0
    tiny_copy(EXPERIMENTS / "overfit.toml", tmp_path, grid={"batch_norm": [False, True]})
    assert ex.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "[grid] batch_norm was" in err and "another database" in err


def test_an_experiment_run_again_after_its_settings_changed_is_refused(tmp_path, capsys):
    """Its old runs would be shown (and reported) as the edited file's."""
    source = EXPERIMENTS / "bn_vs_none.toml"
    path = tiny_copy(source, tmp_path)
    assert ex.main([str(path)]) == 0
    tiny_copy(source, tmp_path, training={"l2_lambda": 0.05})  # edited in place
    capsys.readouterr()
    assert ex.main([str(path)]) == 2
    err = capsys.readouterr().err
    assert "[training] l2_lambda = 0.05, but the trials of bn_vs_none-grid ran with 0.005" in err
    # what is measured along the way may change: the runs train the same
    tiny_copy(source, tmp_path, training={"train_eval_size": 300})
    assert ex.main([str(path)]) == 0
    # the experiment's own settings may not: its half-cycle is the runs' n_s
    tiny_copy(source, tmp_path, experiment={"n_s_epochs": 2}, training={"train_eval_size": 300})
    capsys.readouterr()
    assert ex.main([str(path)]) == 2
    assert "[experiment] n_s_epochs = 2" in capsys.readouterr().err


def test_a_study_file_given_as_an_experiment_is_refused_with_the_right_command(tmp_path, capsys):
    study = REPO / "studies" / "quickstart.toml"
    assert ex.main([str(study), "--storage", f"sqlite:///{tmp_path / 'x.db'}"]) == 2
    err = capsys.readouterr().err
    assert "a study file, not an experiment: run it with c2f coarse --study" in err
    assert not (tmp_path / "x.db").exists()  # nothing created
    plain = tmp_path / "plain.toml"
    plain.write_text('name = "p"\n[data]\nname = "digits"\n')
    assert ex.main([str(plain)]) == 2
    assert (
        "not an experiment file: it has no [grid] or [experiment] table" in capsys.readouterr().err
    )


def test_n_val_as_a_fraction_is_taken_as_by_the_other_commands():
    assert ex.build_parser().parse_args(["x.toml", "--n-val", "0.1"]).n_val == 0.1
    assert ex.build_parser().parse_args(["x.toml", "--n-val", "500"]).n_val == 500


def test_a_setting_no_point_of_the_grid_reads_is_refused(tmp_path):
    """A grid can vary what reads a setting (init, the schedule): sigma set in [network]
    is kept while some point draws with init = "sigma", and refused, with the fix, when
    no point does."""
    path = tiny_copy(EXPERIMENTS / "sensitivity_init.toml", tmp_path)
    doc = tomllib.loads(path.read_text())
    doc["grid"] = {"init": ["he", "sigma"]}
    doc["network"]["sigma"] = 1e-3
    del doc["network"]["init"]
    path.write_text(dump_toml(doc))
    assert {p["init"] for p in cfg.load_experiment(path).points()} == {"he", "sigma"}
    doc["grid"] = {"init": ["he", "xavier"]}
    path.write_text(dump_toml(doc))
    with pytest.raises(StudyDefinitionError) as info:
        cfg.load_experiment(path)
    assert info.value.field == "network.sigma"
    assert 'read only with init = "sigma"' in str(info.value)
    assert ex.main([str(path)]) == 2
    # a value the grid itself gives is named in [grid]
    doc["grid"] = {"eta": [0.01, 0.1]}  # the file's schedule is cyclical
    del doc["network"]["sigma"]
    path.write_text(dump_toml(doc))
    with pytest.raises(StudyDefinitionError) as info:
        cfg.load_experiment(path)
    assert info.value.field == "grid.eta" and "not read by the cyclical" in str(info.value)
