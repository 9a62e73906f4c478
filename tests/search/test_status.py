"""search.status: counts per state, best trial, running / stale / done / incomplete, exit codes."""

from __future__ import annotations

import dataclasses
import datetime as dt
import time

import optuna
import pytest
from optuna.distributions import FloatDistribution
from optuna.trial import TrialState

from search import status
from search.sweep.workers import lost
from search.sweep.workers.storage import make_storage
from tests.search.conftest import write_study

DIST = {"l2_lambda": FloatDistribution(1e-5, 1e-1, log=True)}


@pytest.fixture
def storage_url(tmp_path) -> str:
    return f"sqlite:///{tmp_path / 'status.db'}"


def _study(storage, name: str, target: int | None) -> optuna.Study:
    study = optuna.create_study(storage=storage, study_name=name, direction="maximize")
    if target is not None:
        study.set_user_attr("target", target)
    return study


def _add(
    study: optuna.Study,
    state: TrialState,
    value: float | None = None,
    lam: float = 1e-3,
    replicate: int = 0,
):
    study.add_trial(
        optuna.trial.create_trial(
            state=state,
            value=value,
            params={"l2_lambda": lam},
            distributions=DIST,
            intermediate_values={10: 0.5} if state == TrialState.PRUNED else None,
            user_attrs={"replicate": replicate} if replicate else None,
        )
    )


def _running(
    storage, study: optuna.Study, *, started_ago: float = 0.0, beat_ago: float | None = None
) -> int:
    """A RUNNING trial started ``started_ago`` s ago; its worker beat ``beat_ago`` s ago
    (None: no owner recorded at all)."""
    template = optuna.trial.create_trial(state=TrialState.RUNNING)
    template.datetime_start = dt.datetime.now() - dt.timedelta(seconds=started_ago)
    sid = storage.get_study_id_from_name(study.study_name)
    tid = storage.create_new_trial(sid, template_trial=template)
    if beat_ago is not None:
        owner = {**lost.owner_record(), "machine": "elsewhere", "t": time.time() - beat_ago}
        storage.set_trial_system_attr(tid, lost.OWNER, owner)
    return tid


def _line(out: str, name: str) -> str:
    return next(line for line in out.splitlines() if line.startswith(name + ":"))


def test_counts_best_done_and_incomplete(storage_url, capsys):
    storage = make_storage(storage_url)
    c = _study(storage, "toy-coarse", target=6)
    _add(c, TrialState.COMPLETE, 0.8, lam=1e-4)
    _add(c, TrialState.COMPLETE, 0.9, lam=2e-3)
    _add(c, TrialState.COMPLETE, 0.8, lam=1e-4, replicate=1)
    _add(c, TrialState.COMPLETE, 0.84, lam=1e-4, replicate=2)  # 0.813 +- 0.023, n=3
    _add(c, TrialState.PRUNED)
    _add(c, TrialState.FAIL)
    _add(c, TrialState.WAITING)
    f = _study(storage, "toy-fine", target=2)
    _add(f, TrialState.COMPLETE, 0.95)
    _add(f, TrialState.PRUNED)

    assert status.main(["--storage", storage_url]) == 0
    out = capsys.readouterr().out
    assert "COMPLETE 4, PRUNED 1, FAIL 1, RUNNING 0, WAITING 1" in out
    # Replicates come on top of the target; a mean over seeds beats a single lucky run.
    assert "3/6 finished (+ 2 replicate runs)" in out
    assert "best     0.8133 +- 0.0231 (n=3; l2_lambda=1.000e-04)" in out
    coarse_line = _line(out, "toy-coarse")
    assert "incomplete (resume with python -m search.coarse --study studies/toy.toml" in (
        coarse_line
    )
    assert f"--storage {storage_url}" in coarse_line
    assert _line(out, "toy-fine") == "toy-fine: done"

    s = status.study_status(storage, "toy-coarse", grace_period=30)
    assert s.counts == {"COMPLETE": 4, "PRUNED": 1, "FAIL": 1, "RUNNING": 0, "WAITING": 1}
    assert s.best_value == pytest.approx(0.81333, abs=1e-4) and s.best_n == 3
    assert s.best_params == {"l2_lambda": 1e-4} and s.target == 6


def test_running_and_stale_trials(storage_url, capsys):
    storage = make_storage(storage_url)
    live = _study(storage, "live-coarse", target=3)
    _running(storage, live, started_ago=600, beat_ago=1)
    killed = _study(storage, "killed-coarse", target=3)
    _running(storage, killed, beat_ago=0)
    _running(storage, killed, started_ago=600, beat_ago=600)
    silent = _study(storage, "silent-fine", target=3)
    _running(storage, silent, started_ago=600)  # taken, never claimed by a worker
    fresh = _study(storage, "fresh-fine", target=3)
    _running(storage, fresh)  # just taken: its owner record is on its way

    assert status.main(["--storage", storage_url, "--grace-period", "5"]) == 0
    out = capsys.readouterr().out
    assert _line(out, "live-coarse").startswith("live-coarse: running")
    # killed-coarse has one trial just taken (alive) and one stale: still running
    assert _line(out, "killed-coarse").startswith("killed-coarse: running (1 trial")
    # ... and the stale one is said, not hidden behind the live one
    assert "; 1 RUNNING without one, which the running workers or python -m search.coarse" in (
        _line(out, "killed-coarse")
    )
    assert "without one" not in _line(out, "live-coarse")
    silent_line = _line(out, "silent-fine")
    assert silent_line.startswith("silent-fine: stale (1 RUNNING trial(s)")
    assert "run python -m search.fine --study studies/silent.toml" in silent_line
    assert "again to retry them" in silent_line
    assert _line(out, "fresh-fine").startswith("fresh-fine: running")

    gone_study = _study(storage, "gone-coarse", target=3)
    gone = _running(storage, gone_study, started_ago=600, beat_ago=600)
    s = status.study_status(storage, "gone-coarse", grace_period=5)
    assert (s.alive, s.stale) == (0, 1) and s.verdict.startswith("stale")
    # The same rule as the workers' reaper: what status calls stale, a worker re-queues.
    sid = storage.get_study_id_from_name("gone-coarse")
    assert lost.reap(storage, sid, grace_period=5) == [storage.get_trial(gone).number]


def test_study_flag_reads_the_study_files_storage(tmp_path, capsys):
    path = write_study(tmp_path, "qs")
    assert status.main(["--study", str(path)]) == 2  # nothing has run: no database
    err = capsys.readouterr().err
    assert err.startswith("error: no database at") and "Traceback" not in err
    assert f"run python -m search.coarse --study {path} first" in err
    assert not (tmp_path / "qs.db").exists()
    storage = make_storage(f"sqlite:///{tmp_path / 'qs.db'}")
    _add(_study(storage, "qs-coarse", target=1), TrialState.COMPLETE, 0.5)
    assert status.main(["--study", str(path)]) == 0
    assert "qs-coarse: done" in capsys.readouterr().out


def test_exit_codes(tmp_path, storage_url, capsys):
    make_storage(storage_url)  # an empty database: nothing to show, as for the other commands
    assert status.main(["--storage", storage_url]) == 2
    assert f"no studies in {storage_url}; run python -m search.coarse --storage" in (
        capsys.readouterr().err
    )
    assert status.main(["--study", str(tmp_path / "missing.toml")]) == 2
    assert "no such study file" in capsys.readouterr().err
    assert status.main(["--storage", "not-a-url"]) == 2
    assert status.main(["--storage", storage_url, "--grace-period", "0"]) == 2
    capsys.readouterr()
    assert status.main(["--storage", storage_url, "--grace-period", "nan"]) == 2
    assert "--grace-period must be a number of seconds > 0, got nan" in capsys.readouterr().err


def test_reasons_alike_but_for_their_values_count_as_one():
    from search.sweep.standing import failure_reasons

    study = optuna.create_study()
    reasons = [
        "UserResultError: net.py:train called report(): step must be an integer, got 36.0",
        "UserResultError: net.py:train called report(): step must be an integer, got 7.5",
        "UserResultError: net.py:train called report(): step must be an integer, got 1e3",
        "ValueError: width too large",
    ]
    for r in reasons:
        study.add_trial(optuna.trial.create_trial(state=TrialState.FAIL, user_attrs={"reason": r}))
    assert failure_reasons(study) == [
        (
            "UserResultError: net.py:train called report(): step must be an integer, got 1e3"
            " (values vary)",
            3,
        ),
        ("ValueError: width too large", 1),
    ]


def test_status_ranks_the_best_as_the_stages_table_does(tmp_path):
    """With the stage's replicates (1 in the fine stage by default), as its table and the
    report rank them; 2 when the study file is not known."""
    from search.config.study import load_spec
    from search.sweep import replicates as rep
    from search.sweep import studies as st

    spec = load_spec(write_study(tmp_path, fine={"replicates": 1}))
    study = st.open_study(spec, "fine")
    dist = {"l2_lambda": FloatDistribution(1e-5, 1e-1, log=True)}
    for lam, value, index in [(1e-3, 0.99, 0), (1e-2, 0.97, 0), (1e-2, 0.98, 1)]:
        study.add_trial(
            optuna.trial.create_trial(
                params={"l2_lambda": lam},
                distributions=dist,
                value=value,
                user_attrs={rep.REPLICATE: index},
            )
        )
    storage = st.storage_for(spec)
    name = study.study_name
    by_table = status.study_status(storage, name, grace_period=30, spec=spec)
    assert by_table.best_params == {"l2_lambda": 1e-3} and by_table.best_n == 1
    unknown = status.study_status(storage, name, grace_period=30)
    assert unknown.best_params == {"l2_lambda": 1e-2} and unknown.best_n == 2


def test_the_resume_command_keeps_a_target_given_with_trials(tmp_path):
    """A stage run with --trials 300 and stopped resumes with --trials 300: the study
    file's lower target would retire the trials still waiting."""
    from search.config.study import load_spec
    from search.sweep import studies as st

    path = write_study(tmp_path, "tg")  # [coarse] trials of the file
    spec = load_spec(path)
    study = st.open_study(spec, "coarse")
    own = spec.coarse.trials
    st.top_up(study, own + 7)  # as `--trials` more than the file's
    storage = make_storage(spec.storage_url())
    s = status.study_status(storage, "tg-coarse", grace_period=30, study_path=str(path), spec=spec)
    assert s.verdict.startswith("incomplete (resume with") and f"--trials {own + 7}" in s.verdict
    assert st.trials_flag(study, spec, "coarse") == f" --trials {own + 7}"
    st.top_up(study, own)  # the file's own target: no flag needed
    assert st.trials_flag(study, spec, "coarse") == ""
    st.top_up(study, own + 7)
    assert st.trials_flag(study, None, "coarse") == ""  # the file unknown: nothing to add
    # a file edited to a higher target since: its own target is kept, not the old one
    higher = dataclasses.replace(spec, coarse=dataclasses.replace(spec.coarse, trials=own + 20))
    assert st.trials_flag(study, higher, "coarse") == ""
    # the fine stage counts the coarse runs it carried over on top of its target
    fine = st.open_study(spec, "fine")
    for number in range(5):
        fine.add_trial(
            optuna.trial.create_trial(
                value=0.9,
                params={"x": float(number)},
                distributions={"x": FloatDistribution(0, 10)},
                user_attrs={st.FROM_COARSE_ATTR: number},
            )
        )
    fine.set_user_attr("target", spec.fine.trials + 5)  # as run_stage records it
    assert st.trials_flag(fine, spec, "fine") == ""
    fine.set_user_attr("target", spec.fine.trials + 5 + 30)  # --trials (file's + 30)
    assert st.trials_flag(fine, spec, "fine") == f" --trials {spec.fine.trials + 30}"


def test_where_a_failure_was_raised_is_the_users_line_not_a_librarys():
    """A user's call into NumPy that fails: the line named is the user's call, not the
    NumPy frame where the error surfaced; with only library frames, the last of them."""
    import sysconfig

    from search.sweep.standing import _SERVICE, raised_at

    lib = sysconfig.get_paths()["purelib"]
    text = (
        "Traceback (most recent call last):\n"
        f'  File "{_SERVICE}sweep/user_train.py", line 10, in run\n'
        "    result = train(hp, data, reporter)\n"
        '  File "/home/me/nr.py", line 4, in train\n'
        "    np.reshape(data.test.X, (7, 7, 7))\n"
        f'  File "{lib}/numpy/core/fromnumeric.py", line 54, in _wrapfunc\n'
        "    return bound(*args, **kwds)\n"
        "ValueError: cannot reshape array\n"
    )
    assert raised_at(text) == "nr.py:4 in train: np.reshape(data.test.X, (7, 7, 7))"
    only = text.replace('"/home/me/nr.py"', f'"{lib}/pkg/nr.py"')
    assert raised_at(only) == "fromnumeric.py:54 in _wrapfunc: return bound(*args, **kwds)"
