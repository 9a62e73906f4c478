"""The history a worker's trials run with: the same finished trials as Optuna reads, the
queue never read, a trial finished here seen at once; one write to take a trial and one
for its record."""

from __future__ import annotations

import datetime
import json

import optuna
import pytest
from optuna.storages import RDBStorage
from optuna.trial import TrialState

from search.sweep.studies import top_up
from search.sweep.workers import storage as storage_module
from search.sweep.workers.history import FINISHED, History
from search.sweep.workers.loop import Sweep, run_queue
from search.sweep.workers.signals import StopFlag
from search.sweep.workers.storage import (
    claim,
    finished_trial_ids,
    make_storage,
    release,
    set_trial_attrs,
    state_counts,
    trial_id,
)

PARAMS = {"x": optuna.distributions.FloatDistribution(0.0, 1.0)}


def new_study(url: str) -> tuple[object, optuna.Study, int]:
    storage = make_storage(url)
    study = optuna.create_study(storage=storage, study_name="h", direction="maximize")
    return storage, study, storage.get_study_id_from_name("h")


def finish(study: optuna.Study, state: TrialState, x: float) -> None:
    """Another process runs a trial to ``state``."""
    trial = study.ask(PARAMS)
    trial.report(x, 1)
    study.tell(trial, x if state == TrialState.COMPLETE else None, state=state)


def described(trials) -> list[tuple]:
    return [(t.number, t.state, t.params, t.intermediate_values, t.value) for t in trials]


def test_the_history_lists_the_finished_trials_optuna_lists(any_storage_url):
    _, other, sid = new_study(any_storage_url)  # another process, which runs the trials
    history = History(make_storage(any_storage_url), look_share=0.0)  # type: ignore[abstract]
    finish(other, TrialState.COMPLETE, 0.3)
    running = other.ask(PARAMS)  # finishes last, after a higher-numbered trial
    other.enqueue_trial({"x": 0.5})
    assert described(history.get_all_trials(sid)) == described(other.get_trials(states=FINISHED))
    finish(other, TrialState.PRUNED, 0.1)  # takes the queued trial: number 2
    finish(other, TrialState.FAIL, 0.2)
    other.tell(running, 0.9)
    for states in (None, FINISHED, (TrialState.COMPLETE,), (TrialState.PRUNED, TrialState.FAIL)):
        assert described(history.get_all_trials(sid, states=states)) == described(
            other.get_trials(states=states or FINISHED)
        )
    assert history.get_best_trial(sid).value == other.best_value == 0.9
    live = other.ask(PARAMS)
    other.enqueue_trial({"x": 0.7})
    # Unfinished trials only when asked for by state, read afresh; counted by the database.
    for state in (TrialState.RUNNING, TrialState.WAITING):
        assert described(history.get_all_trials(sid, states=(state,))) == described(
            other.get_trials(states=(state,))
        )
        assert history.get_n_trials(sid, state) == 1
    assert history.get_n_trials(sid) == len(other.get_trials()) == 6
    other.tell(live, 0.1)


def test_a_trial_finished_here_is_seen_at_once_another_processes_when_it_looks(tmp_path):
    url = f"sqlite:///{tmp_path / 'h.db'}"
    _, other, sid = new_study(url)
    storage = make_storage(url)
    # A look lasts for ever: only a trial told here makes the history look again.
    history = History(storage, look_share=1e12)  # type: ignore[abstract]
    study = optuna.Study("h", storage=history, sampler=other.sampler, pruner=other.pruner)
    assert history.get_all_trials(sid) == []
    finish(other, TrialState.COMPLETE, 0.3)
    assert history.get_all_trials(sid) == []  # not looked at since
    finish(study, TrialState.COMPLETE, 0.6)
    assert [t.value for t in history.get_all_trials(sid)] == [0.3, 0.6]
    # A running trial read before it finished here is listed once, finished.
    running = study.ask(PARAMS)
    assert [t.state for t in history.get_all_trials(sid, states=(TrialState.RUNNING,))] == [
        TrialState.RUNNING
    ]
    study.tell(running, 0.9)
    both = history.get_all_trials(sid, states=(TrialState.COMPLETE, TrialState.RUNNING))
    assert [(t.state, t.value) for t in both] == [
        (TrialState.COMPLETE, 0.3),
        (TrialState.COMPLETE, 0.6),
        (TrialState.COMPLETE, 0.9),
    ]
    # Looking every time: another process's trial is seen by the next read.
    fresh = History(storage, look_share=0.0)  # type: ignore[abstract]
    finish(other, TrialState.PRUNED, 0.1)
    assert len(fresh.get_all_trials(sid)) == 4


def test_a_large_queue_is_never_read_by_a_workers_trials(tmp_path, monkeypatch):
    """Each trial reads what changed, not the queue: with 2,000 WAITING trials, running 5
    builds a few trials a trial (Optuna's cache rebuilt every waiting one at every read)."""
    url = f"sqlite:///{tmp_path / 'q.db'}"
    storage, study, sid = new_study(url)
    top_up(study, 2000)
    built = []
    build = RDBStorage._build_frozen_trial_from_trial_model

    def counted(self, trial_model):  # noqa: ANN001, ANN202
        built.append(trial_model.trial_id)
        return build(self, trial_model)

    monkeypatch.setattr(RDBStorage, "_build_frozen_trial_from_trial_model", counted)
    ran = []

    def objective(trial: optuna.Trial) -> float:
        x = trial.suggest_float("x", 0.0, 1.0)
        for step in range(1, 4):
            trial.report(x, step)
            trial.should_prune()
        ran.append(x)
        if len(ran) == 5:
            stop.request(15)  # then the worker stops before its next take
        return x

    stop = StopFlag()
    sweep = Sweep(storage, study, objective, heartbeat_interval=60.0, grace_period=120.0)
    sweep.study.pruner = optuna.pruners.PercentilePruner(33.0, n_startup_trials=1)
    assert run_queue(sweep, stop, log=lambda line: None) == 5
    assert len(built) <= 6 * 5, len(built)
    release(storage)


def test_one_query_says_which_trials_finished_and_how_many_are_in_each_state(any_storage_url):
    storage, study, sid = new_study(any_storage_url)
    finish(study, TrialState.COMPLETE, 0.3)
    finish(study, TrialState.FAIL, 0.3)
    study.ask(PARAMS)
    study.enqueue_trial({"x": 0.5})
    ids, counts = finished_trial_ids(storage, sid), state_counts(storage, sid)
    if any_storage_url.startswith("journal"):
        assert ids is None and counts is None  # Optuna's own reads instead
        return
    assert sorted(ids) == sorted(trial_id(t) for t in study.get_trials(states=FINISHED))
    assert counts == {
        TrialState.COMPLETE: 1,
        TrialState.FAIL: 1,
        TrialState.WAITING: 1,
        TrialState.RUNNING: 1,
    }


@pytest.mark.parametrize("batched", [True, False])
def test_a_trials_attrs_are_written_together_as_one_by_one(any_storage_url, monkeypatch, batched):
    if not batched:  # as if Optuna had changed the tables set_trial_attrs writes
        monkeypatch.setattr(storage_module, "_FAST_ATTRS", False)
    storage, study, sid = new_study(any_storage_url)
    trial = study.ask(PARAMS)
    trial.set_user_attr("seed", 1)
    user = {"seed": 7, "wall_time": 0.25, "diverged": False, "result": {"val_acc": 0.5}}
    set_trial_attrs(storage, trial_id(trial), user=user, system={"c2f_curves": {"step": [1]}})
    frozen = storage.get_trial(trial_id(trial))
    assert frozen.user_attrs == user
    assert json.dumps(frozen.system_attrs["c2f_curves"]) == '{"step": [1]}'
    study.tell(trial, 0.5)
    with pytest.raises(optuna.exceptions.UpdateFinishedTrialError):
        set_trial_attrs(storage, trial_id(trial), user={"late": 1})


def test_optunas_tables_still_have_what_set_trial_attrs_writes():
    """Fails when Optuna changes them: set_trial_attrs then writes one attr at a time
    (correct, slower); update it."""
    assert storage_module._FAST_ATTRS


def test_claiming_a_trial_takes_it_once_and_says_who_runs_it(any_storage_url):
    storage, study, sid = new_study(any_storage_url)
    study.enqueue_trial({"x": 0.5})
    finish(study, TrialState.COMPLETE, 0.3)  # takes the queued trial
    study.enqueue_trial({"x": 0.25})
    done, queued = (trial_id(t) for t in study.get_trials())
    before = datetime.datetime.now()
    assert claim(storage, queued, {"c2f_owner": {"pid": 1}})
    assert not claim(storage, queued, {"c2f_owner": {"pid": 2}})  # taken: RUNNING
    assert not claim(storage, done, {"c2f_owner": {"pid": 2}})  # finished
    frozen = study.get_trials()[1]
    assert frozen.state == TrialState.RUNNING and frozen.system_attrs["c2f_owner"] == {"pid": 1}
    assert frozen.system_attrs["fixed_params"] == {"x": 0.25}
    assert before - datetime.timedelta(seconds=1) <= frozen.datetime_start
    assert frozen.datetime_start <= datetime.datetime.now()
    study.tell(1, 0.25)  # told as any trial
    assert study.get_trials()[1].state == TrialState.COMPLETE
