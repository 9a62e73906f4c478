"""A worker's trial cache and trials queued by other processes: a trial queued between the
worker's last read and its take runs with its parameters (it used to fail with KeyError)."""

from __future__ import annotations

import optuna
import pytest
from optuna.trial import TrialState

from search.sweep.workers import loop
from search.sweep.workers import storage as storage_module
from search.sweep.workers.signals import StopFlag
from search.sweep.workers.storage import make_storage, release


@pytest.mark.parametrize("cache_api", ["private", "public fallback"])
def test_a_fixed_trial_queued_between_a_workers_last_read_and_its_take_completes(
    any_storage_url, monkeypatch, cache_api
):
    if cache_api == "public fallback":  # as if Optuna had changed its trial cache
        monkeypatch.setattr(storage_module, "_CACHE_PRIVATES", False)
    # Two storage objects, as two processes have: the worker's, whose cache is filled by
    # its reads, and another command's, which queues a replicate with fixed parameters.
    worker_storage, other_storage = make_storage(any_storage_url), make_storage(any_storage_url)
    study = optuna.create_study(storage=worker_storage, study_name="s", direction="maximize")
    study.enqueue_trial({"x": 0.25})  # known to the worker's cache: it made it
    other = optuna.load_study(study_name="s", storage=other_storage)
    real_take = loop.take
    queued: list[int] = []

    def take_after_another_queues(storage, study_id):  # noqa: ANN001, ANN202
        if len(queued) == 1:  # after the worker's last read (the reaper's), before its take
            other.enqueue_trial({"x": 0.5})
        queued.append(1)
        return real_take(storage, study_id)

    monkeypatch.setattr(loop, "take", take_after_another_queues)
    sweep = loop.Sweep(
        storage=worker_storage,
        study=study,
        objective=lambda trial: trial.suggest_float("x", 0.0, 1.0),
        heartbeat_interval=60.0,
        grace_period=120.0,
    )
    assert loop.run_queue(sweep, StopFlag(), log=lambda line: None) == 2
    trials = optuna.load_study(study_name="s", storage=other_storage).get_trials()
    assert [(t.state, t.params, t.value) for t in trials] == [
        (TrialState.COMPLETE, {"x": 0.25}, 0.25),
        (TrialState.COMPLETE, {"x": 0.5}, 0.5),
    ], [t.user_attrs.get("reason") for t in trials]
    release(worker_storage)
    release(other_storage)


def test_optunas_trial_cache_still_has_what_learn_trial_uses():
    """Fails when Optuna changes its trial cache: learn_trial then reads every waiting trial
    (the public fallback, correct but slow with a large queue); update learn_trial."""
    assert storage_module._CACHE_PRIVATES
