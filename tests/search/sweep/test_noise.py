"""Answers that are not seed luck: shared seeds, replicates, noise-aware fine ranges,
final over seeds on a checked split, and study files that fit the data."""

from __future__ import annotations

import contextlib
import io
import json
import math
import tomllib

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from search import coarse, final, fine
from search.config import space as sp
from search.config.study import StudyDefinitionError, load_spec
from search.sweep import narrowing
from search.sweep import replicates as rep
from search.sweep import studies as st
from search.sweep.objective import SEED_STRIDE, curves_of
from search.sweep.workers import lost
from search.sweep.workers.loop import take
from search.sweep.workers.storage import storage_of
from tests.search.conftest import REPO, dump_toml

DIST = {"l2_lambda": FloatDistribution(1e-5, 1e-1, log=True)}
# One cycle a stage: these tests are about what is chosen, not how well it trains.
FAST = {"n_cycles": 1, "evals_per_cycle": 4}


def _log(name: str, low: float, high: float) -> sp.Range:
    return sp.parse_range(name, [low, high])


@pytest.fixture
def quick_study(quick_study):
    """The quick start with one cycle in every stage (a test may still override it)."""

    def make(name: str = "qs", **sections):
        sections["training"] = {**FAST, **sections.get("training", {})}
        sections["fine"] = {"trials": 4, "top_k": 2, **sections.get("fine", {})}
        sections["final"] = {**sections.get("final", {})}
        for stage in ("fine", "final"):
            sections[stage].setdefault("training", {"n_cycles": 1})
        return quick_study(name, **sections)

    return make


def quiet(fn, *args):
    with contextlib.redirect_stdout(io.StringIO()) as out:
        code = fn(*args)
    return code, out.getvalue()


def _queued_coarse(quick_study, points, **sections):
    """A coarse study whose trials are ``points`` (queued before the command runs)."""
    sections.setdefault("optuna", {})["pruner"] = "none"
    path = quick_study(coarse={"trials": len(points)}, **sections)
    spec = load_spec(path)
    study = st.open_study(spec, "coarse")
    for p in points:
        study.enqueue_trial(p)
    code, _ = quiet(coarse.main, ["--study", str(path)])
    assert code == 0
    trials = sorted(st.open_study(spec, "coarse").get_trials(), key=lambda t: t.number)
    return spec, trials


def test_shared_seed_identical_params_give_identical_curves(quick_study):
    a, b = {"l2_lambda": 1e-3, "eta_max": 0.1}, {"l2_lambda": 3e-2, "eta_max": 0.1}
    _, trials = _queued_coarse(quick_study, [a, a, b])
    curves = [curves_of(t)["val_acc"] for t in trials]
    assert [t.user_attrs["seed"] for t in trials] == [0, 0, 0]
    assert curves[0] == curves[1]  # same params, same seed: the same run
    assert curves[0] != curves[2]  # only lambda differs, and so does the run


def test_per_trial_seed_mode_keeps_the_old_behaviour(quick_study):
    a = {"l2_lambda": 1e-3, "eta_max": 0.1}
    spec, trials = _queued_coarse(quick_study, [a, a], optuna={"seed_mode": "per_trial"})
    assert [t.user_attrs["seed"] for t in trials] == [0, 1]
    assert curves_of(trials[0]) != curves_of(trials[1])
    assert st.open_study(spec, "coarse").user_attrs["seed_mode"] == "per_trial"


def test_a_study_is_never_seeded_two_ways(quick_study, capsys):
    path = quick_study(coarse={"trials": 2})
    assert quiet(coarse.main, ["--study", str(path)])[0] == 0
    text = path.read_text().replace("[optuna]", '[optuna]\nseed_mode = "per_trial"')
    path.write_text(text)
    assert quiet(coarse.main, ["--study", str(path), "--trials", "3"])[0] == 2
    err = capsys.readouterr().err
    assert "[optuna.seed_mode]" in err and 'seed_mode = "shared" to resume it' in err


def test_replicates_rerun_the_best_configurations_with_other_seeds(quick_study):
    path = quick_study(coarse={"trials": 6, "replicates": 3, "replicate_top": 2})
    code, out = quiet(coarse.main, ["--study", str(path)])
    assert code == 0 and "replicates: the 2 best configurations get 3 seeds each" in out
    spec = load_spec(path)
    study = st.open_study(spec, "coarse")
    trials = study.get_trials()
    search = [t for t in trials if not rep.is_replicate(t)]
    replicas = [t for t in trials if rep.is_replicate(t)]
    assert len(search) == 6 and len(replicas) >= 4
    for t in replicas:
        index = t.user_attrs["replicate"]
        assert index in (1, 2) and t.user_attrs["seed"] == SEED_STRIDE * index
        assert t.state == TrialState.COMPLETE  # never pruned
        assert any(s.params == t.params for s in search)
    configs = rep.study_configurations(study, 3)
    assert configs[0].n == 3 and configs[1].n == 3  # the best two are means over 3 seeds
    assert configs[0].mean >= configs[1].mean
    assert "+-" in out and " n " in out  # the table shows mean +- sd and n
    # Run again: the target is met and every best configuration has its seeds.
    code, out = quiet(coarse.main, ["--study", str(path)])
    assert code == 0 and "replicates:" not in out
    assert len(st.open_study(spec, "coarse").get_trials()) == len(trials)


def test_a_lost_replicate_is_requeued_as_the_same_replicate(quick_study):
    spec = load_spec(quick_study())
    study = st.open_study(spec, "coarse")
    study.enqueue_trial({"l2_lambda": 1e-3, "eta_max": 0.1}, user_attrs={"replicate": 2})
    storage = storage_of(study)
    sid = storage.get_study_id_from_name(study.study_name)
    tid = take(storage, sid)
    assert lost.requeue(storage, sid, storage.get_trial(tid), "worker lost: test")
    waiting = study.get_trials(states=(TrialState.WAITING,))
    assert len(waiting) == 1 and waiting[0].user_attrs == {"replicate": 2}
    # and queue_replicates sees it: it queues nothing for that seed again
    assert rep.replicate_index(waiting[0]) == 2


def _config(lam: float, values: list[float], first: int) -> rep.Configuration:
    c = rep.Configuration({"l2_lambda": lam})
    for i, v in enumerate(values):
        c.trials.append(
            optuna.trial.create_trial(value=v, params={"l2_lambda": lam}, distributions=DIST)
        )
        c.trials[-1].number = first + i
    return c


def test_fine_covers_every_configuration_within_noise_not_just_the_top_k():
    configs = [
        _config(1e-3, [0.42, 0.43, 0.41], 0),  # best: 0.42, sd 0.01
        _config(3e-2, [0.415], 3),  # 0.005 below with n=1: within noise
        _config(1e-5, [0.30], 4),  # far below: outside
        _config(1e-4, [0.35], 5),
    ]
    n = narrowing.narrow(
        configs, {"l2_lambda": _log("l2_lambda", 1e-5, 1e-1)}, margin=0.0, top_k=1
    )
    assert n.sigma == pytest.approx(0.01)
    assert [c.number for c in n.within] == [0, 3]
    assert n.ranges["l2_lambda"].bounds == pytest.approx((1e-3, 3e-2))
    assert not n.flat and not n.extended
    # narrow = "top_k": the best single run only (no noise estimate)
    n = narrowing.narrow(
        configs, {"l2_lambda": _log("l2_lambda", 1e-5, 1e-1)}, margin=0.0, top_k=1, mode="top_k"
    )
    assert n.sigma is None and n.ranges["l2_lambda"].bounds == pytest.approx(
        (1e-3 / 1.01, 1.01e-3)
    )


def test_a_flat_landscape_keeps_the_range_wide_and_says_so():
    configs = [
        _config(1e-5, [0.41, 0.43], 0),
        _config(1e-3, [0.42, 0.40], 2),
        _config(5e-2, [0.40, 0.42], 4),
    ]
    n = narrowing.narrow(
        configs, {"l2_lambda": _log("l2_lambda", 1e-5, 1e-1)}, margin=0.25, top_k=1
    )
    assert n.flat == ["l2_lambda"] and len(n.within) == 3
    assert any("flat within noise" in note for note in n.notes)
    lo, hi = n.ranges["l2_lambda"].bounds
    assert math.log10(hi / lo) > 3
    # flat up to the lower edge: nothing says it is better past it, so no extension
    assert lo == pytest.approx(1e-5) and not n.extended


def test_the_best_on_an_edge_extends_the_range_past_it_within_the_limit():
    configs = [_config(1.2e-5, [0.45, 0.44], 0), _config(1e-2, [0.30, 0.31], 2)]
    coarse_range = {"l2_lambda": _log("l2_lambda", 1e-5, 1e-1)}
    n = narrowing.narrow(configs, coarse_range, margin=0.5, top_k=1, extend=0.3)
    lo, hi = n.ranges["l2_lambda"].bounds
    assert lo == pytest.approx(1e-5 / 10**0.3)  # as far as extend allows, not margin
    assert "below the coarse range's lower edge" in n.extended["l2_lambda"]
    # an extension the training settings cannot run is given up
    n = narrowing.narrow(
        configs, coarse_range, margin=0.5, top_k=1, valid=lambda p: p["l2_lambda"] >= 1e-5
    )
    assert (
        n.ranges["l2_lambda"].low == 1e-5
        and "kept at the coarse edge" in (n.extended["l2_lambda"])
    )


def test_fine_then_final_use_means_and_final_reports_over_seeds(quick_study, capsys):
    path = quick_study(
        coarse={"trials": 6, "replicates": 2, "replicate_top": 2},
        fine={"trials": 3, "top_k": 1, "replicates": 2, "replicate_top": 1, "narrow": "noise"},
        final={"seeds": 2, "holdout": 0.5, "choose": "best"},
    )
    spec = load_spec(path)
    assert quiet(coarse.main, ["--study", str(path)])[0] == 0
    code, out = quiet(fine.main, ["--study", str(path)])
    assert code == 0 and "within noise of it; seed noise (sd of one run)" in out
    f = st.open_study(spec, "fine")
    assert f.user_attrs["narrowing"]["sigma"] is not None
    configs = rep.study_configurations(f, 2)
    chosen = configs[0]
    assert chosen.n == 2  # the best mean is over 2 seeds
    smooth = next(v for c, v in rep.smoothed(configs) if c is chosen)
    code, out = quiet(final.main, ["--study", str(path)])
    assert code == 0
    result = json.loads((spec.out_dir() / "final" / "result.json").read_text())
    assert result["params"] == chosen.params and result["n_seeds"] == 2
    assert result["search_val_acc"]["n"] == chosen.n
    assert result["search_val_acc"]["smoothed"] == pytest.approx(smooth)
    assert result["test_acc"] == pytest.approx(sum(result["test_accs"]) / 2)
    assert result["test_acc_sd"] is not None
    # quick start: 1197 train + 300 val, holdout half of val (150)
    assert result["split"] == {"train": 1347, "train_from_val": 150, "holdout": 150, "test": 300}
    assert "trains on 1197 training + 150 validation images = 1347" in out
    assert "next: python -m search.report" in out


def test_an_interrupted_final_resumes_with_the_seeds_it_has_not_done(quick_study):
    path = quick_study(coarse={"trials": 2}, final={"seeds": 2})
    assert quiet(coarse.main, ["--study", str(path)])[0] == 0
    assert quiet(final.main, ["--study", str(path), "--seeds", "1"])[0] == 0
    code, out = quiet(final.main, ["--study", str(path)])  # 2 seeds: the first is kept
    assert code == 0 and "seed 0: recorded" in out and "seed 1: test accuracy" in out
    code, out = quiet(final.main, ["--study", str(path)])
    assert code == 0 and "already recorded" in out


def test_an_interrupted_final_says_its_seeds_are_kept_not_trials(quick_study, capsys, monkeypatch):
    import signal as signals

    from search.sweep.workers.signals import Interrupted

    path = quick_study(coarse={"trials": 2})
    assert quiet(coarse.main, ["--study", str(path)])[0] == 0

    def stopped(*args, **kwargs):
        raise Interrupted(signals.SIGINT)

    monkeypatch.setattr(final, "retrain", stopped)
    capsys.readouterr()
    assert final.main(["--study", str(path)]) == 130
    err = capsys.readouterr().err
    assert "interrupted (SIGINT): finished seeds are stored. Run the same" in err, err
    assert "re-queued" not in err
    # with --force, the same command would train every seed again
    assert final.main(["--study", str(path), "--force"]) == 130
    err = capsys.readouterr().err
    assert "finished seeds are stored: run it again without --force to go on from them" in err
    assert "Run the same command" not in err


def test_a_holdout_larger_than_val_is_refused_not_clipped(quick_study, capsys):
    path = quick_study(final={"holdout": 300})  # val has 300 images
    assert coarse.main(["--study", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: [final.holdout] a holdout of 300 validation images does not fit" in err
    assert not st.load_existing(load_spec(path), "coarse")  # refused before any trial


def test_settings_the_data_cannot_hold_are_refused_before_any_trial(quick_study, capsys):
    path = quick_study(training={"batch_size": 5000})
    assert coarse.main(["--study", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: [training.batch_size] batch_size = 5000 is larger than the training" in err
    assert "(1197 images after n_val = 300)" in err
    assert "the data hold 1497 images" in err  # no n_val makes 5000 fit: not offered
    # a searched batch size is named in [search], and a smaller n_val offered where it helps
    path = quick_study(name="drawn", search={"batch_size": {"choice": [50, 1400]}})
    doc = tomllib.loads(path.read_text())
    del doc["training"]["batch_size"]  # searched, not fixed
    path.write_text(dump_toml(doc))
    assert coarse.main(["--study", str(path)]) == 2
    err = capsys.readouterr().err
    assert "[search.batch_size] batch_size = 1400 is larger than the training set" in err
    assert "use a smaller batch_size range or a smaller [data] n_val" in err
    path = quick_study(name="cycles", search={"n_cycles": {"int": [0, 3]}})
    doc = tomllib.loads(path.read_text())
    del doc["training"]["n_cycles"], doc["final"]["training"]["n_cycles"]
    path.write_text(dump_toml(doc))
    assert coarse.main(["--study", str(path)]) == 2
    assert "[search.n_cycles] n_cycles = 0 cannot run: n_cycles must be >= 1" in (
        capsys.readouterr().err
    )
    path = quick_study(name="big", data={"n_val": 5000})
    assert coarse.main(["--study", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"{path}: [data.n_val] n_val must satisfy 0 < n_val < 1797" in err


def test_n_val_as_a_fraction_and_the_n_val_flag(quick_study, capsys):
    path = quick_study(coarse={"trials": 1}, data={"n_val": 0.1})
    assert quiet(coarse.main, ["--study", str(path)])[0] == 0
    sizes = st.prepare_for(load_spec(path), log=lambda *_: None).sizes()
    assert sizes["val"] == 180 and sizes["train"] == 1797 - 180 - 300
    other = quick_study(name="flag", coarse={"trials": 1})
    code, out = quiet(coarse.main, ["--study", str(other), "--n-val", "0.2"])
    assert code == 0 and "--n-val 0.2" in out  # the next hint keeps it
    with pytest.raises(SystemExit):
        coarse.main(["--study", str(other), "--n-val", "1.5"])
    assert "--n-val: must be a number of images >= 1 or a fraction" in capsys.readouterr().err
    for text in ("inf", "1e400", "nan"):  # one line, not a crash on int(inf)
        with pytest.raises(SystemExit) as exc:
            coarse.main(["--study", str(other), "--n-val", text])
        assert exc.value.code == 2
        assert f"must be a number of images >= 1 or a fraction in (0, 1), got '{text}'" in (
            capsys.readouterr().err
        )


@pytest.mark.parametrize(
    ("name", "n_s_full", "n_s_subset"),
    [("cifar10_2layer", 900, 90), ("cifar10_3layer_bn", 2250, 225)],
)
def test_the_dd2424_studies_fit_full_cifar_and_the_subset(name, n_s_full, n_s_subset):
    spec = load_spec(REPO / "studies" / f"{name}.toml")
    assert spec.data.n_val == 0.1
    # full CIFAR-10: 45,000 / 5,000; the shared subset: 5 x 1,017 images -> 4,577 / 508
    for n_train, n_val, n_s in ((45000, 5000, n_s_full), (4577, 508, n_s_subset)):
        st.check_fits(spec, {"train": n_train, "val": n_val, "test": 10000})
        assert spec.train_config("coarse", {"l2_lambda": 1e-3}).resolved_n_s(n_train) == n_s
    assert st.holdout_size(spec, 5000) == 1000 and st.holdout_size(spec, 508) == 102


def test_n_s_is_given_in_steps_or_in_epochs_not_both(tmp_path):
    from search.config.study import parse_spec

    with pytest.raises(StudyDefinitionError, match=r"\[training\] give n_s .* not both"):
        parse_spec({"name": "x", "training": {"n_s": 10, "n_s_epochs": 2.0}}, tmp_path / "x")
    with pytest.raises(StudyDefinitionError, match=r"\[data.n_val\] must be a number of images"):
        parse_spec({"name": "x", "data": {"n_val": 1.5}}, tmp_path / "x")


def test_workers_that_join_a_study_run_its_replicates(quick_study, tmp_path):
    from search import worker

    path = quick_study(coarse={"trials": 4, "replicates": 2, "replicate_top": 1})
    url = f"sqlite:///{tmp_path / 'joined.db'}"
    create = ["--create", "--study", str(path), "--storage", url, "--n-val", "0.2"]
    assert quiet(worker.main, create)[0] == 0  # a worker that joins takes the --n-val
    code, out = quiet(worker.main, ["--storage", url, "--study-name", "qs-coarse"])
    assert code == 0 and "replicates: the 1 best configurations get 2 seeds each" in out
    study = optuna.load_study(study_name="qs-coarse", storage=url)
    assert study.user_attrs["seed_mode"] == "shared"
    assert sum(rep.is_replicate(t) for t in study.trials) >= 1
    assert rep.study_configurations(study, 2)[0].n == 2


def test_a_worker_joining_a_study_queues_the_retry_a_dead_process_owed(
    quick_study, tmp_path, monkeypatch
):
    """A process failed a lost trial and died before queueing its retry (a second Ctrl-C):
    a worker that joins pays the debt, so the study still meets its target."""
    from search import worker
    from search.sweep.workers import bookkeeping

    monkeypatch.setattr(lost, "OWED_SETTLE_S", 0.0)  # the debt is old enough at once
    path = quick_study(coarse={"trials": 3})
    url = f"sqlite:///{tmp_path / 'owed.db'}"
    assert quiet(worker.main, ["--create", "--study", str(path), "--storage", url])[0] == 0
    study = optuna.load_study(study_name="qs-coarse", storage=url)
    storage, dead = study._storage, study.ask()  # the dying process's trial
    storage.set_trial_system_attr(dead._trial_id, lost.RETRY, "owed")
    storage.set_trial_system_attr(dead._trial_id, bookkeeping.ATTR, bookkeeping.Kind.REQUEUED)
    storage.set_trial_state_values(dead._trial_id, state=TrialState.FAIL)
    assert quiet(worker.main, ["--storage", url, "--study-name", "qs-coarse"])[0] == 0
    c = st.counts(optuna.load_study(study_name="qs-coarse", storage=url))
    assert c["COMPLETE"] + c["PRUNED"] == 3 and c["REQUEUED"] == 1 and c["FAIL"] == 0, c


def test_the_smoothed_choice_prefers_a_good_neighbourhood_to_a_lucky_point():
    configs = [
        _config(1e-5, [0.47], 0),  # lucky, among poor neighbours
        _config(1.5e-5, [0.38], 1),
        _config(1e-3, [0.45, 0.44], 2),  # good, and so are its neighbours
        _config(1.5e-3, [0.44], 4),
        _config(7e-4, [0.445], 5),
    ]
    chosen, value = rep.choose(configs)
    assert chosen.params["l2_lambda"] in (1e-3, 1.5e-3, 7e-4)
    assert 0.44 <= value <= 0.45
    alone = [_config(1e-3, [0.5], 0), _config(1e-1, [0.3], 1)]  # far apart: their own means
    assert [round(v, 6) for _, v in rep.smoothed(alone)] == [0.5, 0.3]


def test_final_choose_smoothed_retrains_the_best_smoothed_mean(quick_study):
    path = quick_study(coarse={"trials": 4}, final={"choose": "smoothed"})
    spec = load_spec(path)
    assert quiet(coarse.main, ["--study", str(path)])[0] == 0
    assert quiet(final.main, ["--study", str(path)])[0] == 0
    result = json.loads((spec.out_dir() / "final" / "result.json").read_text())
    chosen, smooth = rep.choose(rep.study_configurations(st.open_study(spec, "coarse")))
    assert result["params"] == chosen.params
    assert result["search_val_acc"]["smoothed"] == pytest.approx(smooth)


def test_the_report_and_final_say_when_the_choice_is_within_noise(tmp_path):
    from search.reporting import markdown

    spec = load_spec(REPO / "studies" / "quickstart.toml")
    fine_study = optuna.create_study(direction="maximize")
    fine_study.set_user_attr("top_k", 3)
    fine_study.set_user_attr("margin", 0.25)
    note = "l2_lambda: flat within noise (sigma 0.0084) over 2.8 of the coarse range's 3.0"
    fine_study.set_user_attr(
        "narrowing",
        {
            "sigma": 0.0084,
            "within": [0, 1, 2],
            "chosen": [0, 1, 2],
            "flat": ["l2_lambda"],
            "extended": {},
            "notes": [note],
        },
    )
    fine_study.set_user_attr(
        "final", {"test_acc": 0.97, "test_acc_sd": 0.0067, "test_accs": [0.96, 0.97, 0.98]}
    )
    text = markdown.final_section(spec, {"fine": fine_study})
    assert "**The choice of lambda is within the seed noise**" in text
    assert "test accuracy **0.9700 +- 0.0067 (n=3 seeds)**" in text
    assert f"**{note}" in markdown.narrowing_text(fine_study.user_attrs)


def test_a_replicate_queued_twice_counts_once_and_its_copy_is_failed(quick_study):
    spec = load_spec(quick_study())
    study = st.open_study(spec, "coarse")
    p = {"l2_lambda": 1e-3, "eta_max": 0.1}
    for _ in range(2):  # two processes queueing the same seed at once
        study.enqueue_trial(p, user_attrs={"replicate": 1})
    rep._fail_duplicates(study)
    states = [t.state for t in study.get_trials()]
    assert states == [TrialState.WAITING, TrialState.FAIL]
    assert study.get_trials()[1].user_attrs["reason"] == "not needed: duplicate replicate"
    # and finished copies (a race already run) count once per seed index
    runs = [
        optuna.trial.create_trial(
            value=v, params={"l2_lambda": 1e-3}, distributions=DIST, user_attrs={"replicate": r}
        )
        for v, r in ((0.5, 0), (0.6, 1), (0.6, 1))
    ]
    for i, t in enumerate(runs):
        t.number = i
    (c,) = rep.configurations(runs)
    assert c.n == 2 and c.mean == pytest.approx(0.55)


def test_a_diverged_replicate_counts_as_zero_and_is_shown():
    ok = optuna.trial.create_trial(value=0.5, params={"l2_lambda": 1e-3}, distributions=DIST)
    bad = optuna.trial.create_trial(
        state=TrialState.PRUNED,
        params={"l2_lambda": 1e-3},
        distributions=DIST,
        user_attrs={"replicate": 1, "diverged": True},
        intermediate_values={1: 0.4},
    )
    ok.number, bad.number = 0, 1
    (c,) = rep.configurations([ok, bad])
    assert c.values == [0.5, 0.0] and c.diverged == 1 and "1 diverged" in c.describe()


def test_running_a_stage_again_queues_no_new_replicates(quick_study):
    path = quick_study(coarse={"trials": 5, "replicates": 2, "replicate_top": 2})
    assert quiet(coarse.main, ["--study", str(path)])[0] == 0
    n = len(st.open_study(load_spec(path), "coarse").get_trials())
    code, out = quiet(coarse.main, ["--study", str(path)])
    assert code == 0 and "replicates:" not in out
    assert len(st.open_study(load_spec(path), "coarse").get_trials()) == n
    # a larger target is new results: one more round for them
    code, out = quiet(coarse.main, ["--study", str(path), "--trials", "7"])
    assert code == 0


def test_fine_and_final_refuse_a_stage_that_is_not_finished(quick_study, capsys):
    path = quick_study(coarse={"trials": 3, "replicates": 2, "replicate_top": 1})
    spec = load_spec(path)
    assert quiet(coarse.main, ["--study", str(path)])[0] == 0
    study = st.open_study(spec, "coarse")
    study.enqueue_trial({"l2_lambda": 1e-3, "eta_max": 0.1}, user_attrs={"replicate": 1})
    assert fine.main(["--study", str(path)]) == 2
    assert "qs-coarse is not finished (1 trial(s) waiting" in capsys.readouterr().err
    assert final.main(["--study", str(path)]) == 2
    assert "qs-coarse is not finished" in capsys.readouterr().err


def test_a_changed_holdout_retrains_final(quick_study):
    path = quick_study(coarse={"trials": 2})
    assert quiet(coarse.main, ["--study", str(path)])[0] == 0
    assert quiet(final.main, ["--study", str(path)])[0] == 0
    path.write_text(path.read_text().replace("holdout = 100", "holdout = 50"))
    code, out = quiet(final.main, ["--study", str(path)])
    assert code == 0 and "already recorded" not in out and "seed 0: test accuracy" in out
    result = json.loads((load_spec(path).out_dir() / "final" / "result.json").read_text())
    assert result["split"]["holdout"] == 50


def test_an_invalid_extension_is_given_up_alone():
    c = rep.Configuration({"l2_lambda": 1.2e-5, "eta_max": 1.1e-3})
    c.trials.append(
        optuna.trial.create_trial(
            value=0.5,
            params=c.params,
            distributions={**DIST, "eta_max": FloatDistribution(1e-3, 0.5, log=True)},
        )
    )
    c.trials[0].number = 0
    n = narrowing.narrow(
        [c],
        {"l2_lambda": _log("l2_lambda", 1e-5, 1e-1), "eta_max": _log("eta_max", 1e-3, 0.5)},
        margin=0.3,
        top_k=1,
        valid=lambda p: p["eta_max"] >= 1e-3,
    )
    assert n.ranges["l2_lambda"].low < 1e-5  # its extension stands
    assert n.ranges["eta_max"].low == 1e-3 and "kept at the coarse edge" in n.extended["eta_max"]
