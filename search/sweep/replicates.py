"""Configurations and their replicates: the same hyperparameters trained with other seeds.

A single run's validation accuracy moves by a point or more with its seed, so a
stage's choices are made on configurations, not on runs. A configuration is
the set of trials of a study with the same parameters: the first run and its
replicates (user attr ``replicate`` = 1, 2, ...: the seed index, see
:func:`search.sweep.objective.trial_seed`). After a stage's search trials,
:func:`queue_replicates` queues more seeds of its best configurations as
ordinary WAITING trials, which any worker runs; every choice then uses
:func:`configurations`' means.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import cast

import optuna
from optuna.trial import FrozenTrial, TrialState

from model.errors import UsageError

REPLICATE = "replicate"


def replicate_index(trial: FrozenTrial | optuna.Trial) -> int:
    """0 for a search trial; the seed index of a replicate."""
    return int(trial.user_attrs.get(REPLICATE, 0))


def is_replicate(trial: FrozenTrial) -> bool:
    return replicate_index(trial) > 0


def params_key(params: dict[str, float]) -> tuple[tuple[str, float], ...]:
    return tuple(sorted(params.items()))


@dataclass
class Configuration:
    """One set of parameters and the completed runs of it (first run and replicates)."""

    params: dict[str, float]
    trials: list[FrozenTrial] = field(default_factory=list)

    @property
    def number(self) -> int:
        """The number of its first run (the configuration's name in tables)."""
        return min(t.number for t in self.trials)

    @property
    def values(self) -> list[float]:
        """One value a run; a run that diverged counts as 0 (it trained nothing usable)."""
        return [0.0 if _diverged(t) else float(cast(float, t.value)) for t in self.trials]

    @property
    def diverged(self) -> int:
        return sum(_diverged(t) for t in self.trials)

    @property
    def n(self) -> int:
        return len(self.values)

    @property
    def mean(self) -> float:
        return statistics.fmean(self.values)

    @property
    def sd(self) -> float:
        """Sample standard deviation over seeds; NaN for one run."""
        return statistics.stdev(self.values) if self.n > 1 else math.nan

    def describe(self) -> str:
        """``0.4213 +- 0.0061 (n=3)``, or the single value."""
        diverged = f", {self.diverged} diverged" if self.diverged else ""
        if self.n > 1:
            return f"{self.mean:.4f} +- {self.sd:.4f} (n={self.n}{diverged})"
        return f"{self.mean:.4f} (n=1{diverged})"

    def as_dict(self) -> dict:
        return {
            "params": self.params,
            "trials": sorted(t.number for t in self.trials),
            "mean": self.mean,
            "sd": None if self.n < 2 else self.sd,
            "n": self.n,
        }


def _diverged(t: FrozenTrial) -> bool:
    return t.state == TrialState.PRUNED and bool(t.user_attrs.get("diverged"))


def configurations(trials: Sequence[FrozenTrial], replicates: int = 1) -> list[Configuration]:
    """The COMPLETE trials grouped by parameters, best first.

    A replicate that diverged counts too (as 0: see :attr:`Configuration.values`),
    and one run per seed index: a replicate queued twice by two processes at
    once is counted once (the lower trial number). Best first means: the
    configurations with ``replicates`` runs (or as many as any has) by mean,
    then the others by mean. A single lucky run must not beat a mean over
    seeds (the winner's curse), so the first is always replicated when any is.
    """
    groups: dict[tuple, Configuration] = {}
    seen: set[tuple] = set()
    for t in sorted(trials, key=lambda t: t.number):
        counts = t.state == TrialState.COMPLETE and t.value is not None
        if not (counts or (_diverged(t) and is_replicate(t))):
            continue
        key = params_key(t.params)
        if (key, replicate_index(t)) in seen:
            continue
        seen.add((key, replicate_index(t)))
        groups.setdefault(key, Configuration(dict(t.params))).trials.append(t)
    groups = {k: c for k, c in groups.items() if any(not _diverged(t) for t in c.trials)}
    if not groups:
        return []
    enough = min(replicates, max(c.n for c in groups.values()))
    return sorted(
        groups.values(), key=lambda c: (c.n >= enough, c.mean, c.n, -c.number), reverse=True
    )


def study_configurations(study: optuna.Study, replicates: int = 1) -> list[Configuration]:
    return configurations(study.get_trials(deepcopy=False), replicates)


def pooled_sd(configs: Sequence[Configuration]) -> float | None:
    """The seed noise of one run: the pooled within-configuration standard deviation
    over configurations with two or more runs; None if there are none."""
    dof = sum(c.n - 1 for c in configs if c.n > 1)
    if dof == 0:
        return None
    ss = sum((c.n - 1) * c.sd**2 for c in configs if c.n > 1)
    return math.sqrt(ss / dof)


REPLICATED_AT = "replicated_at"  # study attr: search trials finished when replicates were queued


def replicates_due(study: optuna.Study) -> bool:
    """Whether the stage's search results changed since its replicates were queued
    (never queued, or the target was raised since): one round per set of results."""
    finished = sum(
        t.state in (TrialState.COMPLETE, TrialState.PRUNED) and not is_replicate(t)
        for t in study.get_trials(deepcopy=False)
    )
    return finished > int(study.user_attrs.get(REPLICATED_AT, -1))


def missing_replicates(study: optuna.Study, replicates: int, top: int) -> int:
    """Runs :func:`queue_replicates` would queue now (0 when the round is done)."""
    if replicates <= 1 or top < 1 or not replicates_due(study):
        return 0
    return len(_missing(study.get_trials(deepcopy=False), replicates, top))


def _missing(trials: Sequence[FrozenTrial], replicates: int, top: int) -> list[tuple[dict, int]]:
    present: dict[tuple, set[int]] = {}
    for t in trials:
        # A WAITING trial has no params yet, only the ones it was queued with.
        params = t.params or t.system_attrs.get("fixed_params", {})
        present.setdefault(params_key(params), set()).add(replicate_index(t))
    missing = []
    for config in configurations(trials)[:top]:
        have = present.get(params_key(config.params), set())
        missing += [(config.params, i) for i in range(1, replicates) if i not in have]
    return missing


def queue_replicates(study: optuna.Study, replicates: int, top: int) -> int:
    """Queue the missing seeds of the ``top`` best configurations; how many were queued.

    Each of them gets ``replicates`` runs in all. A seed index already present in any
    state (running, waiting, failed by the settings, or re-queued) is not queued
    again, so calling this again after an interrupt queues only what is missing.
    One round per set of search results (:func:`replicates_due`): running the
    command again with the same target queues nothing more. Two processes
    queueing at once may both queue a seed; the later copies are failed
    ("duplicate replicate") and :func:`configurations` counts one run per seed.
    """
    if replicates <= 1 or top < 1 or not replicates_due(study):
        return 0
    trials = study.get_trials(deepcopy=False)
    finished = sum(
        t.state in (TrialState.COMPLETE, TrialState.PRUNED) and not is_replicate(t) for t in trials
    )
    missing = _missing(trials, replicates, top)
    for params, index in missing:
        study.enqueue_trial(params, user_attrs={REPLICATE: index})
    study.set_user_attr(REPLICATED_AT, finished)
    _fail_duplicates(study)
    return len(missing)


def _fail_duplicates(study: optuna.Study) -> None:
    """Fail the WAITING copies of a (params, seed index) queued twice, keeping the first;
    they are counted as retired, not failed (:mod:`search.sweep.workers.bookkeeping`)."""
    from search.sweep.workers import bookkeeping
    from search.sweep.workers.storage import storage_of, trial_id

    storage = storage_of(study)
    seen: set[tuple] = set()
    for t in sorted(study.get_trials(deepcopy=False), key=lambda t: t.number):
        params = t.params or t.system_attrs.get("fixed_params", {})
        if not is_replicate(t) or t.state == TrialState.FAIL:  # a lost run's retry is no copy
            continue
        key = (params_key(params), replicate_index(t))
        if key not in seen:
            seen.add(key)
        elif t.state == TrialState.WAITING:
            bookkeeping.retire(storage, trial_id(t), bookkeeping.DUPLICATE_REPLICATE)


SMOOTHING_DECADES = 0.3  # the kernel's sd in decades of each searched parameter


def smoothed(
    configs: Sequence[Configuration], *, bandwidth: float = SMOOTHING_DECADES
) -> list[tuple[Configuration, float]]:
    """Each configuration with a smoothed validation accuracy, best first.

    The smoothed value is a kernel-weighted mean of every configuration's runs
    (a Gaussian of ``bandwidth`` decades in log-parameter space, each run
    weighted once), so a configuration whose neighbours are good as well beats
    a lucky one among poor neighbours: a smooth fit of accuracy over log lambda
    rather than one noisy point.
    """
    out = []
    for c in configs:
        num = den = 0.0
        for other in configs:
            d2 = sum(
                _distance2(c.params[k], other.params[k]) for k in c.params if k in other.params
            )
            w = other.n * math.exp(-d2 / (2 * bandwidth**2))
            num += w * other.mean
            den += w
        out.append((c, num / den))
    return sorted(out, key=lambda cv: cv[1], reverse=True)


def _distance2(a: object, b: object) -> float:
    """Squared distance in decades of two values of a parameter; two levels of a choice
    (strings, booleans, encoded lists) are not neighbours at all."""
    numbers = all(isinstance(v, int | float) and not isinstance(v, bool) for v in (a, b))
    if not numbers:
        return 0.0 if a == b else math.inf
    if a > 0 and b > 0:  # type: ignore[operator]
        return (math.log10(a) - math.log10(b)) ** 2  # type: ignore[arg-type]
    return 0.0


def choose(configs: Sequence[Configuration]) -> tuple[Configuration, float]:
    """The configuration with the best smoothed value, and that value (``[final]
    choose = "smoothed"``).

    Measured by ``python -m bench.search_quality`` on a landscape flat within
    noise: no better than the best mean (mean regret 0.74 against 0.59 points
    over 6 searches, 0.50 against 0.57 in another 6: within the bench's noise).
    """
    if not configs:
        raise UsageError("no completed configurations to choose from")
    return smoothed(configs)[0]


# ----------------------------------------------------------------------------- racing

RACE = "race"  # study attr: the race's contenders, who is out, what it spent, how it ended
RACE_Z = 1.0  # a contender is out when the leader beats it by this many standard errors
# Seeds two contenders must share before one can be put out: with two, the sd of the
# differences rests on one degree of freedom each and puts out good ones by chance.
RACE_MIN_SEEDS = 3


def paired_differences(leader: Configuration, other: Configuration) -> list[float]:
    """leader - other on every seed index both ran (a diverged run counts as 0)."""
    mine = {replicate_index(t): v for t, v in zip(leader.trials, leader.values, strict=True)}
    theirs = {replicate_index(t): v for t, v in zip(other.trials, other.values, strict=True)}
    return [mine[i] - theirs[i] for i in sorted(mine.keys() & theirs.keys())]


def separated(alive: Sequence[Configuration], *, z: float = RACE_Z) -> list[Configuration]:
    """The contenders the paired comparison has separated from the leader (the best mean
    of ``alive``): mean difference over shared seeds above ``z`` standard errors.

    The standard error pools the sd of the differences over every contender with
    :data:`RACE_MIN_SEEDS` or more shared seeds; none is out before that.
    """
    if len(alive) < 2:
        return []
    leader = max(alive, key=lambda c: (c.mean, c.n, -c.number))
    diffs = {id(c): paired_differences(leader, c) for c in alive if c is not leader}
    pairs = [d for d in diffs.values() if len(d) >= RACE_MIN_SEEDS]
    dof = sum(len(d) - 1 for d in pairs)
    if dof == 0:
        return []
    var = sum((len(d) - 1) * statistics.variance(d) for d in pairs) / dof
    out = []
    for c in alive:
        d = diffs.get(id(c), [])
        if len(d) >= RACE_MIN_SEEDS and statistics.fmean(d) > z * math.sqrt(var / len(d)):
            out.append(c)
    return out


RACE_RUN = "race_run"  # user attr of a run the race queued


@dataclass
class Race:
    """Where a stage's race stands: contenders (params), those out, runs spent, and why it
    ended ("" while it runs)."""

    contenders: list[dict]
    out: list[dict] = field(default_factory=list)
    spent: int = 0
    ended: str = ""

    def as_dict(self) -> dict:
        return {
            "contenders": self.contenders,
            "out": self.out,
            "spent": self.spent,
            "ended": self.ended,
        }

    @classmethod
    def from_dict(cls, d: dict) -> Race:
        return cls(list(d["contenders"]), list(d.get("out", [])), d.get("spent", 0), d["ended"])

    def alive(self, configs: Sequence[Configuration]) -> list[Configuration]:
        """The contenders among ``configs`` still in the race."""
        keys = {params_key(p) for p in self.contenders} - {params_key(p) for p in self.out}
        return [c for c in configs if params_key(c.params) in keys]


def race_round(
    study: optuna.Study, contenders: Sequence[Configuration], *, runs: int, z: float = RACE_Z
) -> tuple[int, Race]:
    """One round of the stage's race; (runs queued, the race as it stands).

    The first call fixes the contenders (``contenders``: the best configurations by the
    model, in its order) and records them on the study (user attr ``race``); later
    calls read them back, so an interrupted race resumes where it was. Each round
    puts out the contenders the paired comparison on shared seeds separates from the
    leader (:func:`separated`), then queues the next seed of each one still in: the
    same seed index for all, so their runs pair. It ends, queueing nothing, when one
    is left or the next round would pass ``runs`` extra runs in all.
    """
    recorded = study.user_attrs.get(RACE)
    race = (
        Race.from_dict(recorded)
        if recorded
        else Race([dict(c.params) for c in contenders if c.n >= 1])
    )
    if race.ended:
        return 0, race
    configs = study_configurations(study)
    trials = study.get_trials(deepcopy=False)
    alive = race.alive(configs)
    race.out += [dict(c.params) for c in separated(alive, z=z)]
    alive = race.alive(configs)
    present: dict[tuple, set[int]] = {}
    queued: set[tuple] = set()  # (params, seed index) of the race's runs, from the trials
    for t in trials:
        params = t.params or t.system_attrs.get("fixed_params", {})
        present.setdefault(params_key(params), set()).add(replicate_index(t))
        if t.user_attrs.get(RACE_RUN):
            queued.add((params_key(params), replicate_index(t)))
    # What the trials say was spent: a command started at the same moment may have
    # queued a round after this one read the record, which then counts too few.
    race.spent = max(race.spent, len(queued))
    seeds = max((max(present.get(params_key(c.params), {0})) for c in alive), default=0) + 1
    missing = [
        (c.params, i)
        for c in alive
        for i in range(1, seeds + 1)
        if i not in present.get(params_key(c.params), set())
    ]
    if len(alive) <= 1:
        race.ended = "one contender left" if alive else "no contender left"
    elif race.spent + len(missing) > runs:
        if not race.spent:
            race.ended = "no runs to spend"
        elif race.spent == runs:
            race.ended = f"its {runs} runs are spent"
        else:
            race.ended = f"another round of {len(missing)} would pass its {runs} runs"
    if race.ended:
        study.set_user_attr(RACE, race.as_dict())
        return 0, race
    for params, index in missing:
        study.enqueue_trial(params, user_attrs={REPLICATE: index, RACE_RUN: True})
    race.spent += len(missing)
    study.set_user_attr(RACE, race.as_dict())
    _fail_duplicates(study)
    return len(missing), race


def race_pending(study: optuna.Study, race_runs: int) -> str | None:
    """What the stage's race still has to do, or None (no race asked for, or it ended)."""
    if race_runs < 1:
        return None
    recorded = study.user_attrs.get(RACE)
    if recorded and recorded.get("ended"):
        return None
    return "its race between the best configurations has not ended"
