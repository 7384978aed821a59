"""The study's readable outputs: ``table.md`` (arms, paired comparisons) and ``expert_usage.md``."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

from advmoe.eval.report import mean_std

__all__ = ["mean_std", "write_expert_usage", "write_table"]


def _ms(values, digits: int = 1) -> str:
    mean, std, n = mean_std(values)
    if mean is None:
        return "–"
    return f"{mean:.{digits}f} ± {std:.{digits}f}" if n > 1 else f"{mean:.{digits}f}"


def _num(v, digits: int = 1, signed: bool = False) -> str:
    if v is None:
        return "–"
    return f"{v:+.{digits}f}" if signed else f"{v:.{digits}f}"


def _ci(ci) -> str:
    return "–" if ci is None else f"[{ci[0]:+.1f}, {ci[1]:+.1f}]"


def _p(p) -> str:
    return "–" if p is None else ("< 0.001" if p < 0.001 else f"{p:.3f}")


def _attack_text(results: dict[str, Any]) -> str:
    ev = results["config"]["eval"]
    aa = ev.get("autoattack") or {}
    n = ev.get("test_samples")
    where = "the full test split" if n is None else f"the first {n} test images"
    if results["headline_metric"] == "autoattack":
        from advmoe.attacks import autoattack_variant

        kw = {k: aa.get(k) for k in ("version", "n_iter", "n_targets", "square_queries") if aa.get(k) is not None}
        parts = [f"variant `{autoattack_variant(**kw)}`: version {aa.get('version', 'standard')}"]
        for key, name in (
            ("n_iter", "iterations"),
            ("n_targets", "APGD-T targets"),
            ("square_queries", "Square queries"),
        ):
            if aa.get(key) is not None:
                parts.append(f"{aa[key]} {name}")
        return f"AutoAttack ({', '.join(parts)}) on {where}"
    return f"PGD-{(ev.get('pgd') or {}).get('steps', 20)} (CE, step eps/4) on {where}"


def write_table(results: dict[str, Any], path: Path) -> str:
    """Write ``table.md`` from the study results (see ``run_study.main``) and return its text."""
    summary, ev = results["summary"], results["config"]["eval"]
    eps_keys = [f"{e:g}" for e in ev["eps"]]
    head = results["headline_metric"]
    cols = ["arm", "seeds (diverged)", "SA"] + [f"RA @ {e}" for e in eps_keys]
    research = "research_pgd" in ev["metrics"]
    if research:
        cols += [f"research metric @ {e}" for e in eps_keys]
    domain = "domain_routing" in ev["metrics"]
    if domain:
        cols += ["routing = domain (%, mean over layers)"]
    cols += ["MFLOPs / image", "collapsed layers", "selected epoch", "CPU-s per run"]
    lines = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for arm in results["arms"]:
        entry = summary[arm]
        v = entry["values"]
        seeds = f"{len(entry['seeds'])}" + (f" ({len(entry['diverged'])} diverged)" if entry["diverged"] else "")
        row = [entry["label"], seeds, _ms(v["sa"].values())]
        row += [_ms(v.get(f"{head}@{e}", {}).values()) for e in eps_keys]
        if research:
            row += [_ms(v.get(f"research_pgd@{e}", {}).values()) for e in eps_keys]
        if domain:
            row += [_ms(entry.get("domain_agreement", {}).values())]
        flops = [f / 1e6 if f is not None else None for f in entry["flops_per_image"].values()]
        row += [_ms(flops, 2), _ms(entry["collapsed_layers"].values()), _ms(entry["selected_epoch"].values())]
        row += [_ms(entry.get("cpu_s", {}).values(), 0)]
        lines.append("| " + " | ".join(row) + " |")
    comp = [
        "| comparison (first - second) | eps | pairs | mean diff | 95% CI (t) | 95% CI (bootstrap) | p | p (Holm) "
        "| detectable diff | verdict |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for c in results["comparisons"]:
        comp.append(
            f"| {c['first']} - {c['second']} | {c['eps']:g} | {c['n']} | {_num(c['mean'], 1, True)} | {_ci(c['t_ci'])} "
            f"| {_ci(c['boot_ci'])} | {_p(c['p'])} | {_p(c['p_holm'])} | {_num(c['mdd'])} | {c['verdict']} |"
        )
    mach = results["machine"]
    where = f"GPU {mach['gpu']}" if mach.get("gpu") else f"{mach['cpu_count']} CPUs ({mach['processor']})"
    size = results["config"]["base"]["data"].get("kwargs", {}).get("size", 28)
    text = "\n".join(
        [
            f"# Robustness study on mnist5k ({results['profile']} profile)",
            "",
            f"Arms x seeds: {len(results['arms'])} x {len(results['seeds'])} (seeds {results['seeds']}); "
            f"images {size} x {size}, 1 channel; L-inf. Accuracies in % of the test images; mean ± std over "
            f"the finished seeds. RA: {_attack_text(results)}, of the checkpoint with the best validation PGD "
            "RA. Research metric: the research code's PGD-10 with router term, best epoch on the test split"
            + (
                f" (first {ev['research_pgd']['samples']} test images)"
                if (ev.get("research_pgd") or {}).get("samples")
                else ""
            )
            + ". FLOPs: fvcore, one multiply-add = one FLOP, router included, active experts only; "
            '"collapsed" = MoE layers sending >= 95% of the clean test images to one expert. CPU-s: the run\'s '
            "process CPU time (training + evaluation; one thread), i.e. its wall time on an idle core.",
            "",
            *lines,
            "",
            f"## Paired differences of RA ({head}), in points",
            "",
            "Per-seed differences over the seeds where both arms finished. CI: 95% paired t-interval and "
            "percentile bootstrap; p: two-sided paired t-test; Holm: adjusted over all rows; detectable diff: "
            "the true difference a paired t-test (alpha 0.05) would detect with power 0.8 given the measured "
            "spread. Verdict rule (PROTOCOL.md): supported if Holm p < 0.05 and the CI is above 0; a gain of "
            "at least 1 point is excluded if the CI's upper end is below 1; otherwise undecided.",
            "",
            *comp,
            "",
            f"Ran on {where}, torch {mach['torch']}, {results['jobs']} concurrent run(s) with "
            f"{results['threads_per_run']} thread(s) each; "
            + (
                f"sum of the runs' times {results['total_time_s']:.0f} s. "
                if results.get("collected_only")
                else f"total {results['total_time_s']:.0f} s. "
            )
            + f"Commit {str(results['commit'].get('sha'))[:10]}"
            + (" (with uncommitted changes)" if results["commit"].get("dirty") else "")
            + f". Command: `{results['command']}`."
            + (" Smoke profile: numbers meaningless." if results["profile"] == "smoke" else ""),
        ]
    )
    if results.get("missing_runs"):
        text += "\n\nNot run or not finished (study cut short): " + ", ".join(results["missing_runs"]) + "."
    if results["diverged"]:
        text += "\n\nDiverged runs (loss became NaN/inf): " + ", ".join(
            f"{d['arm']} seed {d['seed']}" for d in results["diverged"]
        )
    Path(path).write_text(text + "\n")
    return text + "\n"


def write_expert_usage(results: dict[str, Any], path: Path) -> str:
    """Expert usage per MoE layer per arm (clean test images, share of expert 0, mean over seeds)."""
    lines = [
        "# Expert usage per MoE layer (clean test images)",
        "",
        "Share of the test images routed to expert 0 (of 2), mean ± std over seeds; 50% is balanced, "
        "0% or 100% is a collapsed layer. Routing kept: share of images whose expert is unchanged under "
        "the headline attack at the largest eps.",
        "",
    ]
    eps = f"{results['config']['eval']['eps'][-1]:g}"
    head = results["headline_metric"]
    for arm in results["arms"]:
        runs = [r for r in results["runs"] if r["arm"] == arm and not r.get("diverged")]
        routing = [(r["result"].get("routing") or {}) for r in runs]
        if not routing or not routing[0].get("usage_clean"):
            continue
        lines += [
            f"## {results['summary'][arm]['label']}",
            "",
            "| layer | expert 0 (%) | routing kept (%) |",
            "|---|---|---|",
        ]
        for layer in routing[0]["usage_clean"]:
            share = [100 * ro["usage_clean"][layer][0] / max(1, sum(ro["usage_clean"][layer])) for ro in routing]
            kept = [
                100 * ((ro.get("kept") or {}).get(head, {}).get(eps, {}) or {}).get(layer, math.nan) for ro in routing
            ]
            kept = [k for k in kept if not math.isnan(k)]
            lines.append(f"| {layer} | {_ms(share)} | {_ms(kept)} |")
        lines.append("")
    text = "\n".join(lines) + "\n"
    Path(path).write_text(text)
    return text
