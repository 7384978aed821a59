"""Writing the model benchmark's results: JSON, a markdown table and a PNG plot."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

_VARIANT_ORDER = ("dense", "masked", "sparse", "deployed", "ideal", "router")


def _variant_key(name: str) -> tuple[int, str]:
    base = name.split("[")[0]
    return (_VARIANT_ORDER.index(base) if base in _VARIANT_ORDER else len(_VARIANT_ORDER), name)


def markdown_table(results: dict[str, Any]) -> str:
    """The model table (docs/deployment.md): per model, FLOPs per image and latency per batch size with ratios.

    Args:
        results: the dict written to ``models_bench.json`` (see ``advmoe.bench.models.run_benchmark``).

    Returns:
        Markdown text.
    """
    s = results["settings"]
    router = s.get("router", "research")
    router_text = "research (model-level) router" if router == "research" else "per-layer routers"
    prov = results.get("provenance", {})
    lines = [
        f"Device: {results['device']}; dtype {s['dtype']}; MoE r={s['ratio']}, E={s['num_experts']}, top-1, "
        f"{router_text}. Treatment (every side): {s.get('treatment', 'not recorded (older run)')}; execution "
        f"{s.get('execution', 'eager')}. Commit {str(prov.get('commit'))[:12]}"
        + (" (dirty)" if prov.get("dirty") else "")
        + ". "
        + ("Time: CPU time of the one compute thread" if s.get("clock") == "thread" else "Latency")
        + f": median of {s['repeats']} interleaved runs after {s['warmup']} warm-up runs, one process. "
        "FLOPs: fvcore, one multiply-add = one FLOP, per image, router included.",
        "",
        "Variants: dense = dense CNN; masked = research code's MoE (all experts computed, then masked); "
        "sparse[b] = our MoE model with backend b (training form, unfolded); deployed = `advmoe.deploy.to_sparse` "
        "(auto mode; deployed[m] = mode m); ideal = folded slim dense CNN of the active width (r) plus the folded "
        "router; router = the folded model-level router alone.",
        "",
    ]
    for entry in results["models"]:
        flops = entry["flops_g"]
        lines.append(f"### {entry['model']} ({entry['image_size']}x{entry['image_size']})")
        lines.append("")
        batches = sorted({row["batch"] for row in entry["latency"]})
        variants = sorted({row["variant"] for row in entry["latency"]}, key=_variant_key)
        header = "| variant | GFLOPs/img | FLOPs vs dense | " + " | ".join(
            f"B={b} ms (x dense, x ideal)" for b in batches
        )
        lines += [header + " |", "|" + "---|" * (3 + len(batches))]
        by_key = {(row["variant"], row["batch"]): row for row in entry["latency"]}
        for variant in variants:
            g = flops.get(variant, flops.get(variant.split("[")[0]))
            cells = [variant, "-" if g is None else f"{g:.3f}"]
            cells.append(f"{g / flops['dense']:.3f}" if g is not None and flops.get("dense") else "-")
            for b in batches:
                row = by_key.get((variant, b))
                if row is None:
                    cells.append("-")
                else:
                    vs = [f"{row[k]:.3f}" if row.get(k) is not None else "-" for k in ("vs_dense", "vs_ideal")]
                    cells.append(f"{row['median_ms']:.2f} ({vs[0]}, {vs[1]})")
            lines.append("| " + " | ".join(cells) + " |")
        if entry.get("deploy_reason"):
            lines.append(f"deployed: {entry['deploy_reason']}")
        for key, why in (entry.get("skipped") or {}).items():
            lines.append(f"not run: {key}: {why}")
        lines.append("")
    return "\n".join(lines)


def save_plot(results: dict[str, Any], path: str | Path) -> None:
    """PNG with, per model, latency ratio vs dense over batch size and FLOPs bars.

    Args:
        results: the benchmark dict.
        path: the PNG to write.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = results["models"]
    fig, axes = plt.subplots(2, len(models), figsize=(4.2 * len(models), 7.0), squeeze=False)
    for col, entry in enumerate(models):
        ax = axes[0][col]
        variants = sorted({row["variant"] for row in entry["latency"]}, key=_variant_key)
        for variant in variants:
            rows = sorted((r for r in entry["latency"] if r["variant"] == variant), key=lambda r: r["batch"])
            ax.plot([r["batch"] for r in rows], [r["vs_dense"] for r in rows], marker="o", label=variant)
        ax.set_xscale("log", base=2)
        ax.set_title(entry["model"], fontsize=9)
        ax.set_xlabel("batch size")
        ax.set_ylabel("time / dense model time")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
        ax = axes[1][col]
        names = [n for n in entry["flops_g"] if entry["flops_g"].get(n) is not None]
        ax.bar(names, [entry["flops_g"][n] for n in names], color="tab:blue")
        ax.set_ylabel("GFLOPs / image (fvcore)")
        ax.tick_params(axis="x", labelrotation=30, labelsize=8)
    fig.suptitle(f"{results['device']} ({results['settings']['dtype']})", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write_results(results: dict[str, Any], out_dir: str | Path, plot: bool = True) -> dict[str, Path]:
    """Writes ``models_bench.json``, ``models_bench.md`` and (optionally) ``models_bench.png``.

    Args:
        results: the benchmark dict.
        out_dir: folder to write into (created).
        plot: also draw the PNG.

    Returns:
        kind ("json", "md", "png") -> path written.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths = {"json": out / "models_bench.json", "md": out / "models_bench.md"}
    paths["json"].write_text(json.dumps(results, indent=1) + "\n")
    paths["md"].write_text(markdown_table(results) + "\n")
    if plot:
        try:
            save_plot(results, out / "models_bench.png")
            paths["png"] = out / "models_bench.png"
        except ImportError as err:
            import warnings

            warnings.warn(f"no plot written: {err}", stacklevel=2)
    return paths
