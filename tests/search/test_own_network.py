"""Bring your own network: a user's training function gets every guarantee of the service.

The example (``examples/own_network``) is tuned end to end with two workers; user
functions that raise, return NaN or never report, and a slow one interrupted with
Ctrl-C and resumed, each in a study of their own in ``tmp_path``.
"""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time
import tomllib
from pathlib import Path

import numpy as np
import optuna
import pytest
from optuna.trial import TrialState

from search import coarse, final, fine, report, status
from search.config.study import StudyDefinitionError, load_spec, parse_spec
from search.sweep import replicates as rep
from search.sweep import studies as st
from search.sweep import user_train
from search.sweep.objective import CURVES, Objective, curves_of
from search.sweep.prepared import prepare
from search.sweep.user_train import Reporter, UserResultError
from search.sweep.workers import lost
from tests.conftest import check_axes
from tests.search.conftest import REPO, dump_toml, is_new_fine_trial

EXAMPLE = REPO / "examples" / "own_network"
ENV = {**os.environ, "PYTHONPATH": str(REPO)}


def load(spec, stage: str = "coarse") -> optuna.Study:
    return optuna.load_study(study_name=f"{spec.name}-{stage}", storage=spec.storage_url())


def user_study(directory: Path, code: str, name: str = "own", **sections) -> Path:
    """A digits study in ``directory`` whose [model] train is ``code`` in ``net.py``."""
    (directory / "net.py").write_text(textwrap.dedent(code))
    doc = {
        "name": name,
        "data": {"name": "digits", "n_val": 300},
        "model": {"train": "net.py:train"},
        "training": {"batch_size": 50, "n_s": 24, "n_cycles": 1, "evals_per_cycle": 4},
        "search": {"l2_lambda": [1e-5, 1e-1], "eta_max": [1e-3, 0.5]},
        # No replicates and one final seed unless a test asks: fast, and in trial order.
        "coarse": {"trials": 4, "replicates": 1},
        "fine": {"replicates": 1},
        "final": {"seeds": 1},
        "optuna": {"workers": 1, "pruner": "none"},
    }
    for section, values in sections.items():
        # [search] is replaced, the other tables updated.
        doc[section] = values if section == "search" else {**doc.get(section, {}), **values}
    path = directory / f"{name}.toml"
    path.write_text(dump_toml(doc))
    return path


# ----------------------------------------------------------------------------- the example


# A user's function in trials, grids and failures: test_kinds' grid and this file's lighter
# tests; two workers: test_signals and test_bookkeeping (the suite's time budget).
@pytest.mark.slow
def test_example_tuned_end_to_end_with_two_workers(tmp_path, capsys, saved_figures):
    doc = tomllib.loads((EXAMPLE / "study.toml").read_text())
    doc["model"]["train"] = str(EXAMPLE / "my_net.py") + ":train"
    doc["coarse"] = {"trials": 7, "replicates": 2, "replicate_top": 2}
    doc["fine"] = {"trials": 3, "top_k": 2, "replicates": 1, "training": {"n_cycles": 2}}
    doc["final"] = {"holdout": 100, "seeds": 2, "training": {"n_cycles": 2}}
    doc["optuna"] |= {"workers": 2, "n_startup_trials": 3}
    path = tmp_path / "own_network.toml"
    path.write_text(dump_toml(doc))
    spec = load_spec(path)

    assert coarse.main(["--study", str(path)]) == 0
    assert "2 worker(s)" in capsys.readouterr().out
    everything = load(spec).get_trials()
    assert all(t.state in st.FINISHED for t in everything)
    trials = [t for t in everything if not rep.is_replicate(t)]
    replicates = [t for t in everything if rep.is_replicate(t)]
    assert len(trials) == 7 and len(replicates) >= 2
    for t in replicates:  # the best configurations again with other seeds, never pruned
        assert t.state == TrialState.COMPLETE
        assert t.user_attrs["seed"] == spec.optuna.seed + 1000 * rep.replicate_index(t)
        assert any(s.params == t.params for s in trials)
    total = spec.train_config("coarse").total_steps(1197)
    pruned = [t for t in trials if t.state == TrialState.PRUNED]
    complete = [t for t in trials if t.state == TrialState.COMPLETE]
    assert pruned and complete, [t.state.name for t in trials]
    for t in pruned:  # pruned through report(), after the warm-up, before the last step
        assert t.user_attrs["reason"].startswith("pruned at step")
        steps = sorted(t.intermediate_values)
        assert spec.optuna.warmup_cycles * 2 * 48 <= steps[-1] < total
        assert curves_of(t)["step"] == steps
    for t in complete:  # the user's metrics are the curves; its result is the value
        curves = curves_of(t)
        assert curves["step"][-1] == total and len(curves["val_loss"]) == len(curves["step"])
        assert t.value == pytest.approx(curves["val_acc"][-1])
        assert all(d.log for d in t.distributions.values())
    assert max(t.value for t in complete) > 0.9
    # Worker processes ran the trials, not this one (on a loaded machine one of the two
    # may get them all).
    pids = {t.system_attrs[lost.OWNER]["pid"] for t in trials}
    assert 1 <= len(pids) <= 2 and os.getpid() not in pids

    assert fine.main(["--study", str(path)]) == 0
    # Its 3 trials, on top of the coarse runs it carried over and the race's runs.
    assert sum(is_new_fine_trial(t) for t in load(spec, "fine").get_trials()) == 3
    assert final.main(["--study", str(path)]) == 0
    result = json.loads((spec.out_dir() / "final" / "result.json").read_text())
    assert len(result["test_accs"]) == 2 and min(result["test_accs"]) > 0.9  # one per seed
    assert all(run["test_loss"] > 0 for run in result["runs"].values())
    # its own n_hidden was searched: an integer of the range, the one final trained
    n_hidden = result["params"]["n_hidden"]
    fine_range = load(spec, "fine").user_attrs["ranges"]["n_hidden"]  # may pass an edge
    assert isinstance(n_hidden, int) and fine_range["int"][0] <= n_hidden <= fine_range["int"][1]
    assert result["config"]["n_hidden"] == n_hidden and result["config"]["n_cycles"] == 2
    assert "network.npz" not in capsys.readouterr().out  # the user's network is the user's

    assert report.main(["--study", str(path)]) == 0
    md = (spec.out_dir() / "report" / "report.md").read_text()
    assert f"**{result['test_acc']:.4f} +- {result['test_acc_sd']:.4f} (n=2 seeds)**" in md
    curves = saved_figures["own_network_curves_coarse.png"]
    check_axes(curves)
    loss_ax = curves.axes[1]
    assert loss_ax.get_ylabel() == "cross-entropy loss" and len(loss_ax.lines) > 5
    final_fig = saved_figures["curves.png"]
    assert all(ax.get_legend() is not None for ax in final_fig.axes)  # loss, cost, accuracy


@pytest.mark.parametrize("name", ["study.toml", "cifar10.toml"])
def test_the_example_study_files_are_valid(name):
    spec = load_spec(EXAMPLE / name)
    assert spec.model.layout == "d_by_n" and spec.model.params["n_hidden"] == 50
    assert spec.search["n_hidden"].kind == "int" and spec.search["n_hidden"].log
    user_train.check(spec)  # the file and its function are found and take (hp, data, report)
    assert user_train.load_train(spec).__module__.startswith("c2f_user_my_net_")


def test_example_runs_alone_for_its_gradient_check():
    out = subprocess.run(
        [sys.executable, "my_net.py"], cwd=EXAMPLE, capture_output=True, text=True, timeout=60
    )
    assert out.returncode == 0, out.stderr
    errors = [float(line.split()[-1]) for line in out.stdout.splitlines()]
    assert len(errors) == 4 and max(errors) < 1e-6
    assert "import model" not in (EXAMPLE / "my_net.py").read_text()


# ----------------------------------------------------------------------------- misbehaving code

# One worker runs the trials in order; every second call raises.
RAISES = """
    calls = []

    def train(hp, data, report):
        report(6, 0.5)
        calls.append(1)
        if len(calls) % 2 == 0:
            raise ValueError(f"boom at call {len(calls)}")
        return 0.75
"""


def test_an_exception_fails_its_trial_with_the_traceback_and_the_sweep_goes_on(tmp_path, capsys):
    path = user_study(tmp_path, RAISES)
    spec = load_spec(path)
    assert coarse.main(["--study", str(path)]) == 0
    trials = load(spec).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE, TrialState.FAIL] * 2
    for t in trials[1::2]:
        assert t.user_attrs["reason"] == f"ValueError: boom at call {t.number + 1}"
        tb = t.user_attrs["traceback"]
        assert 'net.py", line 8, in train' in tb and tb.rstrip().endswith(
            f"ValueError: boom at call {t.number + 1}"
        )
        assert curves_of(t)["step"] == [6]  # what it reported before it raised
    capsys.readouterr()
    assert status.main(["--study", str(path)]) == 0
    out = capsys.readouterr().out
    assert "failed   2 x ValueError: boom at call 2 (values vary)" in out  # one kind
    assert 'at net.py:8 in train: raise ValueError(f"boom at call {len(calls)}")' in out

    from tests.search.conftest import get_json, run_dashboard

    with run_dashboard(spec.storage_url()) as base:
        sid = get_json(f"{base}/api/studies")["study_summaries"][0]["study_id"]
        shown = get_json(f"{base}/api/studies/{sid}")["trials"]
    failed = next(t for t in shown if t["number"] == 1)
    attrs = {a["key"]: a["value"] for a in failed["user_attrs"]}
    assert "boom at call 2" in attrs["reason"] and 'net.py", line 8' in attrs["traceback"]


@pytest.mark.parametrize(
    "result, words",
    [
        ("float('nan')", "returned val_acc=nan: not a finite number"),
        ("float('inf')", "returned val_acc=inf: not a finite number"),
        ("None", "returned None: the result must be a number, got None"),
        ("'0.9'", "returned '0.9': the result must be a number"),
        ("{'acc': 0.9}", "returned a dict without 'val_acc'"),
        ("{'val_acc': 0.9, 'f1': 'high'}", "'f1' must be a number, got 'high'"),
        ("np.array([0.9, 0.8])", "an array of shape (2,)"),
    ],
)
def test_a_result_that_is_not_a_finite_number_fails_with_a_clear_reason(
    tmp_path, tiny_splits, result, words
):
    code = f"import numpy as np\ndef train(hp, data, report):\n    return {result}\n"
    objective = _objective(tmp_path, tiny_splits, code)
    study = optuna.create_study(direction="maximize")
    with pytest.raises(UserResultError, match="net.py:train") as exc:
        objective(study.ask())
    assert words in str(exc.value)


def test_a_nan_result_fails_the_trial_and_the_sweep_goes_on(tmp_path):
    code = """
        calls = []

        def train(hp, data, report):
            calls.append(1)
            return float("nan") if len(calls) == 1 else 0.5
    """
    path = user_study(tmp_path, code, coarse={"trials": 2})
    assert coarse.main(["--study", str(path)]) == 0
    trials = load(load_spec(path)).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert (
        trials[0]
        .user_attrs["reason"]
        .startswith("UserResultError: net.py:train returned val_acc=nan: not a finite number")
    )


@pytest.mark.parametrize(
    "stop, reason",
    [
        (
            'sys.exit("done training")',
            "SystemExit: the trial's code called sys.exit('done training')",
        ),
        ("exit()", "SystemExit: the trial's code called sys.exit(None)"),
    ],
)
def test_a_function_that_exits_fails_its_trial_and_the_sweep_goes_on(tmp_path, stop, reason):
    """sys.exit() in the user's function must not end the worker (its trial would stay
    RUNNING, be retried and end the next worker too). A KeyboardInterrupt is not caught:
    it may be a real Ctrl-C, where the user's code put Python's own handler back."""
    code = f"""
        import sys
        calls = []

        def train(hp, data, report):
            calls.append(1)
            if len(calls) == 1:
                {stop}
            return 0.5
    """
    path = user_study(tmp_path, code, coarse={"trials": 2})
    assert coarse.main(["--study", str(path)]) == 0
    trials = load(load_spec(path)).get_trials()
    assert [t.state for t in trials] == [TrialState.FAIL, TrialState.COMPLETE]
    assert trials[0].user_attrs["reason"].startswith(reason)


def test_a_stage_where_some_trials_failed_says_why_and_how_to_resume(
    tmp_path, capsys, monkeypatch
):
    code = """
        import os

        calls = []

        def train(hp, data, report):
            calls.append(1)
            if os.environ.get("C2F_TEST_BROKEN") and len(calls) % 2:
                raise RuntimeError("width too large")
            return 0.5
    """
    monkeypatch.setenv("C2F_TEST_BROKEN", "1")
    path = user_study(tmp_path, code, coarse={"trials": 4})
    assert coarse.main(["--study", str(path)]) == 0
    out = capsys.readouterr().out
    assert "2 trial(s) failed; 2 of the target 4 finished" in out
    assert "  failed   2 x RuntimeError: width too large" in out
    assert "           at " in out and "net.py" in out  # where it raised
    assert f"run python -m search.coarse --study {path} again: it runs the stage on" in out
    assert out.rstrip().splitlines()[-1].startswith("next: python -m search.fine")
    # run again, the cause fixed: new trials reach the target; no word of the old failures
    monkeypatch.delenv("C2F_TEST_BROKEN")
    assert coarse.main(["--study", str(path)]) == 0
    assert "trial(s) failed" not in capsys.readouterr().out


def test_a_function_that_never_reports_runs_with_one_warning(tmp_path, capfd):
    code = """
        def train(hp, data, report):
            value = 0.25 + hp["l2_lambda"]
            return value if data.test is None else {"val_acc": value, "test_acc": 0.5}
    """
    path = user_study(
        tmp_path,
        code,
        coarse={"trials": 5},
        optuna={"pruner": "percentile", "n_startup_trials": 0},
    )
    assert coarse.main(["--study", str(path)]) == 0
    trials = load(load_spec(path)).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 5
    for t in trials:
        assert t.value == pytest.approx(0.25 + t.params["l2_lambda"])
        assert not t.intermediate_values and not curves_of(t)
        assert "never called report()" in t.user_attrs["warning"]
    err = capfd.readouterr().err
    assert err.count("never called report()") == 1, err
    # final and the report run without curves: no figure of them fails, nor warns
    assert final.main(["--study", str(path)]) == 0
    spec = load_spec(path)
    assert json.loads((spec.out_dir() / "final" / "result.json").read_text())["test_acc"] == 0.5
    assert report.main(["--study", str(path)]) == 0
    err = capfd.readouterr().err
    assert "Warning" not in err, err
    # status names what final chose and its test accuracy beside the stage's best run
    assert status.main(["--study", str(path)]) == 0
    out = capfd.readouterr().out
    assert "  final    configuration " in out and "test acc 0.5000 (n=1); " in out, out


def test_report_steps_past_the_runs_steps_are_warned_of_once(tmp_path, capfd):
    code = """
        def train(hp, data, report):
            report(step=1000 * 400, val_acc=0.5)  # samples seen, not update steps
            return 0.5
    """
    path = user_study(tmp_path, code, coarse={"trials": 2})
    assert coarse.main(["--study", str(path)]) == 0
    trials = load(load_spec(path)).get_trials()
    assert [t.state for t in trials] == [TrialState.COMPLETE] * 2
    assert all(
        "called report() at step 400000, past the" in t.user_attrs["warning"] for t in trials
    )
    err = capfd.readouterr().err
    assert err.count("past the") == 1 and "update steps done so far" in err, err


@pytest.mark.parametrize(
    "train, code, words",
    [
        ("missing.py:train", None, "no file"),
        ("net.py:fit", "def train(hp, data, report):\n    return 1.0\n", "no function 'fit'"),
        ("net.py:train", "def train(X, Y, W, b, lam):\n    return 1.0\n", "must take three"),
        ("net.py:train", "def train(hp, data):\n    return 1.0\n", "must take three"),
        ("net.py:train", "import no_such_module_here\n", "ModuleNotFoundError"),
        ("net.py:train", "def train(hp, data, report)\n", "SyntaxError"),
        ("no_such_pkg.net:train", None, "no module 'no_such_pkg'"),
        ("net.py:train", "train = 3\n", "train = 3 in"),
    ],
)
def test_a_function_that_cannot_run_is_refused_before_any_trial(
    tmp_path, capsys, train, code, words
):
    path = user_study(tmp_path, code or "", model={"train": train})
    if code is None:
        (tmp_path / "net.py").unlink()
    assert coarse.main(["--study", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: {path}: [model.train] {train!r}: ") and words in err, err
    assert not (tmp_path / "own.db").exists()  # not even a study was created


def test_the_final_run_must_return_the_test_accuracy(tmp_path, capsys):
    code = """
        def train(hp, data, report):
            report(hp["total_steps"], 0.5)
            return {"val_acc": 0.5}
    """
    path = user_study(tmp_path, code, coarse={"trials": 1})
    assert coarse.main(["--study", str(path)]) == 0
    capsys.readouterr()
    assert final.main(["--study", str(path)]) == 2
    err = capsys.readouterr().err
    assert "in the final run: with data.test given it must return a dict holding" in err


# ----------------------------------------------------------------------------- Ctrl-C, resume

SLOW = """
    import time

    def train(hp, data, report):
        for i in range(1, 21):
            time.sleep(0.1)  # a window of about a second in which both trials run
            report(i, 0.5 + hp["l2_lambda"])
        return 0.5 + hp["l2_lambda"]
"""


@pytest.mark.slow  # the loop test_bookkeeping's Ctrl-C and resume runs (the suite's time budget)
def test_a_slow_function_interrupted_with_ctrl_c_is_resumed_to_the_exact_target(tmp_path):
    path = user_study(tmp_path, SLOW, coarse={"trials": 4}, optuna={"workers": 2})
    spec = load_spec(path)
    cmd = [sys.executable, "-m", "search.coarse", "--study", str(path)]
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=ENV,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        start_new_session=True,
    )

    def mid_run() -> bool:
        try:
            trials = load(spec).get_trials()
        except Exception:  # noqa: BLE001 - the command is still creating the study
            return False
        running = [
            t
            for t in trials
            if t.state == TrialState.RUNNING and 2 <= len(t.intermediate_values) <= 15
        ]
        return len(running) == 2 and any(t.state == TrialState.COMPLETE for t in trials)

    deadline = time.monotonic() + 60
    while not mid_run():
        assert proc.poll() is None, proc.stderr.read()
        assert time.monotonic() < deadline, "the sweep never got to two trials mid-run"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGINT)
    t0 = time.monotonic()
    _, err = proc.communicate(timeout=20)
    stopped_in = time.monotonic() - t0
    assert proc.returncode == 130, err
    trials = load(spec).get_trials()
    stopped = [t for t in trials if t.state == TrialState.FAIL]
    assert len(stopped) == 2 and not [t for t in trials if t.state == TrialState.RUNNING]
    for t in stopped:
        # Each worker re-queues its own trial; one that has not stopped 5 s after the
        # signal (a machine loaded by others) is killed and the command re-queues it.
        reason = t.user_attrs["reason"]
        assert reason == "interrupted (SIGINT)" or (
            stopped_in > 5 and reason.startswith("worker lost: its worker")
        ), (reason, stopped_in, err)
        retry = [r for r in trials if r.system_attrs.get("requeued_from") == t.number]
        assert len(retry) == 1 and retry[0].state == TrialState.WAITING
        assert retry[0].params == t.params
    done_before = {t.number: t.value for t in trials if t.state == TrialState.COMPLETE}

    rerun = subprocess.run(cmd, cwd=REPO, env=ENV, capture_output=True, text=True, timeout=120)
    assert rerun.returncode == 0, rerun.stderr
    after = load(spec).get_trials()
    assert sum(t.state == TrialState.COMPLETE for t in after) == 4  # the exact target
    assert not [t for t in after if t.state in (TrialState.RUNNING, TrialState.WAITING)]
    for number, value in done_before.items():
        assert after[number].value == value
    for t in stopped:  # each interrupted trial ran once more, to the end, with its params
        retry = next(r for r in after if r.system_attrs.get("requeued_from") == t.number)
        assert retry.state == TrialState.COMPLETE and len(retry.intermediate_values) == 20


# ----------------------------------------------------------------------------- the contract


def _objective(tmp_path, splits, code: str, **sections) -> Objective:
    path = user_study(tmp_path, code, **sections)
    return Objective(load_spec(path), "coarse", splits, dict(load_spec(path).search))


@pytest.mark.parametrize("layout", ["n_by_d", "d_by_n"])
def test_the_data_arrive_in_the_layout_asked_for_read_only_and_memory_mapped(tmp_path, layout):
    path = user_study(
        tmp_path, "def train(hp, data, report):\n    return 1.0\n", model={"layout": layout}
    )
    spec = load_spec(path)
    prepared = prepare(spec.data, None, tmp_path / "cache")
    splits = prepared.open()
    objective = Objective(spec, "coarse", splits, dict(spec.search))
    seen = {}

    def train(hp, data, report):
        seen.update(hp=hp, data=data)
        return 1.0

    objective.train = train
    study = optuna.create_study(direction="maximize")
    assert objective(study.ask()) == 1.0
    data, hp = seen["data"], seen["hp"]
    for part, ds in (("train", splits.train), ("val", splits.val)):
        p = getattr(data, part)
        X, Y, y = p.X, p.Y, p.y
        assert X.dtype == np.float32 and y.dtype == np.int64 and p.n == ds.n
        if layout == "d_by_n":
            assert X.shape == (64, ds.n) and Y.shape == (10, ds.n)
            assert np.array_equal(np.argmax(Y, axis=0), y)
            assert np.array_equal(X, ds.X.T)
        else:
            assert X.shape == (ds.n, 64) and Y.shape == (ds.n, 10)
            assert np.array_equal(np.argmax(Y, axis=1), y)
        # The prepared memory map itself, not a copy; nobody can write to it.
        assert isinstance(X, np.memmap) and np.shares_memory(X, ds.X)
        assert str(X.filename).endswith(f"{part}_X.npy")
        for a in (X, Y, y):
            with pytest.raises(ValueError, match="read-only"):
                a[0] = 0
    assert data.test is None and data.d == 64 and data.n_classes == 10
    assert hp["n_s"] == 24 and hp["n_cycles"] == 1 and hp["total_steps"] == 48
    assert hp["eval_every"] == 12 and hp["batch_size"] == 50
    assert hp["seed"] == 0 and set(hp) >= {"l2_lambda", "eta_min", "eta_max"}
    assert "eta" not in hp and "n_epochs" not in hp  # the constant schedule's, not used


def test_hyperparameters_include_every_training_key_and_the_constant_schedule(tmp_path):
    code = "def train(hp, data, report):\n    return 1.0\n"
    path = user_study(
        tmp_path,
        code,
        model={"params": {"n_hidden": 30, "dropout": 0.5}},
        training={"schedule": "constant", "n_epochs": 3, "rho": 0.9},
        search={"l2_lambda": [1e-5, 1e-1], "eta": [1e-3, 0.5]},
        fine={"training": {"n_hidden": 60}},
    )
    spec = load_spec(path)
    hp = user_train.hyperparameters(
        spec, "coarse", {"l2_lambda": 1e-3, "eta": 0.1}, seed=7, n_train=1000
    )
    assert hp["eta"] == 0.1 and hp["n_epochs"] == 3 and hp["total_steps"] == 3 * 20
    assert hp["n_hidden"] == 30 and hp["dropout"] == 0.5 and hp["rho"] == 0.9
    assert hp["seed"] == 7 and "eta_max" not in hp and "eta_min" not in hp
    fine_hp = user_train.hyperparameters(
        spec, "fine", {"l2_lambda": 1e-3, "eta": 0.1}, seed=7, n_train=1000
    )
    assert fine_hp["n_hidden"] == 60


class _Trial:
    """A trial that always wants to be pruned, recording what was reported."""

    def __init__(self) -> None:
        self.reported: list[tuple[int, float]] = []

    def report(self, value: float, step: int) -> None:
        self.reported.append((step, value))

    def should_prune(self) -> bool:
        return True


def _reporter(trial, *, warmup: float = 10, last: int = 40) -> Reporter:
    from model.train import TrainConfig

    config = TrainConfig(batch_size=10, n_s=10, n_cycles=2)
    return Reporter("net.py:train", config, 100, trial=trial, window=(warmup, last), prunes=True)


def test_report_prunes_after_the_warm_up_and_never_at_the_last_step():
    trial = _Trial()
    report = _reporter(trial)
    report(5, 0.4, val_loss=float("inf"))  # in the warm-up; a diverged loss is a gap
    with pytest.raises(optuna.TrialPruned, match="pruned at step 10"):
        report(10, 0.5, val_loss=1.0)
    assert trial.reported == [(5, 0.4), (10, 0.5)]
    assert report.curves["val_loss"] == [None, 1.0]
    assert report.curves["epoch"] == [0.5, 1.0]
    last = _reporter(_Trial(), warmup=0)
    last(40, 0.9)  # the result of a finished run is never pruned
    assert last.curves["step"] == [40]


class _AlwaysPrune(optuna.pruners.BasePruner):
    def prune(self, study, trial) -> bool:
        return True


def test_a_function_that_catches_the_pruning_exception_is_still_pruned(tmp_path, tiny_splits):
    code = """
        def train(hp, data, report):
            for step in range(48, 52):  # the end of the first of two cycles: 48 steps
                try:
                    report(step, 0.1)
                except Exception:
                    pass
            return 0.1
    """
    objective = _objective(
        tmp_path,
        tiny_splits,
        code,
        optuna={"pruner": "percentile", "warmup_cycles": 0.0},
        # Pruning happens only at the end of a cycle, and never at the last point.
        training={"batch_size": 50, "n_s": 24, "n_cycles": 2, "evals_per_cycle": 4},
    )
    study = optuna.create_study(direction="maximize", pruner=_AlwaysPrune())
    with pytest.raises(optuna.TrialPruned, match="pruned at step 48"):
        objective(study.ask())
    trial = study.trials[0]
    assert curves_of(trial)["step"] == [48]  # the reports after the prune were refused
    assert trial.user_attrs["reason"] == "pruned at step 48: val_acc 0.1000"


@pytest.mark.parametrize(
    "args, words",
    [
        ((0, 0.5), "step must be >= 1"),
        ((1.5, 0.5), "step must be an integer"),
        ((3, float("nan")), "val_acc must be a finite number"),
        ((3, "0.5"), "val_acc must be a number"),
    ],
)
def test_report_refuses_what_it_cannot_use(args, words):
    report = _reporter(None)
    with pytest.raises(UserResultError, match="net.py:train called report") as exc:
        report(*args)
    assert words in str(exc.value)
    with pytest.raises(UserResultError):  # raised again: the function cannot go on quietly
        report(4, 0.5)


def test_report_steps_must_increase():
    report = _reporter(None)
    report(4, 0.5)
    with pytest.raises(UserResultError, match="steps must increase, got"):
        report(4, 0.6)


# ----------------------------------------------------------------------------- study files


BASE = {"name": "t", "model": {"train": "net.py:train"}, "search": {"l2_lambda": [1e-5, 1e-1]}}


@pytest.mark.parametrize(
    "change, field, words",
    [
        ({"model": {"train": "net:train:x"}}, "model.train", 'must be "file.py:function"'),
        ({"model": {"train": "net.py"}}, "model.train", 'must be "file.py:function"'),
        ({"model": {"train": "x.py:train", "layout": "NxD"}}, "model.layout", "must be one of"),
        ({"model": {"layout": "d_by_n"}}, "model", "give train too"),
        ({"network": {"hidden": [50]}}, "network", "[model.params] (n_hidden = 50"),
        ({"training": {"total_steps": 9}}, "training.total_steps", "computed from the schedule"),
        ({"training": {"n_hidden": 50}}, "training.n_hidden", "declared with its default"),
        ({"training": {"batch_sise": 50}}, "training.batch_sise", "did you mean 'batch_size'"),
        (
            {"model": {"train": "net.py:train", "params": {"batch_size": 5}}},
            "model.params.batch_size",
            "set batch_size in [training]",
        ),
        ({"search": {"n_hidden": [10, 100]}}, "search.n_hidden", "declared with its default"),
    ],
)
def test_model_table_errors_name_the_field(change, field, words):
    with pytest.raises(StudyDefinitionError) as exc:
        parse_spec({**BASE, **change}, "s.toml")
    assert exc.value.field == field and words in str(exc.value)


def test_a_user_function_takes_its_declared_keys_and_a_stage_may_override_them():
    spec = parse_spec(
        {
            **BASE,
            "model": {"train": "net.py:train", "params": {"n_hidden": 50, "dropout": 0.0}},
            "fine": {"training": {"dropout": 0.1}},
        },
        "s.toml",
    )
    assert spec.own_params("coarse") == {"n_hidden": 50, "dropout": 0.0}
    assert spec.own_params("fine") == {"n_hidden": 50, "dropout": 0.1}
    assert spec.train_config("fine").batch_size == 100  # TrainConfig leaves them out
    assert math.isclose(spec.train_config("coarse", {"l2_lambda": 0.1}).l2_lambda, 0.1)


# ----------------------------------------------------------------------------- figures


@pytest.mark.parametrize(
    "reported, ylabel, title",
    [
        (
            {"val_cost": [2.0, 1.0], "train_cost": [2.1, None]},
            "cost (loss + L2)",
            "cost, mean over seeds (solid",
        ),
        ({}, "cross-entropy loss", "loss: not reported by the training function"),
    ],
)
def test_the_curves_figure_draws_what_the_function_reported(
    tmp_path, saved_figures, reported, ylabel, title
):
    from optuna.distributions import FloatDistribution

    from search.reporting.figures import draw_curves

    study = optuna.create_study(direction="maximize")
    curves = {"step": [10, 20], "epoch": [0.5, 1.0], "eta": [0.1, 0.1], "val_acc": [0.3, 0.6]}
    study.add_trial(
        optuna.trial.create_trial(
            value=0.6,
            params={"l2_lambda": 1e-3},
            distributions={"l2_lambda": FloatDistribution(1e-5, 1e-1, log=True)},
            system_attrs={CURVES: {**curves, **reported}},
        )
    )
    draw_curves(study, "coarse", tmp_path / "curves.png", title="t")
    acc_ax, loss_ax = saved_figures["curves.png"].axes
    assert len(acc_ax.lines) == 1 and list(acc_ax.lines[0].get_ydata()) == [0.3, 0.6]
    assert loss_ax.get_ylabel() == ylabel and loss_ax.get_title().startswith(title)
    drawn = [line for line in loss_ax.lines if len(line.get_xdata())]
    assert len(drawn) == (2 if reported else 0)


def test_a_percentage_as_val_acc_is_warned_of_once(tmp_path, capfd):
    code = """
        def train(hp, data, report):
            return 95.0
    """
    path = user_study(tmp_path, code, coarse={"trials": 2})
    assert coarse.main(["--study", str(path)]) == 0
    trials = load(load_spec(path)).get_trials()
    assert all("val_acc=95, above 1" in t.user_attrs["warning"] for t in trials)
    assert capfd.readouterr().err.count("above 1: val_acc is a fraction") == 1


def test_an_exception_in_the_final_run_is_one_line_naming_where(tmp_path, capsys):
    """The user's function raises in final only: exit 1, one line that names the
    exception and the line of the user's file that raised it, not an "unexpected" error
    of the service's."""
    code = """
        def train(hp, data, report):
            if data.test is not None:
                raise MemoryError("final set too large")
            return 0.5
    """
    path = user_study(tmp_path, code, coarse={"trials": 1})
    assert coarse.main(["--study", str(path)]) == 0
    capsys.readouterr()
    assert final.main(["--study", str(path)]) == 1
    err = capsys.readouterr().err.strip()
    assert "unexpected" not in err and len(err.splitlines()) == 1, err
    assert "raised MemoryError: final set too large (at " in err
    assert ".py:4 in train: raise MemoryError" in err and "run final again" in err
