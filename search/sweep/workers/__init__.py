"""The workers' floor: the queue of trials and the processes that run it.

Nothing here knows a network or a study file: storages and their failures
(:mod:`.storage`, the one module that touches Optuna's private API), who runs a
trial and the lost-worker rule (:mod:`.lost`), signals (:mod:`.signals`), the
worker loop that takes a queued trial, runs an objective and tells the result
(:mod:`.loop`), the pool of worker processes that joblib launches (:mod:`.pool`),
and the same workers on a Dask cluster (:mod:`.cluster`). The floors
above (:mod:`search.sweep`: the stage driver, the objective, replicates,
narrowing) hand it an objective and a job; it hands back finished trials.
"""
