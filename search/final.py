"""``python -m search.final``: retrain the best configuration longer and report test accuracy.

The best completed trial of the fine study (else the coarse one) is retrained
with ``[final.training]`` on the training and validation data together, except
a holdout of ``[final] holdout`` validation samples kept for the validation
curve. The test set is used once, at the end. The network, its curves and a
JSON result are written under ``studies/out/<name>/final/``, and the result is
recorded on the study (user attr ``final``). Running it again with the same
best trial prints the recorded result instead of training again (``--force``
retrains).
"""

from __future__ import annotations

if __name__ == "__main__":  # before the slow imports: a signal now ends it at once
    from search.sweep.signals import exit_at_once_while_starting

    exit_at_once_while_starting()

import json
import time
from dataclasses import asdict
from typing import Any

import numpy as np

from model.data import Dataset, Splits
from model.train import fit
from search import cli
from search.reporting.figures import draw_training
from search.sweep import studies as st
from search.sweep.objective import build_network


def merge_train_val(splits: Splits, holdout: int) -> Splits:
    """Train on train + val[:-holdout]; validate on the last ``holdout`` val samples."""
    holdout = max(1, min(holdout, splits.val.n // 2))
    cut = splits.val.n - holdout
    X = np.concatenate([splits.train.X, splits.val.X[:cut]])
    y = np.concatenate([splits.train.y, splits.val.y[:cut]])
    meta: dict[str, Any] = {
        "n_classes": splits.train.n_classes,
        "label_names": splits.train.label_names,
    }
    train = Dataset(X, y, **meta)
    val = Dataset(np.ascontiguousarray(splits.val.X[cut:]), splits.val.y[cut:], **meta)
    return Splits(train, val, splits.test)


@cli.guarded
def main(argv: list[str] | None = None) -> int:
    p = cli.base_parser(
        "python -m search.final", "Retrain the best configuration; test it.", trains=False
    )
    p.add_argument("--force", action="store_true", help="retrain even if a result is recorded")
    args = p.parse_args(argv)
    spec = cli.load(args)
    source = None
    for stage in ("fine", "coarse"):
        study = st.load_existing(spec, stage)
        if study is not None and st.top_trials(study, 1):
            source = study
            break
    if source is None:
        raise ValueError(
            f"no completed trials of {spec.name} in the fine or coarse study of "
            f"{spec.storage_url()}; run {cli.command('coarse')}{cli.same_flags(args)} first"
        )
    best = st.top_trials(source, 1)[0]
    config = spec.train_config("final", {**best.params, "seed": spec.optuna.seed})
    recorded = source.user_attrs.get("final")
    if recorded and recorded.get("trial") == best.number and not args.force:
        print(f"final result already recorded for {source.study_name} trial {best.number}:")
        print(f"test accuracy {recorded['test_acc']:.4f} (use --force to retrain)")
        cli.next_step("report", args)
        return 0
    prepared = st.prepare_for(spec)
    st.record_data(source, prepared)
    splits = merge_train_val(prepared.open(), spec.final.holdout)
    net = build_network(spec, splits, spec.optuna.seed)
    print(
        f"final training of {source.study_name} trial {best.number} "
        f"(val acc {best.value:.4f}, {best.params}) on {splits.train.n} samples, "
        f"{config.total_steps(splits.train.n)} steps",
        flush=True,
    )
    t0 = time.perf_counter()
    history = fit(net, splits, config, log=lambda line: print(line, flush=True))
    test = net.evaluate(splits.test.X, splits.test.y, l2_lambda=config.l2_lambda)
    out = spec.out_dir() / "final"
    out.mkdir(parents=True, exist_ok=True)
    net.save(out / "network.npz", config=asdict(config))
    draw_training(history, out / "curves.png", title=f"{spec.name}: final training")
    result = {
        "study": source.study_name,
        "trial": best.number,
        "params": best.params,
        "search_val_acc": best.value,
        "test_acc": test["accuracy"],
        "test_loss": test["loss"],
        "holdout_val_acc": history.final["val_acc"],
        "train_samples": splits.train.n,
        "wall_time": round(time.perf_counter() - t0, 2),
        "config": asdict(config),
    }
    (out / "result.json").write_text(json.dumps(result, indent=2))
    (out / "history.json").write_text(json.dumps(history.to_dict()))
    source.set_user_attr("final", {k: v for k, v in result.items() if k != "config"})
    print(f"test accuracy {test['accuracy']:.4f}")
    print(f"wrote {out / 'network.npz'}, {out / 'curves.png'}, {out / 'result.json'}")
    cli.next_step("report", args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
