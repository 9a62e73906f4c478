"""``python -m search.final``: retrain the chosen configuration longer and test it.

The chosen configuration is the best mean over seeds of the fine study (else
the coarse one). It is retrained with ``[final.training]`` on this split:

- train: the training images plus the validation images except the holdout;
- holdout: the last ``[final] holdout`` validation images (a number, or a
  fraction of val), kept out of training for the validation curve; a holdout
  that does not fit the validation set is refused, never clipped;
- test: the test set, evaluated once per seed at the end.

It trains ``[final] seeds`` networks (seeds ``seed``, ``seed + 1``, ...) and reports
the test accuracy as mean +- sd. The first network, its curves and
``result.json`` (the chosen hyperparameters under ``"params"``) go to
``studies/out/<name>/final/``, and the result is recorded on the study (user
attr ``final``). Each seed's result is recorded as soon as it is known, so an
interrupted final resumes with the seeds it has not done; with everything
recorded it prints the result instead of training again (``--force`` retrains).

Every seed is trained by the study's training function
(:func:`search.sweep.user_train.run_final`): the built-in network, which saves the
first seed's network as ``network.npz``, or the user's ``[model] train``, which is
given the test set, returns its accuracy and saves what it wants in ``hp["out_dir"]``.
"""

from __future__ import annotations

if __name__ == "__main__":  # before the slow imports: a signal now ends it at once
    from search.sweep.signals import exit_at_once_while_starting

    exit_at_once_while_starting()

import json
import statistics
import time
from dataclasses import asdict
from typing import Any

import numpy as np

from model.data import Dataset, Splits
from search import cli
from search.config import space as sp
from search.config.study import StudySpec
from search.reporting import files_only
from search.reporting.figures import draw_training
from search.sweep import replicates as rep
from search.sweep import studies as st
from search.sweep import user_train


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


def chosen_configuration(spec: StudySpec, args) -> tuple[Any, rep.Configuration, float]:
    """The study to take it from (fine, else coarse), its chosen configuration and that
    one's smoothed validation accuracy (:func:`search.sweep.replicates.choose`)."""
    for stage in ("fine", "coarse"):
        study = st.load_existing(spec, stage)
        replicates = spec.fine.replicates if stage == "fine" else spec.coarse.replicates
        if study is not None and (configs := rep.study_configurations(study, replicates)):
            if why := st.pending(spec, stage, study):
                raise ValueError(
                    f"{study.study_name} is not finished ({why}); final chooses from all of "
                    f"it: run {cli.command(stage)}{cli.same_flags(args)} again to finish it, "
                    "or wait for the workers running it"
                )
            if spec.final.choose == "best":
                value = next(v for c, v in rep.smoothed(configs) if c is configs[0])
                return study, configs[0], value
            return (study, *rep.choose(configs))
    raise ValueError(
        f"no completed trials of {spec.name} in the fine or coarse study of "
        f"{spec.storage_url()}; run {cli.command('coarse')}{cli.same_flags(args)} first"
    )


@cli.guarded
def main(argv: list[str] | None = None) -> int:
    files_only()
    p = cli.base_parser(
        "python -m search.final", "Retrain the best configuration; test it.", trains=False
    )
    p.add_argument("--force", action="store_true", help="retrain even if a result is recorded")
    p.add_argument(
        "--seeds", type=int, default=None, help="networks to train (default: [final] seeds)"
    )
    args = p.parse_args(argv)
    spec = cli.load(args)
    if args.seeds is not None and args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    n_seeds = args.seeds or spec.final.seeds
    source, best, smooth = chosen_configuration(spec, args)
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
        default=str,  # a TOML date among a user's [training] keys
    )
    recorded = source.user_attrs.get("final")
    if recorded and recorded.get("key") == key and recorded.get("n_seeds") == n_seeds:
        if not args.force:
            print(
                f"final result already recorded for {source.study_name} configuration "
                f"{best.number} ({n_seeds} seeds):"
            )
            print(f"test accuracy {_describe(recorded['test_accs'])} (use --force to retrain)")
            cli.next_step("report", args)
            return 0
    user_train.check(spec)
    st.record_data(source, prepared)
    splits = final_split(data, holdout)
    print(
        f"final: {source.study_name} configuration {best.number} (val acc {best.describe()}, "
        f"{smooth:.4f} smoothed over its neighbours; {_params(params)})\n"
        f"  trains on {data.train.n} training + {data.val.n - holdout} validation images "
        f"= {splits.train.n}; holdout {holdout} validation images for the curve; "
        f"test {data.test.n} images, once per seed\n"
        f"  {n_seeds} seed(s), {config0.total_steps(splits.train.n)} steps each",
        flush=True,
    )
    runs = {} if args.force else dict(source.user_attrs.get("final_runs", {}).get(key, {}))
    out = spec.out_dir() / "final"
    out.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    for i in range(n_seeds):
        seed = spec.optuna.seed + i
        if str(seed) in runs:
            print(f"seed {seed}: recorded, test accuracy {runs[str(seed)]['test_acc']:.4f}")
            continue
        run = user_train.run_final(
            spec,
            params,
            splits,
            seed=seed,
            out_dir=out if i == 0 else None,
            log=lambda line: print(line, flush=True),
        )
        history, test, holdout_val_acc = run.history, run.test, run.val_acc
        runs[str(seed)] = {
            "test_acc": test["accuracy"],
            "test_loss": test["loss"],
            "holdout_val_acc": holdout_val_acc if holdout else None,
            "wall_time": round(history.wall_time, 2),
        }
        print(f"seed {seed}: test accuracy {test['accuracy']:.4f}", flush=True)
        if i == 0:
            draw_training(history, out / "curves.png", title=f"{spec.name}: final training")
            (out / "history.json").write_text(json.dumps(history.to_dict()))
        # Kept at once: an interrupted final resumes with the seeds it has not done.
        source.set_user_attr("final_runs", {key: runs})
    accs = [runs[str(spec.optuna.seed + i)]["test_acc"] for i in range(n_seeds)]
    result = {
        "study": source.study_name,
        "configuration": best.number,
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
        "wall_time": round(time.perf_counter() - t0, 2),
        "config": saved_config,
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    source.set_user_attr(
        "final", {**{k: v for k, v in result.items() if k not in ("config", "runs")}, "key": key}
    )
    print(f"test accuracy {_describe(accs)}")
    flat = (source.user_attrs.get("narrowing") or {}).get("flat", [])
    if flat:
        print(
            f"note: validation accuracy was flat within the seed noise along {', '.join(flat)}: "
            "this choice is as good as any in the fine range, not better"
        )
    written = [out / "curves.png", out / "result.json"]
    if not spec.model.train:
        written.insert(0, out / "network.npz")
    print("wrote " + ", ".join(str(p) for p in written))
    cli.next_step("report", args)
    return 0


def _describe(accs: list[float]) -> str:
    if len(accs) > 1:
        return f"{statistics.fmean(accs):.4f} +- {statistics.stdev(accs):.4f} (n={len(accs)})"
    return f"{accs[0]:.4f} (n=1)"


def _params(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={sp.describe_value(v)}" for k, v in params.items())


if __name__ == "__main__":
    raise SystemExit(main())
