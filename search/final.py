"""``python -m search.final``: retrain the chosen configuration longer and test it.

The chosen configuration is the one the model of the landscape predicts best in the fine
study (else the coarse one), kept off a cliff's edge when a run of the search diverged
(``[final] choose``; :func:`search.sweep.retrain.chosen_configuration`). It is retrained
with ``[final.training]`` on this split:

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

import json

from model.errors import UsageError

if __name__ == "__main__":  # before the slow imports: a signal now ends it at once
    from search.sweep.workers.signals import exit_at_once_while_starting

    exit_at_once_while_starting()

from search import cli
from search.reporting import files_only
from search.reporting.figures import draw_final
from search.reporting.note import final_note, write_note
from search.sweep.retrain import describe_accs, final_split, retrain

__all__ = ["final_split", "main"]


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
        raise UsageError(f"--seeds must be >= 1, got {args.seeds}")
    n_seeds = args.seeds or spec.final.seeds
    out = spec.out_dir() / "final"
    done = retrain(
        spec,
        n_seeds=n_seeds,
        force=args.force,
        command=lambda stage: f"{cli.command(stage)}{cli.same_flags(args)}",
        log=lambda line: print(line, flush=True),
        on_runs=lambda histories, accs: draw_final(
            histories, accs, out / "curves.png", title=f"{spec.name}: final training"
        ),
    )
    r = done.result
    if done.recorded:
        print(
            f"final result already recorded for {r['study']} configuration "
            f"{r['configuration']} ({n_seeds} seeds):"
        )
        print(f"test accuracy {describe_accs(r['test_accs'])} (use --force to retrain)")
        result_file = out / "result.json"
        if not result_file.exists():  # the out folder deleted or moved: the record stays
            out.mkdir(parents=True, exist_ok=True)
            kept = {k: v for k, v in r.items() if k != "key"}
            result_file.write_text(json.dumps(kept, indent=2))
            made = [out / "curves.png"] + ([] if spec.model.train else [out / "network.npz"])
            gone = [f.name for f in made if not f.exists()]
            print(
                f"wrote {result_file} again from the study's record (without each seed's "
                "run and the training settings)"
                + (f"; {', '.join(gone)} only a retraining makes (--force)" if gone else "")
            )
    else:
        print(f"test accuracy {describe_accs(r['test_accs'])}")
        for note in done.notes:
            print(f"note: {note}")
        written = [out / "curves.png", out / "result.json"]
        if not spec.model.train:
            written.insert(0, out / "network.npz")
        print("wrote " + ", ".join(str(p) for p in written))
    source, text = final_note(spec, r, next_command=cli.next_command("report", args))
    write_note(source, text)
    cli.next_step("report", args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
