"""``python -m search.coarse``: the coarse search over the study file's ``[search]`` ranges."""

from __future__ import annotations

from model.errors import UsageError

if __name__ == "__main__":  # before the slow imports: a signal now ends it at once
    from search.sweep.workers.signals import exit_at_once_while_starting

    exit_at_once_while_starting()

from search import cli
from search.sweep import stage


@cli.guarded
def main(argv: list[str] | None = None) -> int:
    p = cli.base_parser(
        "python -m search.coarse", "Coarse search over the study file's [search] ranges."
    )
    args = p.parse_args(argv)
    spec = cli.load(args)
    if not spec.search:
        raise UsageError(f"{spec.path}: [search] is empty; give at least l2_lambda = [low, high]")
    target = args.trials or spec.coarse_trials
    study = stage.run_stage(spec, "coarse", target=target, space=dict(spec.search))
    cli.end_stage(
        spec, study, spec.search, args, next_name="fine", replicates=spec.coarse.replicates
    )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
