"""The study's plots: robust accuracy against inference FLOPs, and routing robustness per MoE layer."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from study_tables import mean_std  # noqa: E402

__all__ = ["plot_ra_vs_flops", "plot_routing_robustness"]


def plot_ra_vs_flops(results: dict[str, Any], path: Path) -> None:
    """RA (%) of the headline attack at each eps against MFLOPs per image; error bars = std over seeds."""
    eps_keys = [f"{e:g}" for e in results["config"]["eval"]["eps"]]
    head = results["headline_metric"]
    fig, axes = plt.subplots(1, len(eps_keys), figsize=(4.6 * len(eps_keys) + 2.4, 4.2), squeeze=False)
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for ax, eps in zip(axes[0], eps_keys, strict=True):
        for i, arm in enumerate(results["arms"]):
            entry = results["summary"][arm]
            fmean, fstd, _ = mean_std(entry["flops_per_image"].values())
            rmean, rstd, n = mean_std(entry["values"].get(f"{head}@{eps}", {}).values())
            if fmean is None or rmean is None:
                continue
            ax.errorbar(
                fmean / 1e6,
                rmean,
                xerr=fstd / 1e6,
                yerr=rstd,
                fmt="o",
                color=colors[i % len(colors)],
                label=f"{entry['label']} (n={n})",
                capsize=3,
                markersize=7,
            )
        ax.set_xlabel("inference MFLOPs per image (fvcore, router included)")
        ax.set_ylabel(f"RA, {head} (%)")
        ax.set_title(f"eps = {eps}")
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    legend = fig.legend(handles, labels, loc="center left", bbox_to_anchor=(1.0, 0.5), fontsize=8)
    fig.suptitle("Robust accuracy vs inference cost (mean ± std over seeds)")
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight", bbox_extra_artists=[legend])
    plt.close(fig)


def plot_routing_robustness(results: dict[str, Any], path: Path) -> None:
    """Per MoE layer and arm: share of test images whose expert is unchanged under the headline attack."""
    eps_keys = [f"{e:g}" for e in results["config"]["eval"]["eps"]]
    head = results["headline_metric"]
    fig, axes = plt.subplots(1, len(eps_keys), figsize=(5.2 * len(eps_keys), 4.2), squeeze=False)
    for ax, eps in zip(axes[0], eps_keys, strict=True):
        for arm in results["arms"]:
            runs = [r for r in results["runs"] if r["arm"] == arm and not r.get("diverged")]
            kept = [((r["result"].get("routing") or {}).get("kept") or {}).get(head, {}).get(eps) for r in runs]
            kept = [k for k in kept if k]
            if not kept:
                continue
            layers = list(kept[0])
            means = [100 * mean_std([k.get(layer, math.nan) for k in kept])[0] for layer in layers]
            ax.plot(range(len(layers)), means, marker="o", label=results["summary"][arm]["label"])
            ax.set_xticks(range(len(layers)), layers, rotation=60, ha="right", fontsize=7)
        ax.set_ylim(0, 105)
        ax.set_ylabel("test images with unchanged expert (%)")
        ax.set_title(f"routing kept under {head}, eps = {eps}")
        ax.grid(alpha=0.3)
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
