"""search.report: figures and report.md from a tiny quick-start coarse -> fine -> final."""

from __future__ import annotations

import json
import types
from pathlib import Path

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from search import coarse, final, fine, report
from search.config.study import load_spec
from search.reporting import figures, markdown
from search.sweep import replicates as rep
from search.sweep.grid import NotRun
from tests.search.conftest import write_study

# One worker runs this module: its module-scoped fixture is built once.
pytestmark = pytest.mark.xdist_group("report")

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
STAGE_FIGURES = ("val_acc_vs_l2_lambda", "val_acc_vs_eta_max", "history", "curves_coarse")


@pytest.fixture(scope="module")
def ran(tmp_path_factory) -> types.SimpleNamespace:
    """A tiny study: report after coarse only, then after coarse, fine and final."""
    root = tmp_path_factory.mktemp("report")
    path = write_study(
        root,
        "qs",
        coarse={"trials": 6, "replicates": 2, "replicate_top": 2},
        fine={
            "trials": 3,
            "top_k": 2,
            "replicates": 2,
            "replicate_top": 1,
            "training": {"n_cycles": 1},
        },
        # Two cycles: a trial can be pruned only at the end of its first (the pruner on).
        training={"n_cycles": 2},
        final={"seeds": 2, "training": {"n_cycles": 1}},
        optuna={"workers": 1, "n_startup_trials": 2, "pruner": "percentile"},
    )
    assert coarse.main(["--study", str(path)]) == 0
    coarse_out = root / "coarse_only"
    assert report.main(["--study", str(path), "--out", str(coarse_out)]) == 0
    assert fine.main(["--study", str(path)]) == 0
    assert final.main(["--study", str(path)]) == 0
    assert report.main(["--study", str(path)]) == 0  # default --out
    spec = load_spec(path)
    return types.SimpleNamespace(
        path=path, spec=spec, coarse_out=coarse_out, out=spec.out_dir() / "report"
    )


def _is_png(path: Path) -> bool:
    return path.read_bytes()[:8] == PNG_MAGIC


def test_figures_are_real_pngs(ran):
    names = [*STAGE_FIGURES, "curves_fine", "final_curves"]
    for name in names:
        png = ran.out / f"qs_{name}.png"
        assert png.exists(), png
        assert _is_png(png) and png.stat().st_size > 10_000, png
    # Before fine and final ran: coarse figures only.
    for name in STAGE_FIGURES:
        assert (ran.coarse_out / f"qs_{name}.png").stat().st_size > 10_000
    assert not (ran.coarse_out / "qs_curves_fine.png").exists()


def test_report_md_has_ranges_tables_counts_and_test_accuracy(ran):
    md = (ran.out / "report.md").read_text()
    result = json.loads((ran.spec.out_dir() / "final" / "result.json").read_text())
    coarse_study = optuna.load_study(study_name="qs-coarse", storage=ran.spec.storage_url())
    fine_study = optuna.load_study(study_name="qs-fine", storage=ran.spec.storage_url())
    assert md.startswith("# Report: qs")
    # Paths relative to the study file: the report does not say where the user's home is.
    assert "Study file `qs.toml`, storage `sqlite:///qs.db`" in md
    assert str(ran.path.parent) not in md
    assert "## Coarse search (`qs-coarse`)" in md and "## Fine search (`qs-fine`)" in md
    # ranges of each stage, as recorded on the studies
    for study in (coarse_study, fine_study):
        for lo, hi in study.user_attrs["ranges"].values():
            assert f"| float, log | {lo:.3e} .. {hi:.3e} |" in md
    # top-10 tables with the best trial first
    header = "| trial | val acc (mean) | sd | n | lambda | eta_max | epochs run | wall time (s) |"
    assert md.count(header) == 2
    # the best configuration first: mean +- sd over its 2 seeds (the study replicates)
    best = rep.study_configurations(coarse_study, 2)[0]
    assert best.n == 2
    lam = best.params["l2_lambda"]
    row = f"| {best.number} | {best.mean:.4f} | {best.sd:.4f} | 2 | {lam:.3e} |"
    assert row in md
    # counts per state and epochs: 6 search trials and the replicates of the best 2
    c = {s: 0 for s in markdown.STATES}
    for t in coarse_study.trials:
        c[t.state.name] += 1
    assert "| " + " | ".join(str(c[s]) for s in markdown.STATES) + " |" in md
    n_trials = sum(c.values())
    assert n_trials >= 6 + 2
    epochs = markdown.epochs_trained(coarse_study)
    n_ran = c["COMPLETE"] + c["PRUNED"] + c["FAIL"]  # no trial of this run was re-queued
    assert epochs > 0 and f"Epochs trained: {epochs:.1f} over {n_ran} trials that ran" in md
    # the final's wall time: its seeds' runs
    assert result["wall_time"] == round(sum(r["wall_time"] for r in result["runs"].values()), 2)
    # how fine narrowed, with the noise estimate
    # (by the model of the landscape, the default: its noise, not a pooled sd of replicates)
    assert "the model of the landscape predicts within noise of the best" in md
    assert "pooled over the replicated configurations" not in md
    # the final result over 2 seeds
    assert result["n_seeds"] == 2 and len(result["test_accs"]) == 2
    assert f"test accuracy **{result['test_acc']:.4f} +- {result['test_acc_sd']:.4f}" in md
    # the rule it was chosen by, the default
    assert (
        "kept off a cliff's edge among those alike within the seed noise: "
        '[final] choose = "robust"' in md
    )
    for name in ("history", "curves_coarse", "curves_fine", "final_curves"):
        assert f"(qs_{name}.png)" in md
    coarse_md = (ran.coarse_out / "report.md").read_text()
    assert "Not run yet: the fine search first (`python -m search.fine --study" in coarse_md
    assert "then `python -m search.final --study" in coarse_md and "Fine search" not in coarse_md


def test_the_settings_say_which_pruner_and_none_as_none(ran, tmp_path):
    md = (ran.out / "report.md").read_text()
    assert "Pruner `percentile` after 0.5 cycles" in md
    # what each stage spends on seeds, as set: replicates, and the quick start's race
    assert (
        "coarse: 2 seeds for its 2 best configurations (seed + 1000 i); fine: 2 seeds for "
        "its best configuration (seed + 1000 i); fine: its 3 best by the model race on "
        "shared extra seeds, 4 runs at most; final over 2 seeds" in md
    )
    spec = load_spec(write_study(tmp_path, "np", optuna={"pruner": "none"}))
    text = markdown.settings_section(spec, {})
    assert "No pruner: every trial trained to its end, sampler `tpe`." in text
    assert "Pruner `none`" not in text and "after 0.5 cycles" not in text
    assert "replicates 1 seeds" not in text and "(seed + 1000 i)" not in text
    spec = load_spec(write_study(tmp_path, "nr", fine={"race_runs": 0}))
    text = markdown.settings_section(spec, {})
    assert "one run a configuration in both search stages (no replicates, no race)" in text


def test_pruned_trials_are_placed_at_their_last_report():
    dist = {"l2_lambda": FloatDistribution(1e-5, 1e-1, log=True)}
    pruned = optuna.trial.create_trial(
        state=TrialState.PRUNED,
        params={"l2_lambda": 1e-3},
        distributions=dist,
        intermediate_values={10: 0.5, 30: 0.7, 20: 0.6},
    )
    complete = optuna.trial.create_trial(value=0.9, params={"l2_lambda": 1e-3}, distributions=dist)
    failed = optuna.trial.create_trial(state=TrialState.FAIL)
    assert figures.last_value(pruned) == 0.7
    assert figures.last_value(complete) == 0.9
    assert figures.last_value(failed) is None


def test_no_study_is_a_clear_error(tmp_path, capsys):
    path = write_study(tmp_path, "empty")
    assert report.main(["--study", str(path), "--out", str(tmp_path / "out")]) == 2
    err = capsys.readouterr().err
    assert "run python -m search.coarse" in err
    assert not (tmp_path / "empty.db").exists()  # reading never creates a database


def _fake_experiments(tmp_path: Path, calls: list, monkeypatch) -> None:
    """Two experiment files, one run and one not, and a quick gradient check, for markdown."""
    done, pending = tmp_path / "lr_range.toml", tmp_path / "bn_depth.toml"

    def draw(spec_path, out_dir, *, storage=None):
        calls.append((Path(spec_path), Path(out_dir), storage))
        if Path(spec_path) == pending:
            raise NotRun("bn_depth", "bn_depth.toml", None, command="c2f experiment")
        png = Path(out_dir) / f"{Path(spec_path).stem}.png"
        png.write_bytes(PNG_MAGIC)
        return f"## Experiment {Path(spec_path).stem}\n\nresult table\n", [png]

    monkeypatch.setattr(markdown, "draw_experiment", draw)
    monkeypatch.setattr(markdown, "list_experiments", lambda root: [done, pending])
    monkeypatch.setattr(
        markdown, "gradcheck_section", lambda out_dir=None: "## Gradient check\n\n| W1 | 1e-9 |\n"
    )


def test_experiment_flag_writes_its_markdown(tmp_path, monkeypatch, capsys):
    calls: list = []
    _fake_experiments(tmp_path, calls, monkeypatch)
    out = tmp_path / "out"
    spec_path = tmp_path / "lr_range.toml"
    argv = ["--experiment", str(spec_path), "--out", str(out), "--storage", "sqlite:///x.db"]
    assert report.main(argv) == 0
    assert calls == [(spec_path, out, "sqlite:///x.db")]
    assert (out / "lr_range.md").read_text().startswith("## Experiment lr_range")
    assert f"wrote {out / 'lr_range.png'}" in capsys.readouterr().out


# --all beside a study: test_experiment's report of every experiment (the time budget).
@pytest.mark.slow
def test_all_flag_combines_gradcheck_experiments_and_study(ran, tmp_path, monkeypatch):
    calls: list = []
    _fake_experiments(tmp_path, calls, monkeypatch)
    out = tmp_path / "all"
    assert (
        report.main(
            [
                "--study",
                str(ran.path),
                "--all",
                "--experiments-dir",
                str(tmp_path),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    md = (out / "report.md").read_text()
    order = [
        "## Gradient check",
        "## Experiment lr_range",
        "## Experiment `bn_depth`",
        "## Coarse search (`qs-coarse`)",
        "## Final result",
    ]
    positions = [md.index(h) for h in order]
    assert positions == sorted(positions)
    assert "Not run yet: `c2f experiment bn_depth.toml`" in md
    assert (out / "qs_history.png").stat().st_size > 10_000


def test_all_flag_without_a_study_still_writes_the_experiments(tmp_path, monkeypatch):
    _fake_experiments(tmp_path, [], monkeypatch)
    path = write_study(tmp_path, "notrun")
    assert (
        report.main(
            [
                "--study",
                str(path),
                "--all",
                "--experiments-dir",
                str(tmp_path),
                "--out",
                str(tmp_path / "o"),
            ]
        )
        == 0
    )
    md = (tmp_path / "o" / "report.md").read_text()
    assert "## Gradient check" in md and "Not run yet" in md and "search.coarse" in md


def test_figures_have_log_axes_labels_and_pruned_trials_apart(ran, tmp_path, saved_figures):
    from tests.conftest import check_axes

    assert report.main(["--study", str(ran.path), "--out", str(tmp_path)]) == 0
    assert {f"qs_{n}.png" for n in STAGE_FIGURES} <= set(saved_figures)
    for fig in saved_figures.values():
        check_axes(fig)
    for param in ("l2_lambda", "eta_max"):
        ax = saved_figures[f"qs_val_acc_vs_{param}.png"].axes[0]
        assert ax.get_xscale() == "log" and "log" in ax.get_xlabel()
        by_label = {c.get_label(): c for c in ax.collections}
        pruned = [c for label, c in by_label.items() if "pruned" in label]
        complete = [c for label, c in by_label.items() if "complete" in label]
        assert pruned and complete
        # Pruned trials are grey; completed ones are in colour.
        for c in pruned:
            r, g, b, _ = c.get_facecolor()[0]
            assert abs(r - g) < 0.05 and abs(g - b) < 0.05
        for c in complete:
            r, g, b, _ = c.get_facecolor()[0]
            assert max(r, g, b) - min(r, g, b) > 0.2


def test_the_fine_ranges_text_names_where_its_noise_came_from():
    from search.reporting.tables import narrowing_text

    base = {"sigma": 0.0093, "within": [1, 2], "extended": {}, "notes": []}
    attrs = {"top_k": 3, "margin": 0.5}
    by_model = narrowing_text({**attrs, "narrowing": {**base, "noise_from": "model"}})
    assert "the model's seed noise of one run is 0.0093" in by_model
    by_replicates = narrowing_text({**attrs, "narrowing": {**base, "noise_from": "replicates"}})
    assert "0.0093 pooled over the replicated configurations" in by_replicates
    assert narrowing_text({**attrs, "narrowing": base}) == by_replicates  # recorded before
