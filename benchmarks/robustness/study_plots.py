"""The study's plots: robust accuracy against inference FLOPs, and how often routing survives attacks."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from advmoe.eval import mean_std  # noqa: E402

_RA_SERIES = [("ra_pgd_ce", "PGD", "o"), ("ra_autoattack", "AutoAttack", "s"), ("ra_worst", "worst case", "^")]
_ROUTING_SERIES = [("pgd_ce", "PGD"), ("autoattack", "AutoAttack"), ("router_attack", "router attack")]


def _named(series: list[tuple], autoattack_name: str) -> list[tuple]:
    """The series with the AutoAttack entry labelled by its variant (e.g. ``autoattack-fast-25it``)."""
    return [(s[0], autoattack_name, *s[2:]) if s[1] == "AutoAttack" else s for s in series]


def plot_ra_vs_flops(summary: dict[str, dict[str, Any]], path: Path, autoattack_name: str = "AutoAttack") -> None:
    """Scatter of RA (%) against MFLOPs per image, one colour per method, error bars = std over seeds.

    ``autoattack_name`` labels the AutoAttack series (the variant name, e.g. ``autoattack-fast-25it``)."""
    ra_series = _named(_RA_SERIES, autoattack_name)
    fig, ax = plt.subplots(figsize=(8.6, 4.4))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, entry in enumerate(summary.values()):
        m = entry["metrics"]
        if not m:
            continue
        fmean, fstd, _ = m["flops_per_image"]
        if fmean is None:
            continue
        for key, _, marker in ra_series:
            mean, std, _ = m.get(key, (None, None, 0))
            if mean is None:
                continue
            label = entry["label"] if key == "ra_pgd_ce" else None
            ax.errorbar(
                fmean / 1e6,
                100 * mean,
                xerr=fstd / 1e6,
                yerr=100 * std,
                fmt=marker,
                color=colors[i % len(colors)],
                label=label,
                capsize=3,
                markersize=7,
                mfc="white" if key == "ra_worst" else None,
            )
    handles = [plt.Line2D([], [], color="gray", marker=mk, ls="", label=name) for _, name, mk in ra_series]
    legends = []  # outside the axes, so they never hide a point
    if ax.get_legend_handles_labels()[0]:
        legends.append(ax.legend(loc="lower left", bbox_to_anchor=(1.02, 0.0), fontsize=8, title="method"))
        ax.add_artist(legends[-1])
    legends.append(ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize=8, title="attack"))
    ax.set_xlabel("inference MFLOPs per image (fvcore, router included)")
    ax.set_ylabel("robust accuracy (%)")
    ax.set_title("Robust accuracy vs inference cost (mean ± std over seeds)")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight", bbox_extra_artists=legends)
    plt.close(fig)


def plot_routing_robustness(records: list[dict[str, Any]], path: Path, autoattack_name: str = "AutoAttack") -> None:
    """Bars: share of the attacked samples whose routing is unchanged (all layers) per MoE method and attack;
    and per layer. ``autoattack_name`` labels the AutoAttack bars (its variant name)."""
    routing_series = _named(_ROUTING_SERIES, autoattack_name)
    moe = [r for r in records if "eval" in r and r["eval"].get("router_robustness")]
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4.2))
    methods = list(dict.fromkeys(r["method"] for r in moe))
    labels = {r["method"]: r["label"] for r in moe}
    width = 0.8 / max(1, len(routing_series))
    for j, (attack, name) in enumerate(routing_series):
        means, stds = [], []
        for method in methods:
            vals = [
                (r["eval"]["router_robustness"].get(attack) or {}).get("all_layers")
                for r in moe
                if r["method"] == method
            ]
            mean, std, _ = mean_std(vals)
            means.append(100 * mean if mean is not None else 0.0)
            stds.append(100 * std if std is not None else 0.0)
        xs = [i + (j - (len(routing_series) - 1) / 2) * width for i in range(len(methods))]
        left.bar(xs, means, width, yerr=stds, capsize=3, label=name)
    left.set_xticks(range(len(methods)), [labels[m] for m in methods], fontsize=8)
    left.set_ylabel("samples with unchanged routing (%)")
    left.set_ylim(0, 105)
    left.set_title("Routing kept in all MoE layers")
    left.legend(fontsize=8)
    for method in methods:  # per layer, under the router attack (the attack aimed at routing)
        runs = [r for r in moe if r["method"] == method]
        per_layer = (runs[0]["eval"]["router_robustness"].get("router_attack") or {}).get("per_layer", {})
        layers = list(per_layer)
        if not layers:
            continue
        means = [
            100 * (mean_std([r["eval"]["router_robustness"]["router_attack"]["per_layer"][k] for r in runs])[0])
            for k in layers
        ]
        right.plot(range(len(layers)), means, marker="o", label=labels[method])
        right.set_xticks(range(len(layers)), layers, rotation=60, ha="right", fontsize=7)
    right.set_ylabel("samples with unchanged routing (%)")
    right.set_ylim(0, 105)
    right.set_title("Per MoE layer, under the router attack")
    if right.get_legend_handles_labels()[0]:
        right.legend(fontsize=8)
    right.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
