"""The gradient-check section of the report: analytic against numerical gradients."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import model
from model import gradcheck
from search.reporting.tables import markdown_table

# The networks of the gradient check: the same as tests/model/test_network.py.
GRADCHECK_HIDDEN = {2: [50], 3: [50, 50], 4: [50, 30, 20], 9: [50, 30, 20, 20, 10, 10, 10, 10]}
GRADCHECK_LAMBDA = 0.01
KINDS = ("W", "b", "gamma", "beta")


def _model_code() -> str:
    """A digest of the code under test: a cached table must not outlive a change."""
    code = hashlib.sha256()
    for name in ("layers.py", "network.py", "optim.py", "gradcheck.py"):
        code.update((Path(model.__file__).resolve().parent / name).read_bytes())
    return code.hexdigest()[:16]


def _errors(out_dir: Path | None) -> dict[str, dict[str, float]]:
    """Max relative error per parameter of each network, with and without batch norm."""
    settings = {
        "hidden": GRADCHECK_HIDDEN,
        "l2_lambda": GRADCHECK_LAMBDA,
        "model_code": _model_code(),
    }
    cache = Path(out_dir) / "gradcheck.json" if out_dir is not None else None
    if cache is not None and cache.exists():
        saved = json.loads(cache.read_text())
        if saved.get("settings") == json.loads(json.dumps(settings)):
            return saved["errors"]
    errors = {
        f"{k}-{'bn' if bn else 'nobn'}": gradcheck.check_network(
            hidden, batch_norm=bn, l2_lambda=GRADCHECK_LAMBDA
        )
        for k, hidden in GRADCHECK_HIDDEN.items()
        for bn in (False, True)
    }
    if cache is not None:
        cache.parent.mkdir(parents=True, exist_ok=True)
        cache.write_text(json.dumps({"settings": settings, "errors": errors}, indent=2))
    return errors


def user_gradcheck_section(entry: str, check: object) -> str:
    """The gradient check of a user's own code: its module's ``gradcheck()``, which returns
    ``{parameter: relative error}`` (or one number); or, without one, the built-in
    network's check, said to be of the built-in network."""
    if not callable(check):
        return (
            "## Gradient check (of the built-in network, not of your code)\n\n"
            f"This study trains your own function, `{entry}`, whose module defines no "
            "`gradcheck()`: the table below checks the built-in network's gradients, not "
            "yours. Define `gradcheck()` in that module, returning `{parameter: relative "
            "error}`, to have your own here.\n\n"
        )
    try:
        result = check()
    except Exception as exc:  # noqa: BLE001 - the report says what happened instead
        return f"## Gradient check of `{entry}`\n\nIts `gradcheck()` raised {exc!r}.\n\n"
    if isinstance(result, dict):
        rows = [(str(k), f"{float(v):.1e}") for k, v in result.items()]
        worst = max((float(v) for v in result.values()), default=float("nan"))
    else:
        rows, worst = [("all", f"{float(result):.1e}")], float(result)
    return "\n".join(
        [
            f"## Gradient check of your code (`{entry}`)",
            "",
            "Relative errors between your analytic and numerical gradients, as your "
            "module's `gradcheck()` returns them.",
            "",
            markdown_table(("parameter", "relative error"), rows),
            "",
            f"Largest relative error: {worst:.1e}.",
            "",
        ]
    )


def gradcheck_section(out_dir: Path | None = None) -> str:
    """A markdown table of the gradient check: max relative error per layer and parameter.

    For the 2-, 3-, 4- and 9-layer networks of tests/model/test_network.py, with and
    without batch norm (float64, random data). Takes ~30 s; with ``out_dir`` the
    errors are cached in ``out_dir/gradcheck.json`` and reused.
    """
    results = _errors(out_dir)
    rows = []
    worst = 0.0
    for k, hidden in GRADCHECK_HIDDEN.items():
        for bn in (False, True):
            errors = results[f"{k}-{'bn' if bn else 'nobn'}"]
            worst = max(worst, *errors.values())
            for layer in range(1, len(hidden) + 2):
                cells = [
                    f"{errors[f'{p}{layer}']:.1e}" if f"{p}{layer}" in errors else "–"
                    for p in KINDS
                ]
                first = layer == 1
                net = f"{k}-layer {'-'.join(map(str, hidden))}" if first else ""
                rows.append([net, ("yes" if bn else "no") if first else "", layer, *cells])
    lines = [
        "## Gradient check",
        "",
        "Relative error ‖a − n‖ / (‖a‖ + ‖n‖) between the analytic gradients and centred "
        "differences, per layer and parameter (float64, 10 random samples of 20 "
        f"dimensions, λ = {GRADCHECK_LAMBDA}; with batch norm the hidden layers have "
        "γ and β and no b). The norms are taken over each whole parameter array: "
        "entry by entry, an entry whose true gradient is about 0 (a dead ReLU) would "
        "compare rounding noise with rounding noise.",
        "",
        markdown_table(("network", "BN", "layer", *KINDS), rows),
        "",
        f"Largest relative error: {worst:.1e}.",
        "",
    ]
    return "\n".join(lines)
