"""The final stage: retrain the chosen configuration over several seeds and test it.

The chosen configuration is the one the model of the landscape predicts best in the
fine study (else the coarse one), kept away from a cliff's edge when a run of the search
diverged (:func:`chosen_configuration`). :func:`retrain` trains it with
``[final.training]`` on training + validation minus the holdout (:func:`final_split`)
through the study's training function (:func:`search.sweep.user_train.run_final`), one
run per seed, tests each once, records each seed's result on the study as soon as it is
known (an interrupted final resumes with the seeds it has not done), and writes
``result.json``. The command (``search/final.py``) prints and draws.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import optuna

from model.data import Dataset, Splits
from model.errors import UsageError
from model.train import History, TrainingDiverged
from search.config import space as sp
from search.config.study import StudySpec
from search.sweep import narrowing, surrogate, user_train
from search.sweep import replicates as rep
from search.sweep import studies as st
from search.sweep.workers.storage import check_storage


def final_split(splits: Splits, holdout: int) -> Splits:
    """Train on train + val[:-holdout]; validate on the last ``holdout`` val images
    (with no holdout, on all of val, which is then trained on too)."""
    cut = splits.val.n - holdout
    X = np.concatenate([splits.train.X, splits.val.X[:cut]])
    y = np.concatenate([splits.train.y, splits.val.y[:cut]])
    meta: dict[str, Any] = {
        "n_classes": splits.train.n_classes,
        "label_names": splits.train.label_names,
    }
    train = Dataset(X, y, **meta)
    rows = slice(cut, None) if holdout else slice(None)
    val = Dataset(np.ascontiguousarray(splits.val.X[rows]), splits.val.y[rows], **meta)
    return Splits(train, val, splits.test)


# How final's log line names the predicted value of each kind of choice.
PREDICTED = {
    "model": "predicted by the model of the landscape",
    "robust": "predicted by the model of the landscape",
    "best": "smoothed over its neighbours",
    "smoothed": "smoothed over its neighbours",
}


@dataclass(frozen=True)
class Chosen:
    """What final chose: the study it took it from, the configuration, that one's predicted
    validation accuracy, and (the robust rule) the model's best it passed over with that
    one's prediction (None when it took the model's best, or by another rule)."""

    study: optuna.Study
    config: rep.Configuration
    value: float
    passed_over: tuple[rep.Configuration, float] | None = None


def chosen_configuration(
    spec: StudySpec, *, command: Callable[[str], str] = lambda stage: f"search.{stage}"
) -> Chosen:
    """The study to take it from (fine, else coarse), its chosen configuration and that
    one's predicted validation accuracy: by the model of the landscape (``choose =
    "robust"``, the default, away from the diverged runs among those alike; ``"model"``;
    :func:`model_choice`), else smoothed over its neighbours
    (:func:`search.sweep.replicates.choose`). ``command(stage)`` is the command the
    errors ask to run."""
    for stage in ("fine", "coarse"):
        study = st.load_existing(spec, stage)
        stage_spec = spec.search_stage(stage)
        configs = rep.study_configurations(study, stage_spec.replicates) if study else []
        if study is not None and configs:
            why = st.unfinished(spec, stage, study)
            if why:
                raise UsageError(
                    f"{study.study_name} is not finished ({why}); final chooses from all of "
                    f"it: run {command(stage)}{st.trials_flag(study, spec, stage)} again to "
                    "finish it, "
                    "or wait for the workers running it"
                )
            if spec.final.choose == "model":
                return Chosen(study, *model_choice(study, configs)[:2])
            if spec.final.choose == "robust":
                return Chosen(study, *model_choice(study, configs, robust=_failures(spec)))
            if spec.final.choose == "best":
                value = next(v for c, v in rep.smoothed(configs) if c is configs[0])
                return Chosen(study, configs[0], value)
            return Chosen(study, *rep.choose(configs))
    raise UsageError(
        f"no completed trials of {spec.name} in the fine or coarse study of "
        f"{spec.storage_url()}; run {command('coarse')} first"
    )


def kept_off_the_edge(spec: StudySpec, choice: Chosen) -> str | None:
    """What the robust choice did, when it took another configuration than the model's
    best: a line naming both and the diverged runs it kept away from (None otherwise)."""
    if spec.final.choose != "robust" or choice.passed_over is None:
        return None
    chosen = choice.config
    plain, value = choice.passed_over
    failures, _ = _failures(spec)
    return (
        f"note: chose configuration {chosen.number} over {plain.number} (predicted "
        f"{value:.4f}): alike within one run's seed noise, and further from the "
        f"{len(failures)} diverged run(s) of the search, where a test seed is more likely "
        'to fall off; [final] choose = "model" takes the best prediction'
    )


def _failures(spec: StudySpec) -> tuple[list[dict[str, Any]], dict[str, sp.Range]]:
    """The parameters of every diverged run of the search (coarse and fine), and the
    coarse ranges they are measured in."""
    broke = []
    for stage in ("coarse", "fine"):
        study = st.load_existing(spec, stage)
        if study is not None:
            trials = study.get_trials(deepcopy=False)
            broke += [
                dict(t.params)
                for t in trials
                if surrogate.is_diverged(t)
                and t.params
                and narrowing.FROM_COARSE not in t.user_attrs  # the coarse run, counted there
            ]
    return broke, dict(spec.search)


def model_choice(
    study: optuna.Study,
    configs: list[rep.Configuration],
    *,
    robust: tuple[list[dict[str, Any]], dict[str, sp.Range]] | None = None,
) -> tuple[rep.Configuration, float, tuple[rep.Configuration, float] | None]:
    """The configuration the model of the landscape predicts best, and that prediction
    (:func:`search.sweep.surrogate.rank` over every run of the study, in its recorded
    ranges); after a race, the best of the contenders still in it. ``robust`` (the
    diverged runs of the search and the coarse ranges): of those within one run's seed
    noise of the best, the one furthest from a diverged run; then the third item is the
    model's best it passed over and its prediction (None when it took that one), from
    the same fit."""
    space = sp.from_record(study.user_attrs.get("ranges", {}))
    trials = study.get_trials(deepcopy=False)
    failures, failure_space = robust if robust is not None else ([], None)
    ranked, _ = surrogate.rank(
        configs,
        trials,
        space,
        n_val=surrogate.n_val_of(study),
        robust=robust is not None,
        failures=failures,
        failure_space=failure_space,
    )
    recorded = study.user_attrs.get(rep.RACE)
    if recorded:
        alive = rep.Race.from_dict(recorded).alive(configs)
        ranked = [r for r in ranked if any(r.config is c for c in alive)] or ranked
    # The model's best, as rank orders it without the robust rule (the same fit).
    plain = max(ranked, key=lambda r: (r.mean, r.config.n, -r.config.number))
    passed = None if plain is ranked[0] else (plain.config, plain.mean)
    return ranked[0].config, ranked[0].mean, passed


@dataclass
class Retrained:
    """What :func:`retrain` did: the result (as in ``result.json``), whether it was only
    read back (already recorded), and the notes to print."""

    result: dict[str, Any]
    recorded: bool
    notes: list[str] = field(default_factory=list)


def retrain(
    spec: StudySpec,
    *,
    n_seeds: int,
    force: bool = False,
    command: Callable[[str], str] = lambda stage: f"search.{stage}",
    log: Callable[[str], None] = print,
    on_runs: Callable[[list[History], list[float]], object] | None = None,
) -> Retrained:
    """Retrain the chosen configuration with ``n_seeds`` seeds and test each once.

    A result recorded for the same choice, training, network, data and split is read
    back instead (``force``: retrain). Each seed's curves are kept in
    ``history_seed<seed>.json``; ``on_runs(histories, test_accs)`` gets every seed's
    (the command draws them).
    """
    check_storage(spec.storage_url())
    choice = chosen_configuration(spec, command=command)
    source, best, smooth = choice.study, choice.config, choice.value
    # The trial params as settings (a choice of layer widths back to its list).
    params = sp.decode(sp.from_record(source.user_attrs.get("ranges", {})), best.params)
    config0 = spec.train_config("final", {**params, "seed": spec.optuna.seed})
    prepared = st.prepare_for(spec)
    data = prepared.open()
    holdout = st.holdout_size(spec, data.val.n)
    saved_config: dict[str, Any] = asdict(config0)
    if spec.model.train:
        # A user's function also reads its own keys (n_hidden, ...).
        saved_config |= {**spec.own_params("final", params), "train": spec.model.train}
    # What a recorded run depends on: the choice, its training, the network, the data, the split.
    key = json.dumps(
        {
            "params": best.params,
            "config": saved_config,
            "network": asdict(spec.network_for(params)),
            "data": prepared.checksum,
            "holdout": holdout,
        },
        sort_keys=True,
        default=str,  # a TOML date among a user's keys
    )
    recorded = source.user_attrs.get("final")
    if recorded and recorded.get("key") == key and recorded.get("n_seeds") == n_seeds:
        if not force:
            return Retrained(recorded, recorded=True)
    user_train.check(spec)
    st.record_data(source, prepared, spec)
    splits = final_split(data, holdout)
    log(
        f"final: {source.study_name} configuration {best.number} (val acc {best.describe()}, "
        f"{smooth:.4f} {PREDICTED[spec.final.choose]}; {params_line(params)})\n"
        f"  trains on {data.train.n} training + {data.val.n - holdout} validation images "
        f"= {splits.train.n}; holdout {holdout} validation images for the curve; "
        f"test {data.test.n} images, once per seed\n"
        f"  {n_seeds} seed(s), {config0.total_steps(splits.train.n)} steps each"
    )
    moved = kept_off_the_edge(spec, choice)
    if moved:
        log(moved)
    runs = {} if force else dict(source.user_attrs.get("final_runs", {}).get(key, {}))
    out = spec.out_dir() / "final"
    out.mkdir(parents=True, exist_ok=True)
    for i in range(n_seeds):
        seed = spec.optuna.seed + i
        if str(seed) in runs:
            log(f"seed {seed}: recorded, test accuracy {runs[str(seed)]['test_acc']:.4f}")
            continue
        try:
            run = user_train.run_final(
                spec, params, splits, seed=seed, out_dir=out if i == 0 else None, log=log
            )
        except user_train.UserCodeFailed as exc:
            cause = exc.__cause__
            if not isinstance(cause, TrainingDiverged):
                raise
            raise user_train.FinalDiverged(
                f"final: configuration {best.number} ({params_line(params)}) diverged in "
                f"final training with seed {seed} (at step {cause.step}, eta={cause.eta:.3g}, "
                f"loss={cause.loss}), "
                f"though its search runs did not: it sits near the edge where runs diverge, "
                f"and final trains on more images ({splits.train.n} against "
                f"{data.train.n}). Search lower learning rates (lower the upper bound of "
                f"[search] eta_max or eta) and run {command('fine')} again"
            ) from exc
        runs[str(seed)] = {
            "test_acc": run.test["accuracy"],
            "test_loss": run.test["loss"],
            "holdout_val_acc": run.val_acc if holdout else None,
            "wall_time": round(run.history.wall_time, 2),
        }
        log(f"seed {seed}: test accuracy {run.test['accuracy']:.4f}")
        curves = json.dumps(run.history.to_dict())
        (out / f"history_seed{seed}.json").write_text(curves)
        if i == 0:
            (out / "history.json").write_text(curves)
        # Kept at once: an interrupted final resumes with the seeds it has not done.
        source.set_user_attr("final_runs", {key: runs})
    accs = [runs[str(spec.optuna.seed + i)]["test_acc"] for i in range(n_seeds)]
    if on_runs is not None:
        kept = [out / f"history_seed{spec.optuna.seed + i}.json" for i in range(n_seeds)]
        histories = [History.from_dict(json.loads(f.read_text())) for f in kept if f.exists()]
        on_runs(histories, accs)
    result = {
        "study": source.study_name,
        "configuration": best.number,
        "choose": spec.final.choose,
        "kept_off_the_edge": moved,  # the note, when the robust rule passed the model's best over
        "trials": sorted(t.number for t in best.trials),
        "params": best.params,
        "search_val_acc": {
            "mean": best.mean,
            "sd": None if best.n < 2 else best.sd,
            "n": best.n,
            "smoothed": smooth,
        },
        "test_acc": statistics.fmean(accs),
        "test_acc_sd": statistics.stdev(accs) if len(accs) > 1 else None,
        "test_accs": accs,
        "n_seeds": n_seeds,
        "seeds": [spec.optuna.seed + i for i in range(n_seeds)],
        "split": {
            "train": splits.train.n,
            "train_from_val": data.val.n - holdout,
            "holdout": holdout,
            "test": data.test.n,
        },
        "runs": runs,
        # Every seed's run, those an interrupted final recorded before this one included.
        "wall_time": round(sum(float(r.get("wall_time") or 0) for r in runs.values()), 2),
        "config": saved_config,
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    source.set_user_attr(
        "final", {**{k: v for k, v in result.items() if k not in ("config", "runs")}, "key": key}
    )
    notes = []
    flat = (source.user_attrs.get("narrowing") or {}).get("flat", [])
    if flat:
        notes.append(
            f"validation accuracy was flat within the seed noise along {', '.join(flat)}: "
            "this choice is as good as any in the fine range, not better"
        )
    return Retrained(result, recorded=False, notes=notes)


def describe_accs(accs: list[float]) -> str:
    """``0.4213 +- 0.0061 (n=3)``, or the single value."""
    if len(accs) > 1:
        return f"{statistics.fmean(accs):.4f} +- {statistics.stdev(accs):.4f} (n={len(accs)})"
    return f"{accs[0]:.4f} (n=1)"


def params_line(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={sp.describe_value(v)}" for k, v in params.items())
