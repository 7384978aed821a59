"""The study's readable table (``table.md``): one row per method, mean ± std over seeds."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from advmoe.eval import EvalConfig, markdown_table
from advmoe.eval.metrics import attack_label, autoattack_variant_of

# (metric key, column header); fractions are shown in percent.
METRICS = [
    ("sa", "SA"),
    ("ra_pgd_ce", "RA PGD-{steps}"),
    ("ra_autoattack", "RA {autoattack}"),
    ("ra_worst", "RA worst case"),
    ("ra_frozen_routing", "RA, routing frozen (scored frozen)"),
    ("ra_pathway_worst", "RA, fixed-pathway attacks"),
    ("router_unchanged_pgd_ce", "routing kept, PGD"),
    ("router_unchanged_router_attack", "routing kept, router attack"),
    ("collapsed_layers", "collapsed MoE layers"),
    ("flops_per_image", "MFLOPs / image"),
    ("train_time_s", "train time (s)"),
]
PERCENT = [k for k, _ in METRICS if k not in ("flops_per_image", "train_time_s", "collapsed_layers")]


def _scaled(value: tuple, scale: float) -> tuple:
    mean, std, n = value
    return (None, None, 0) if mean is None else (mean * scale, std * scale, n)


def _plain(value: tuple, digits: int) -> str:
    mean, std, n = value
    if mean is None:
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def write_table(results: dict[str, Any], path: Path) -> str:
    """Write ``table.md`` from the study results (see ``run_study.main``) and return its text."""
    cfg = results["config"]["eval"]
    eval_cfg = EvalConfig(**cfg)
    variant = autoattack_variant_of(eval_cfg)  # the AutoAttack budget behind every row's column
    budget = attack_label("autoattack", eval_cfg)
    if variant != "autoattack-standard":
        budget += ", not the standard budget"
    headers = [(k, h.format(steps=cfg.get("pgd_steps", "k"), autoattack=variant)) for k, h in METRICS]
    rows = []
    for method in results["methods"]:
        entry = results["summary"][method]
        m = entry["metrics"]
        diverged = entry.get("diverged", [])
        seeds = f"{len(entry['seeds'])}" + (f" ({len(diverged)} more diverged)" if diverged else "")
        row: dict[str, Any] = {"method": entry["label"], "seeds": seeds}
        if not m:
            rows.append(row)
            continue
        for key in PERCENT:
            row[key] = m.get(key, (None, None, 0))
        row["flops_per_image"] = _plain(_scaled(m["flops_per_image"], 1e-6), 2)
        row["train_time_s"] = _plain(m["train_time_s"], 0)
        collapsed = _plain(m["collapsed_layers"], 1 if m["collapsed_layers"][2] > 1 else 0)
        row["collapsed_layers"] = collapsed if collapsed == "–" else f"{collapsed} of {entry['moe_layers']}"
        rows.append(row)
    table = markdown_table(rows, [("method", "method"), ("seeds", "seeds"), *headers], percent=PERCENT)
    mach = results["machine"]
    eps = cfg.get("eps")
    lines = [
        "# AdvMoE on digits: robustness and cost (mean ± std over seeds)",
        "",
        f"Threat model: {cfg.get('norm', 'linf')} eps = {eps:.4g} on [0, 1] images. Accuracies in % of the "
        f'test set. RA {budget}. "RA worst case": per sample, every attack\'s examples '
        "scored on the real model, including those made with routing frozen, on fixed pathways and on the "
        'soft-routing surrogate (docs/evaluation.md); "RA, routing frozen" is scored on the frozen model. '
        '"Routing kept" = share of the attacked test samples (correct when clean and changed by the attack) '
        'whose expert choices are unchanged in every MoE layer; "collapsed" = MoE layers that send >= 95% of '
        "the clean test samples to one expert. FLOPs: fvcore, one multiply-add = one FLOP, router included, "
        "active experts only.",
        "",
        table,
        "",
        f"Machine: {mach['processor']}, {mach['cpu_count']} CPUs, torch {mach['torch']} with "
        f"{mach['torch_threads']} thread(s). Total time {results['total_time_s']:.0f} s"
        + (" (smoke run: numbers meaningless)." if results.get("smoke") else "."),
    ]
    text = "\n".join(lines) + "\n"
    Path(path).write_text(text)
    return text
