"""Small-scale reproduction of the AdvMoE claim on the embedded digits data (issue 7).

Trains dense PGD-AT, dense TRADES, MoE-AT and AdvMoE (r=0.5, E=2) for each seed with ``advmoe.train``,
evaluates every final model with ``advmoe.eval.evaluate`` (SA, RA under PGD-20 and AutoAttack, the
per-sample worst case including router and fixed-pathway attacks, routing robustness) and counts FLOPs
with ``advmoe.flops.count_flops``; then writes ``results.json``, ``table.md`` (mean ± std over seeds) and
two plots (RA vs FLOPs, routing robustness) to the output folder.

Usage::

    python benchmarks/robustness/run_study.py                      # seeds 0 1 2, all four methods
    python benchmarks/robustness/run_study.py --seeds 0 --methods dense_at advmoe
    python benchmarks/robustness/run_study.py --smoke --out /tmp/smoke   # CI: < 60 s

Runs (checkpoints, logs) go to ``--work-dir``; a run whose ``result.json`` exists there with the same
configuration is reused (``--fresh`` retrains), so an interrupted study resumes where it stopped.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

import torch

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for path in (HERE, ROOT):  # the study's helper modules; the package from a checkout without installing
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

from study_plots import plot_ra_vs_flops, plot_routing_robustness  # noqa: E402
from study_tables import METRICS, write_table  # noqa: E402

from advmoe._config import from_dict, load_yaml  # noqa: E402
from advmoe.eval import EVALUATION_VERSION, EvalConfig, evaluate, mean_std, summarize  # noqa: E402
from advmoe.eval.metrics import autoattack_variant_of  # noqa: E402
from advmoe.train.config import ExperimentConfig  # noqa: E402

DEFAULT_CONFIG = Path(__file__).with_name("study.yaml")
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "robustness_digits"
DEFAULT_WORK = ROOT / "runs" / "robustness_digits"


def deep_merge(base: dict[str, Any], update: dict[str, Any]) -> dict[str, Any]:
    """A copy of ``base`` with ``update`` merged in (nested dicts merged key by key)."""
    out = copy.deepcopy(base)
    for key, value in (update or {}).items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def load_study(path: Path, smoke: bool) -> dict[str, Any]:
    """Read the study file; with ``smoke`` apply its ``smoke`` overrides. Checks every method's config."""
    study = load_yaml(str(path))
    for key in ("base", "methods", "eval"):
        if key not in study:
            raise ValueError(f"study config {str(path)!r} has no {key!r} section")
    smoke_cfg = study.get("smoke") or {}
    if smoke:
        study["base"] = deep_merge(study["base"], smoke_cfg.get("config", {}))
        study["eval"] = deep_merge(study["eval"], smoke_cfg.get("eval", {}))
    from_dict(EvalConfig, study["eval"], "eval")
    for method in study["methods"]:
        run_config(study, method, 0)
    return study


def run_config(study: dict[str, Any], method: str, seed: int) -> ExperimentConfig:
    """The validated training config of one (method, seed) run."""
    if method not in study["methods"]:
        raise ValueError(f"unknown method {method!r}; known: {list(study['methods'])}")
    override = {k: v for k, v in study["methods"][method].items() if k != "label"}
    return ExperimentConfig.from_dict(deep_merge(study["base"], {**override, "seed": int(seed)}))


def flops_per_image(model: torch.nn.Module, x: torch.Tensor) -> float | None:
    """fvcore FLOPs (one multiply-add = one FLOP) per image of ``model`` on the batch ``x``; None if unavailable."""
    try:
        from advmoe.flops import count_flops
    except ImportError:
        return None
    with torch.no_grad():
        return float(count_flops(model, x)) / x.shape[0]


def collapsed_layers(result: dict[str, Any], threshold: float = 0.95) -> int | None:
    """MoE layers whose clean routing sends at least ``threshold`` of the samples to one expert (None: dense)."""
    usage = (result.get("expert_usage") or {}).get("clean")
    if not usage:
        return None
    return sum(1 for counts in usage.values() if sum(counts) and max(counts) >= threshold * sum(counts))


def run_one(study: dict[str, Any], method: str, seed: int, work_dir: Path, fresh: bool) -> dict[str, Any]:
    """Train (or reuse) one run, evaluate its final checkpoint, and return its record."""
    from advmoe.data import build_dataset
    from advmoe.train import NonFiniteLossError
    from advmoe.train.trainer import load_trained_model, train

    cfg = run_config(study, method, seed)
    eval_cfg = from_dict(EvalConfig, study["eval"], "eval")
    run_dir = work_dir / f"{method}_seed{seed}"
    result_path = run_dir / "result.json"
    fingerprint = {"config": cfg.to_dict(), "eval": study["eval"], "evaluation_version": EVALUATION_VERSION}
    if result_path.is_file() and not fresh:
        record = json.loads(result_path.read_text())
        if record.get("fingerprint") == fingerprint:
            print(f"[{method} seed {seed}] reusing {result_path}", flush=True)
            return record
    print(f"[{method} seed {seed}] training -> {run_dir}", flush=True)
    label = study["methods"][method].get("label", method)
    start = time.perf_counter()
    try:
        summary = train(cfg, run_dir)
    except NonFiniteLossError as err:  # a diverged run is a result too: record it and go on
        record = {"method": method, "label": label, "seed": seed, "error": str(err), "fingerprint": fingerprint,
                  "train_time_s": round(time.perf_counter() - start, 2)}  # fmt: skip
        result_path.write_text(json.dumps(record, indent=1))
        print(f"[{method} seed {seed}] diverged: {err}", flush=True)
        return record
    train_time = time.perf_counter() - start
    model, _ = load_trained_model(run_dir / "last.pt", device="cpu")
    test_set = build_dataset(cfg.data.name, root=cfg.data.root, split=cfg.data.test_split, **cfg.data.kwargs)
    start = time.perf_counter()
    result = evaluate(model, test_set, eval_cfg)
    eval_time = time.perf_counter() - start
    x = torch.stack([test_set[i][0] for i in range(min(8, len(test_set)))])
    record = {
        "method": method,
        "label": label,
        "seed": seed,
        "train_steps": summary["global_step"],
        "train_time_s": round(train_time, 2),
        "eval_time_s": round(eval_time, 2),
        "flops_per_image": flops_per_image(model, x),
        "metrics": summarize(result),
        "collapsed_layers": collapsed_layers(result),
        "moe_layers": len((result.get("expert_usage") or {}).get("clean") or {}),
        "eval": result,
        "fingerprint": fingerprint,
    }
    result_path.write_text(json.dumps(record, indent=1))
    s = record["metrics"]
    print(
        f"[{method} seed {seed}] train {train_time:.0f} s, eval {eval_time:.0f} s: SA {100 * s['sa']:.1f}  "
        f"RA(PGD) {100 * (s.get('ra_pgd_ce') or 0):.1f}  RA(worst) {100 * s['ra_worst']:.1f}",
        flush=True,
    )
    return record


def aggregate(records: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Per method: label, seeds, diverged seeds, and ``(mean, std, n)`` of every metric over the finished runs."""
    out: dict[str, dict[str, Any]] = {}
    for rec in records:
        entry = out.setdefault(rec["method"], {"label": rec["label"], "seeds": [], "diverged": [], "runs": []})
        if "error" in rec:
            entry["diverged"].append(rec["seed"])
        else:
            entry["seeds"].append(rec["seed"])
            entry["runs"].append(rec)
    for entry in out.values():
        runs = entry.pop("runs")
        if not runs:
            entry["metrics"], entry["moe_layers"] = {}, 0
            continue
        keys = [k for k, _ in METRICS if k not in ("flops_per_image", "train_time_s", "collapsed_layers")]
        entry["metrics"] = {k: mean_std([r["metrics"].get(k) for r in runs]) for k in keys}
        entry["metrics"]["flops_per_image"] = mean_std([r["flops_per_image"] for r in runs])
        entry["metrics"]["train_time_s"] = mean_std([r["train_time_s"] for r in runs])
        entry["metrics"]["collapsed_layers"] = mean_std([r["collapsed_layers"] for r in runs])
        entry["moe_layers"] = runs[0]["moe_layers"]
    return out


def machine() -> dict[str, Any]:
    """Where the study ran."""
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "python": platform.python_version(),
    }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="study YAML (default: study.yaml)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2; smoke: 0)")
    parser.add_argument("--methods", nargs="+", default=None, help="subset of the study's methods")
    parser.add_argument("--smoke", action="store_true", help="a handful of steps, one seed, tiny evaluation")
    parser.add_argument("--out", type=Path, default=None, help=f"results folder (default {DEFAULT_OUT})")
    parser.add_argument("--work-dir", type=Path, default=None, help="run folders (default: runs/ or OUT/runs)")
    parser.add_argument("--fresh", action="store_true", help="retrain even where a matching result exists")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads (default 1: these small batches gain little from more, "
        "and on a shared machine 2 threads ran ~40x slower than 1); 0 = torch's default",
    )
    args = parser.parse_args(argv)

    if args.threads < 0:
        parser.error("--threads must be >= 0")
    if args.threads:
        torch.set_num_threads(args.threads)
    study = load_study(args.config, args.smoke)
    seeds = args.seeds if args.seeds is not None else ([0] if args.smoke else [0, 1, 2])
    methods = args.methods or list(study["methods"])
    for m in methods:
        if m not in study["methods"]:
            parser.error(f"unknown method {m!r}; known: {list(study['methods'])}")
    out = args.out or DEFAULT_OUT
    work_dir = args.work_dir or (out / "runs" if args.out is not None else DEFAULT_WORK)
    out.mkdir(parents=True, exist_ok=True)

    start = time.perf_counter()
    records = [run_one(study, m, s, work_dir, args.fresh) for m in methods for s in seeds]
    total = time.perf_counter() - start
    summary = aggregate(records)
    eval_cfg = from_dict(EvalConfig, study["eval"], "eval")
    variant = autoattack_variant_of(eval_cfg) if "autoattack" in eval_cfg.attacks else None
    results = {
        "study": "AdvMoE small-scale reproduction on digits (issue 7)",
        "smoke": args.smoke,
        "machine": machine(),
        "total_time_s": round(total, 1),
        "seeds": seeds,
        "methods": methods,
        "config": {"base": study["base"], "methods": study["methods"], "eval": study["eval"]},
        "autoattack_variant": variant,  # the AutoAttack budget behind every ra_autoattack (e.g. autoattack-fast-25it)
        "summary": summary,
        "runs": [{k: v for k, v in r.items() if k != "fingerprint"} for r in records],
        "diverged": [{"method": r["method"], "seed": r["seed"], "error": r["error"]} for r in records if "error" in r],
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_table(results, out / "table.md")
    plot_ra_vs_flops(summary, out / "ra_vs_flops.png", autoattack_name=variant or "AutoAttack")
    plot_routing_robustness(records, out / "routing_robustness.png", autoattack_name=variant or "AutoAttack")
    print(f"wrote {out}/results.json, table.md, ra_vs_flops.png, routing_robustness.png ({total:.0f} s)")
    return results


if __name__ == "__main__":
    main()
