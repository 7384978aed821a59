"""Readable views of :func:`advmoe.eval.evaluate` results: flat summaries, mean ± std, markdown tables."""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

__all__ = ["format_result", "markdown_table", "mean_std", "summarize"]

_SUMMARY_KEYS = (
    "ra_worst",
    "ra_frozen_routing",
    "ra_frozen_routing_rescored",
    "ra_pathway_worst",
    "ra_soft_routing",
    "sa_soft_routing",
)


def summarize(result: Mapping[str, Any]) -> dict[str, float | None]:
    """Flatten an evaluation result to ``{metric: value}`` (fractions in [0, 1], None where not measured).

    Keys: ``sa``, ``ra_<attack>`` for every attack run (``ra_autoattack`` is the variant named in
    ``result["autoattack_variant"]``), ``ra_worst``, ``ra_frozen_routing``, ``ra_frozen_routing_rescored``,
    ``ra_pathway_worst``, ``ra_soft_routing``, ``sa_soft_routing``, ``router_unchanged_<attack>`` (share of
    the attacked samples whose routing is unchanged in all MoE layers under that attack).
    """
    out: dict[str, float | None] = {"sa": result["sa"]}
    for name, value in result["ra"].items():
        out[f"ra_{name}"] = value
    for key in _SUMMARY_KEYS:
        out[key] = result.get(key)
    for name, rob in (result.get("router_robustness") or {}).items():
        out[f"router_unchanged_{name}"] = rob["all_layers"]
    return out


def mean_std(values: Sequence[float | None]) -> tuple[float | None, float | None, int]:
    """Mean, sample standard deviation (ddof 1; 0 for one value) and count of the non-None values."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None, 0
    mean = sum(vals) / len(vals)
    std = math.sqrt(sum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return mean, std, len(vals)


def _cell(value: Any, percent: bool) -> str:
    if value is None:
        return "–"
    if isinstance(value, tuple):  # (mean, std, n)
        mean, std, n = value
        if mean is None:
            return "–"
        scale = 100.0 if percent else 1.0
        return f"{mean * scale:.1f} ± {std * scale:.1f}" if n > 1 else f"{mean * scale:.1f}"
    if isinstance(value, float):
        return f"{value * 100:.1f}" if percent else f"{value:.3g}"
    return str(value)


def markdown_table(
    rows: Sequence[Mapping[str, Any]], columns: Sequence[tuple[str, str]], percent: Sequence[str] = ()
) -> str:
    """A GitHub markdown table.

    Args:
        rows: one mapping per row; values are strings, numbers, None (shown as "–") or ``(mean, std, n)``
            tuples from :func:`mean_std` (shown as "mean ± std").
        columns: (key, header) pairs in display order.
        percent: keys whose fractions are shown as percentages with one decimal.

    Returns:
        The table as a string (header, separator, one line per row).
    """
    pct = set(percent)
    lines = ["| " + " | ".join(h for _, h in columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(k), k in pct) for k, _ in columns) + " |")
    return "\n".join(lines)


def format_result(result: Mapping[str, Any]) -> str:
    """A short markdown report of one evaluation: accuracies, what each number measures, routing robustness,
    expert usage, warnings."""
    cfg = result["config"]
    eps = cfg["eps"] * 255 if cfg["norm"] == "linf" else cfg["eps"]
    eps_text = f"{eps:.4g}/255" if cfg["norm"] == "linf" else f"{eps:.4g}"
    head = f"Evaluation on {result['num_samples']} samples, {cfg['norm']} eps={eps_text} ({result['time_s']:.1f} s)"
    lines = [head, ""]
    rows = [{"metric": "SA (clean)", "value": result["sa"]}]
    for name, value in result["ra"].items():
        rows.append({"metric": f"RA {result['attack_labels'].get(name, name)}", "value": value})
    rows.append(
        {"metric": "RA worst case (per sample, every example scored on the real model)", "value": result["ra_worst"]}
    )
    if result.get("ra_frozen_routing") is not None:
        rows.append(
            {
                "metric": "RA, routing frozen to the clean choice, scored on the frozen model",
                "value": result["ra_frozen_routing"],
            }
        )
        rows.append(
            {
                "metric": "RA, routing-frozen examples re-scored on the real model",
                "value": result.get("ra_frozen_routing_rescored"),
            }
        )
    kind = (result.get("pathways") or {}).get("kind")
    for p, value in (result.get("ra_pathway") or {}).items():
        rows.append(
            {"metric": f"RA, examples made on fixed pathway {p} ({kind}), scored on the real model", "value": value}
        )
    if result.get("ra_pathway_worst") is not None:
        rows.append({"metric": "RA, worst over fixed-pathway examples", "value": result["ra_pathway_worst"]})
    if result.get("ra_soft_routing") is not None:
        rows.append(
            {
                "metric": "RA, soft-routing surrogate's examples scored on the real model",
                "value": result["ra_soft_routing"],
            }
        )
        rows.append(
            {"metric": "SA of the soft-routing surrogate (its fidelity)", "value": result.get("sa_soft_routing")}
        )
    lines.append(markdown_table(rows, [("metric", "metric"), ("value", "% of samples")], percent=["value"]))
    plan = result.get("evaluation_plan")
    if plan:
        lines += ["", "Where each robust accuracy comes from:", ""]
        table = [{**row, "in_ra_worst": "yes" if row["in_ra_worst"] else "no"} for row in plan]
        cols = [
            ("result", "result"),
            ("attack", "attack"),
            ("attacked", "examples made on"),
            ("scored_on", "scored on"),
            ("in_ra_worst", "in worst case"),
        ]
        lines.append(markdown_table(table, cols))
    rob = result.get("router_robustness")
    if rob:
        lines += [
            "",
            "Routing kept under attack (share of the attacked samples: correct when clean and changed by the attack):",
            "",
        ]
        layers = sorted({layer for r in rob.values() for layer in r["per_layer"]})
        cols = [("attack", "attack"), ("num_attacked", "attacked"), ("all_layers", "all layers")]
        cols += [(layer, layer) for layer in layers]
        table = [
            {
                "attack": name,
                "num_attacked": str(r.get("num_attacked", "")),
                "all_layers": r["all_layers"],
                **r["per_layer"],
            }
            for name, r in rob.items()
        ]
        lines.append(markdown_table(table, cols, percent=["all_layers", *layers]))
    usage = result.get("expert_usage")
    if usage:
        lines += ["", "Expert usage (samples per expert, per layer, on the inputs each attack returned):", ""]
        layers = list(usage["clean"])
        cols = [("layer", "layer")] + [(name, name) for name in usage]
        table = [{"layer": layer, **{n: str(u.get(layer, [])) for n, u in usage.items()}} for layer in layers]
        lines.append(markdown_table(table, cols))
    if result.get("warnings"):
        lines += ["", "Warnings:"] + [f"- {w}" for w in result["warnings"]]
    return "\n".join(lines)
