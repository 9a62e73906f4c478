"""The commands as a user meets them: c2f, --help, exit codes, one line for every bad input,
and hints that are complete commands to copy."""

from __future__ import annotations

import math
import re
import shlex

import pytest

from search import c2f, cli, coarse, experiment, final, fine, report, status, worker
from search.sweep.workers import pool
from tests.search.conftest import REPO


def error_line(capsys) -> str:
    """The one line a failed command printed (on stderr, no traceback)."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.strip() and "warning:" not in line]
    assert len(lines) == 1, err
    assert lines[0].startswith("error: "), lines[0]
    return lines[0]


@pytest.fixture
def study(quick_study):
    """A tiny quick-start study file: 2 trials of one cycle."""
    return str(quick_study(coarse={"trials": 2}, fine={"trials": 2}, training={"n_cycles": 1}))


@pytest.mark.parametrize(
    "section,values,field",
    [
        ("training", {"batch_size": 50.5}, "training.batch_size"),
        ("training", {"n_s": math.nan}, "training.n_s"),
        ("training", {"train_eval_size": 0}, "training.train_eval_size"),
        ("training", {"train_eval_size": -5}, "training.train_eval_size"),
        ("training", {"n_cycles": 1.5}, "training.n_cycles"),
        ("optuna", {"warmup_cycles": math.nan}, "optuna.warmup_cycles"),
        ("fine", {"margin": math.nan}, "fine.margin"),
        ("coarse", {"trials": 10**9}, "coarse.trials"),
        ("data", {"n_val": 5000}, "data.n_val"),  # more than digits has: found when loading
    ],
)
def test_bad_numbers_in_a_study_file_exit_2_naming_file_and_field(
    quick_study, capsys, section, values, field
):
    path = quick_study(**{section: values})
    assert coarse.main(["--study", str(path)]) == 2
    line = error_line(capsys)
    assert line.startswith(f"error: {path}: [{field}] "), line
    assert not (path.parent / "qs.db").exists()  # refused before anything was stored


def test_huge_targets_and_worker_counts_are_refused_at_once(study, capsys, monkeypatch):
    monkeypatch.setattr(pool, "cores", lambda: 2)
    assert coarse.main(["--study", study, "--trials", "1000000000"]) == 2
    assert "--trials must be between 1 and 10,000" in error_line(capsys)
    assert coarse.main(["--study", study, "--workers", "1000"]) == 2
    assert "--workers 1000: at most 8 worker processes on the 2 core(s)" in error_line(capsys)
    join = ["--storage", "sqlite:///x.db", "--study-name", "x-coarse", "--workers", "1000"]
    assert worker.main(join) == 2
    assert "at most 8 worker processes" in error_line(capsys)
    overfit = str(REPO / "studies/experiments/overfit.toml")
    assert experiment.main([overfit, "--workers", "99"]) == 2
    assert "--workers 99: at most 8" in error_line(capsys)


def test_more_workers_than_cores_is_a_warning(capsys, monkeypatch):
    monkeypatch.setattr(pool, "cores", lambda: 2)
    pool.check_workers(3)
    assert "warning: 3 workers on 2 core(s)" in capsys.readouterr().err
    pool.check_workers(2)
    assert capsys.readouterr().err == ""


def test_in_memory_sqlite_is_refused(study, capsys):
    for url in ("sqlite:///", "sqlite:///:memory:", "sqlite://"):
        assert coarse.main(["--study", study, "--storage", url]) == 2
        assert "in-memory SQLite database keeps nothing" in error_line(capsys)


def test_data_dir_for_digits_is_refused(study, capsys):
    assert coarse.main(["--study", study, "--data-dir", "/tmp"]) == 2
    assert "uses the digits dataset, which ships with scikit-learn" in error_line(capsys)


def test_an_unexpected_error_is_one_line_and_debug_shows_the_traceback(study, capsys, monkeypatch):
    def broken(*args, **kwargs):
        raise KeyError("boom")

    monkeypatch.setattr(cli.st, "prepare_for", broken)
    assert coarse.main(["--study", study]) == 1
    assert error_line(capsys) == (
        "error: unexpected KeyError: 'boom' (--debug or C2F_DEBUG=1 shows the traceback)"
    )
    assert coarse.main(["--study", study, "--debug"]) == 1
    err = capsys.readouterr().err
    assert "Traceback" in err and err.rstrip().endswith("error: unexpected KeyError: 'boom'")
    monkeypatch.setenv("C2F_DEBUG", "1")
    assert coarse.main(["--study", study]) == 1
    assert "Traceback" in capsys.readouterr().err


def hint(out: str) -> list[str]:
    """The last ``next:`` line as the words a shell would see."""
    line = [line for line in out.splitlines() if line.startswith("next: ")][-1]
    return shlex.split(line[len("next: ") :].split("   ")[0])


# test_hints_of_a_command_that_cannot_start_keep_every_flag covers the hints (the time budget)
@pytest.mark.slow
def test_every_stage_ends_with_its_next_command_with_the_same_flags(study, tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'elsewhere.db'}"
    flags = ["--study", study, "--storage", url]
    assert coarse.main(flags) == 0
    assert hint(capsys.readouterr().out) == ["python", "-m", "search.fine", *flags]
    assert fine.main(flags) == 0
    assert hint(capsys.readouterr().out) == ["python", "-m", "search.final", *flags]
    assert final.main(flags) == 0
    assert hint(capsys.readouterr().out) == ["python", "-m", "search.report", *flags]
    assert final.main(flags) == 0  # already recorded: the same next step
    assert hint(capsys.readouterr().out) == ["python", "-m", "search.report", *flags]
    assert report.main([*flags, "--out", str(tmp_path / "r")]) == 0
    words = hint(capsys.readouterr().out)
    assert words[:2] == ["open", str(tmp_path / "r" / "report.md")]
    # The same hints name c2f when the command was started as c2f.
    assert c2f.main(["coarse", *flags]) == 0
    assert hint(capsys.readouterr().out) == ["c2f", "fine", *flags]
    assert cli.LAUNCHER == "python -m"  # put back for the next command in this process


def test_hints_of_a_command_that_cannot_start_keep_every_flag(study, tmp_path, capsys):
    url = f"sqlite:///{tmp_path / 'empty.db'}"
    flags = f"--study {study} --storage {url}"
    assert report.main(["--study", study, "--storage", url]) == 2
    assert f"run python -m search.coarse {flags} first" in error_line(capsys)
    from search.config.study import load_spec

    assert not (load_spec(study).out_dir() / "report").exists()  # no empty folder left
    assert fine.main(["--study", study, "--storage", url]) == 2
    assert f"run python -m search.coarse {flags} first" in error_line(capsys)
    assert final.main(["--study", study, "--storage", url]) == 2
    assert f"run python -m search.coarse {flags} first" in error_line(capsys)


def test_status_resume_hint_keeps_the_data_dir(tmp_path, capsys, cifar_dir):
    """A study run with --data-dir and --n-val is resumed with them (the study records them)."""
    import dataclasses

    import optuna

    from search.config.study import load_spec
    from search.sweep import studies as st
    from tests.search.conftest import write_study

    path = write_study(tmp_path, "cf", data={"name": "cifar10", "dir": "nowhere"})
    spec = cli.with_data_dir(load_spec(path), str(cifar_dir))
    spec = dataclasses.replace(spec, data=dataclasses.replace(spec.data, n_val=0.1))
    study = st.open_study(spec, "coarse")
    st.record_files(study, spec)
    study.set_user_attr("target", 3)
    study.add_trial(optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL))
    assert status.main(["--study", str(path)]) == 0
    out = capsys.readouterr().out
    resume = re.search(r"resume with (.*)\)", out).group(1)
    assert shlex.split(resume) == [
        "python", "-m", "search.coarse", "--study", str(path), "--data-dir", str(cifar_dir),
        "--n-val", "0.1",  # no --trials: the target recorded is below the file's
    ]  # fmt: skip
    assert spec.coarse.trials > 3


@pytest.mark.parametrize(
    "module,flags,absent",
    [
        (coarse, ["--study", "--data-dir", "--storage", "--workers", "--trials"], []),
        (fine, ["--top-k", "--margin", "--trials"], []),
        (final, ["--force"], ["--workers", "--trials"]),
        (report, ["--out", "--all", "--experiment"], ["--workers", "--trials"]),
        (status, ["--grace-period"], ["--workers", "--trials", "--data-dir"]),
    ],
)
def test_help_shows_defaults_exit_codes_and_only_the_flags_used(module, flags, absent, capsys):
    with pytest.raises(SystemExit) as done:
        module.main(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())
    for flag in flags:
        assert flag in text
    for flag in absent:
        assert flag not in text
    assert "exit codes: 0 done; 1 the run failed" in text and "2 bad settings or usage" in text
    assert "130 / 143 / 129" in text and "--debug" in text
    if module in (coarse, status):
        assert "(default: studies/quickstart.toml)" in text


def test_c2f_runs_every_command_and_knows_its_version(capsys):
    assert c2f.main([]) == 2
    usage = capsys.readouterr().out
    for name in c2f.COMMANDS:
        assert f"  {name} " in usage
    assert c2f.main(["--version"]) == 0
    assert re.fullmatch(r"c2f \(coarse2fine\) \S.*\n", capsys.readouterr().out)
    assert c2f.main(["corse"]) == 2
    assert "unknown command 'corse'; did you mean coarse?" in error_line(capsys)
    for name in c2f.COMMANDS:
        with pytest.raises(SystemExit) as done:
            c2f.main([name, "--help"])
        assert done.value.code == 0
        assert f"usage: c2f {name}" in capsys.readouterr().out
    assert c2f.main(["gradcheck", "--hidden", "5", "--d-in", "4", "--samples", "3"]) == 0
    assert "max relative error" in capsys.readouterr().out


def test_c2f_init_copies_the_shipped_studies(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert coarse.main([]) == 2  # a new directory has no studies/: says what to do
    assert "`c2f init` copies the shipped study files" in error_line(capsys)
    assert c2f.main(["init"]) == 0
    out = capsys.readouterr().out
    shipped = sorted(p.relative_to(REPO / "studies") for p in (REPO / "studies").rglob("*.toml"))
    copied = sorted(p.relative_to(tmp_path / "studies") for p in tmp_path.rglob("*.toml"))
    assert copied == shipped and len(shipped) == 10
    assert (tmp_path / "studies/quickstart.toml").read_bytes() == (
        REPO / "studies/quickstart.toml"
    ).read_bytes()
    assert out.rstrip().endswith("next: c2f coarse   (digits, offline, under a minute)")
    # Edits are kept: init again copies nothing over them, unless --force.
    (tmp_path / "studies/quickstart.toml").write_text("# mine\n")
    assert c2f.main(["init"]) == 0
    assert "kept 10 file(s)" in capsys.readouterr().out
    assert (tmp_path / "studies/quickstart.toml").read_text() == "# mine\n"
    assert c2f.main(["init", "mine", "--force"]) == 0
    assert "next: c2f coarse --study mine/quickstart.toml" in capsys.readouterr().out


def test_importing_the_commands_leaves_optunas_logging_alone(study):
    """A notebook's own studies keep their log level: only a command's run sets it."""
    import subprocess
    import sys

    import optuna

    code = (
        "import optuna; optuna.logging.set_verbosity(optuna.logging.DEBUG); "
        "import search.c2f, search.cli, search.coarse, search.fine, search.final, "
        "search.report, search.status, search.worker, search.experiment, model.train; "
        "print(optuna.logging.get_verbosity())"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO)
    assert done.stdout.strip() == str(optuna.logging.DEBUG), done.stderr
    optuna.logging.set_verbosity(optuna.logging.DEBUG)
    try:
        assert status.main(["--study", study]) == 2  # a command's run: nothing to show
        assert optuna.logging.get_verbosity() == optuna.logging.DEBUG  # put back after it
    finally:
        optuna.logging.set_verbosity(optuna.logging.INFO)


def test_a_valueerror_of_the_service_is_unexpected_not_a_usage_error(
    quick_study, capsys, monkeypatch
):
    """Only a value the user gave is exit 2 (UsageError, a study file's errors among
    them); a ValueError the service's own code raised (a bug, a library) is said as
    unexpected, exit 1, with the hint to the traceback."""
    from model.errors import UsageError

    path = quick_study(coarse={"trials": 1})

    def crash(*args, **kwargs):
        raise ValueError("max() arg is an empty sequence")

    monkeypatch.setattr(final, "retrain", crash)
    assert final.main(["--study", str(path)]) == 1
    err = capsys.readouterr().err
    assert "error: unexpected ValueError: max() arg is an empty sequence (--debug" in err

    def refused(*args, **kwargs):
        raise UsageError("--seeds 0: give 1 or more")

    monkeypatch.setattr(final, "retrain", refused)
    assert final.main(["--study", str(path)]) == 2
    assert capsys.readouterr().err.strip() == "error: --seeds 0: give 1 or more"


@pytest.mark.parametrize(
    ("variable", "value", "words"),
    [
        ("C2F_WORKERS", "two", "C2F_WORKERS='two': must be an integer"),
        ("C2F_TRIALS", "1e3", "C2F_TRIALS='1e3': must be an integer (write 1000)"),
        ("C2F_POLL", "fast", "C2F_POLL='fast': must be a number"),
    ],
)
def test_a_bad_worker_environment_variable_is_a_usage_error_naming_it(
    variable, value, words, monkeypatch, capsys
):
    monkeypatch.setenv(variable, value)
    with pytest.raises(SystemExit) as exc:
        worker.main(["--storage", "sqlite:///x.db", "--study-name", "a-coarse"])
    assert exc.value.code == 2 and words in capsys.readouterr().err


def test_an_out_folder_that_cannot_be_made_is_refused_before_any_work(tmp_path, capsys):
    from model import train

    a_file = tmp_path / "notes.txt"
    a_file.write_text("not a folder")
    study = tmp_path / "s.toml"
    assert report.main(["--study", str(study), "--out", str(a_file / "x")]) == 2
    assert f"--out {a_file / 'x'}: {a_file} is a file, not a folder" in capsys.readouterr().err
    assert train.main(["--out", str(a_file / "x"), "--cycles", "1"]) == 2
    err = capsys.readouterr().err
    assert f"{a_file} is a file, not a folder" in err and "training" not in err
