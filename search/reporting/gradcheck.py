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
