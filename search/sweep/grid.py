"""Running an experiment's grid as one resumable Optuna study, and reading its results.

Every point of the grid is one trial of the study ``<name>-grid`` in the study
file's storage; the dashboard shows them like any sweep. :func:`run` queues one
WAITING trial per grid point that is not finished or queued yet and runs the
queue, so a killed run resumes where it stopped and a finished experiment trains
nothing when run again. Each trial stores the curves, wall time, epochs, whether
it diverged, and the test accuracy ("test_acc") of the trained network.

Runs on other data belong in another database: a study refuses data it was not
created with.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import optuna
from optuna.distributions import CategoricalDistribution
from optuna.trial import TrialState

from model.data import Dataset, Splits
from model.errors import UsageError
from search.config import space as sp
from search.config.experiment import Experiment, load_experiment
from search.config.study import StudyDefinitionError
from search.sweep import studies, user_train
from search.sweep import studies as st
from search.sweep.objective import run_trial
from search.sweep.prepared import Prepared
from search.sweep.stage import drive
from search.sweep.workers import bookkeeping, lost
from search.sweep.workers.loop import Sweep, worker_log
from search.sweep.workers.pool import threads_per
from search.sweep.workers.storage import (
    check_storage,
    make_storage,
    sqlite_path,
    storage_of,
    with_retries,
)

# ----------------------------------------------------------------------------- the study


class _QueueGridSampler(optuna.samplers.GridSampler):
    """GridSampler whose grid is walked through the trial queue, not ``study.optimize``.

    GridSampler calls ``study.stop()`` once the grid is covered, which raises
    outside ``optimize``; here the empty queue is what ends a run.
    """

    def after_trial(self, study, trial, state, values) -> None:  # noqa: ANN001
        return None


def check_grid_change(experiment: Experiment, study: optuna.Study) -> None:
    """Refuse a grid whose categorical choices changed since the study ran.

    Optuna fixes a categorical parameter's choices in a study once a trial used
    them; the new points would all fail. Float grids may change freely.
    """
    recorded = study.user_attrs.get("experiment", {}).get("grid", {})
    used = {k for t in study.get_trials(deepcopy=False) for k in t.params}
    for name, dist in experiment.distributions().items():
        if not isinstance(dist, CategoricalDistribution) or name not in used:
            continue
        before = recorded.get(name)
        if before is not None and list(before) != list(dist.choices):
            raise UsageError(
                f"{experiment.spec.path}: [grid] {name} was {before} when study "
                f"{study.study_name} ran and is {list(dist.choices)} now; a study cannot "
                f"change the choices of {name!r}. Run the changed grid in another database "
                "(--storage sqlite:///path/other.db) or under another name"
            )


def open_study(
    experiment: Experiment, storage: optuna.storages.BaseStorage | None = None
) -> optuna.Study:
    """Create the experiment's study, or load it (``load_if_exists``)."""
    storage = storage if storage is not None else st.storage_for(experiment.spec)
    return with_retries(
        lambda: optuna.create_study(
            storage=storage,
            study_name=experiment.study_name,
            direction="maximize",
            sampler=_QueueGridSampler(experiment.encoded_grid(), seed=experiment.spec.optuna.seed),
            pruner=optuna.pruners.NopPruner(),
            load_if_exists=True,
        )
    )


def params_key(params: dict[str, Any]) -> tuple:
    """Trial params as a hashable key: one grid point, whatever the order of its names."""
    return tuple(sorted(params.items()))


def _trial_params(t: optuna.trial.FrozenTrial) -> dict[str, Any]:
    """A trial's params, or for a WAITING one the params it was queued with."""
    return t.params or t.system_attrs.get("fixed_params", {})


def queue_grid(study: optuna.Study, experiment: Experiment) -> int:
    """Queue one WAITING trial per grid point not finished, running or queued; returns how many.

    Failed trials (an exception, not a divergence) do not count: their point is queued again.
    """
    have = {
        params_key(_trial_params(t))
        for t in study.get_trials(deepcopy=False)
        if t.state in st.FINISHED + st.LIVE
    }
    queued = 0
    for point in experiment.points():
        params = experiment.params(point)
        if params_key(params) in have:
            continue
        study.enqueue_trial(params)
        have.add(params_key(params))
        queued += 1
    # The target counts finished trials, and trials of points since removed from
    # the grid stay finished: count them in, or the new points would never run.
    grid = {params_key(experiment.params(p)) for p in experiment.points()}
    off_grid = sum(
        params_key(t.params) not in grid
        for t in study.get_trials(deepcopy=False, states=st.FINISHED)
    )
    study.set_user_attr("target", len(grid) + off_grid)
    return queued


# ----------------------------------------------------------------------------- one trial


def restrict(splits: Splits, n_train: int | None, path: str | None = None) -> Splits:
    """The splits with the training set cut to its first ``n_train`` samples (``path``:
    the experiment file that asks for it, named in the error)."""
    if n_train is None:
        return splits
    train = splits.train
    if n_train > train.n:
        message = (
            f"n_train = {n_train} exceeds the {train.n} training samples; give at most {train.n}"
        )
        if path:
            raise StudyDefinitionError(path, "experiment.n_train", message)
        raise UsageError(message)
    cut = Dataset(train.X[:n_train], train.y[:n_train], train.n_classes, train.label_names)
    return Splits(cut, splits.val, splits.test)


class GridObjective:
    """``GridObjective(experiment, splits)(trial) -> final validation accuracy``.

    The trial's params are a grid point; the study file with the point merged in says
    what trains (the built-in network or the user's function, through the one
    objective's :func:`search.sweep.objective.run_trial`). Every point uses the same
    seed, so the grid compares settings, not initialisations; nothing is pruned. A
    diverged run ends PRUNED with ``diverged`` set; a finished one also stores
    ``test_acc`` and ``test_loss`` (the test set is given to the training function).
    """

    def __init__(self, experiment: Experiment, splits: Splits) -> None:
        self.experiment = experiment
        self.splits = restrict(splits, experiment.n_train, experiment.spec.path)
        spec = experiment.spec
        self.train = user_train.train_function(spec)
        self.data = user_train.user_data(self.splits, user_train.layout_of(spec), test=True)

    def __call__(self, trial: optuna.Trial) -> float:
        exp = self.experiment
        point = {k: v for k, v in sp.suggest(trial, exp.space()).items() if k in exp.grid}
        spec = exp.spec_for(point)
        seed = exp.spec.optuna.seed
        n_train = self.splits.train.n
        extra = exp.n_s_for(point, n_train, spec)
        config = spec.train_config("coarse", {**extra, "seed": seed})
        trial.set_user_attr("config", dataclasses.asdict(config))
        trial.set_user_attr("n_train", n_train)
        value, metrics = run_trial(
            trial, spec, "coarse", extra, self.data, seed=seed, prunes=False, train=self.train
        )
        if math.isfinite(metrics.get("test_acc", math.nan)):
            trial.set_user_attr("test_acc", metrics["test_acc"])
            if math.isfinite(metrics.get("test_loss", math.nan)):
                trial.set_user_attr("test_loss", metrics["test_loss"])
        return value if math.isfinite(value) else 0.0


# ----------------------------------------------------------------------------- running


@dataclass(frozen=True, eq=False)
class GridJob:
    """A worker of an experiment's study (picklable: it may cross to a spawned process)."""

    experiment: Experiment
    prepared_path: str
    checksum: str
    threads: int

    def open(self, worker: int) -> Sweep:
        spec = self.experiment.spec
        storage = make_storage(spec.storage_url(), log=worker_log)
        study = open_study(self.experiment, storage)
        prepared = Prepared(Path(self.prepared_path), self.checksum)
        return Sweep(
            storage,
            study,
            GridObjective(self.experiment, prepared.open()),
            heartbeat_interval=spec.optuna.heartbeat_interval,
            grace_period=spec.optuna.grace_period,
        )


def prepare_data(experiment: Experiment, *, log=print) -> Prepared:
    """The experiment's data, prepared once on disk for every worker."""
    return st.prepare_for(experiment.spec, log=log)


def run(experiment: Experiment, *, log=print) -> optuna.Study:
    """Queue the missing grid points and run them with ``spec.optuna.workers`` processes."""
    spec = experiment.spec
    user_train.check(spec)  # a user's function that cannot run is refused before any trial
    check_storage(spec.storage_url())  # a bad storage: refused before anything is written
    prepared = prepare_data(experiment, log=log)
    study = open_study(experiment)
    try:
        # The error class cli.guarded turns into exit code 2 lives in sweep.studies now.
        studies.record_data(study, prepared)
    except studies.DataMismatchError as exc:
        raise studies.DataMismatchError(
            f"{exc}. To run this experiment on other data, give it its own database: "
            "--storage sqlite:///runs/experiments-<data>.db"
        ) from None
    check_grid_change(experiment, study)
    studies.check_settings(
        study,
        spec,
        "coarse",
        varied=list(experiment.grid),
        extra={"n_s_epochs": experiment.n_s_epochs, "n_train": experiment.n_train},
    )
    splits = prepared.open()
    cut = restrict(splits, experiment.n_train, spec.path)
    study.set_user_attr(
        "experiment",
        {
            "kind": experiment.kind,
            "title": experiment.title,
            "file": str(spec.path),
            "dataset": spec.data.name,
            "n_train": cut.train.n,
            "n_val": cut.val.n,
            "n_test": cut.test.n,
            "grid": experiment.encoded_grid(),
        },
    )
    queued = queue_grid(study, experiment)
    total = len(experiment.points())
    c = st.counts(study)
    # No more workers than trials to run: each extra one would only start up and leave.
    workers = max(1, min(spec.optuna.workers, c["WAITING"]))
    log(
        f"experiment {experiment.name}: study {study.study_name} in {spec.storage_url()}: "
        f"{total} grid points, {c['COMPLETE'] + c['PRUNED']} finished, {queued} newly queued, "
        f"{workers} worker(s), data {spec.data.name} ({cut.train.n} train / {cut.val.n} val / "
        f"{cut.test.n} test)"
    )
    if c["WAITING"] + c["RUNNING"] == 0:
        return study
    study_id = storage_of(study).get_study_id_from_name(study.study_name)
    job = GridJob(experiment, str(prepared.path), prepared.checksum, threads_per(workers))
    drive(
        study,
        job,
        workers=workers,
        total=total,
        reap=lambda: lost.reap(storage_of(study), study_id, grace_period=spec.optuna.grace_period),
    )
    return study


@dataclass(frozen=True)
class Row:
    """One grid point and its finished trial (None if it has not run)."""

    point: dict[str, Any]
    trial: optuna.trial.FrozenTrial | None


def results(
    spec_path: str | Path, *, storage: str | None = None
) -> tuple[Experiment, optuna.Study, list[Row]]:
    """The experiment, its study and its grid points with their finished trials.

    Raises LookupError if the study is missing or has no finished trial.
    """
    experiment = load_experiment(spec_path, storage=storage)
    study = _finished_study(experiment, spec_path)
    return experiment, study, rows(experiment, study)


class NotRun(LookupError):
    """An experiment with no finished run; says the command that runs it (the reporting
    layer names it as the user runs commands: :func:`search.cli.command`)."""

    def __init__(
        self,
        name: str,
        spec_path: str | Path,
        storage: str | None,
        command: str = "python -m search.experiment",
    ) -> None:
        import shlex

        self.name = name
        self.arguments = " ".join(
            shlex.quote(str(a)) for a in (spec_path, *(("--storage", storage) if storage else ()))
        )
        self.command = command
        super().__init__(self.said())

    def run_line(self) -> str:
        """The command line that runs it."""
        return f"{self.command} {self.arguments}"

    def said(self) -> str:
        return f"experiment {self.name} has not been run: {self.run_line()}"

    def __str__(self) -> str:
        return self.said()


def _finished_study(experiment: Experiment, spec_path: str | Path) -> optuna.Study:
    not_run = NotRun(experiment.name, spec_path, experiment.spec.optuna.storage)
    url = experiment.spec.storage_url()
    db = sqlite_path(url)
    if db is not None and not db.exists():
        raise not_run
    storage = st.storage_for(experiment.spec)
    names = {s.study_name for s in optuna.get_all_study_summaries(storage)}
    if experiment.study_name not in names:
        raise not_run
    study = optuna.load_study(study_name=experiment.study_name, storage=storage)
    if not study.get_trials(deepcopy=False, states=st.FINISHED):
        raise not_run
    return study


def rows(experiment: Experiment, study: optuna.Study) -> list[Row]:
    """The grid points in file order, each with its latest finished trial."""
    by_key: dict[tuple, optuna.trial.FrozenTrial] = {}
    for t in study.get_trials(deepcopy=False, states=st.FINISHED):
        by_key[params_key(t.params)] = t
    return [
        Row(point, by_key.get(params_key(experiment.params(point))))
        for point in experiment.points()
    ]


def why_not_run(experiment: Experiment, study: optuna.Study, grid_rows: list[Row]) -> list[str]:
    """One line per grid point with no finished trial: the point and its last failure (a
    real one: not an interrupted run, re-queued; :mod:`search.sweep.workers.bookkeeping`)."""
    failed = [
        t
        for t in study.get_trials(deepcopy=False, states=(TrialState.FAIL,))
        if bookkeeping.kind(t) is None
    ]
    lines = []
    for row in grid_rows:
        if row.trial is not None:
            continue
        key = params_key(experiment.params(row.point))
        reasons = [t.user_attrs.get("reason", "?") for t in failed if params_key(t.params) == key]
        lines.append(f"{row.point}: {reasons[-1] if reasons else 'not run'}")
    return lines
