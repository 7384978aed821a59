"""The mnist5k robustness study (issue 14): five arms, paired seeds, pre-registered metric and tests.

Trains every (arm, seed) run with ``advmoe.train`` (checkpoint per epoch, selection on the validation
split), evaluates the selected checkpoint on the test split (AutoAttack at each eps, the research code's
metric, routing), then writes to ``--out``: ``results.json`` (every per-seed figure, the commit, the
command), ``table.md`` (mean ± std, paired differences with intervals, p-values, detectable difference),
``ra_vs_flops.png``, ``routing_robustness.png`` and ``expert_usage.md``. See PROTOCOL.md and README.md.

Usage::

    python benchmarks/robustness/run_study.py --profile cpu          # 2 cores (see README.md for the time)
    python benchmarks/robustness/run_study.py --profile gpu          # one GPU, 16 concurrent runs
    python benchmarks/robustness/run_study.py --config benchmarks/robustness/sanity.yaml --profile cpu
    python benchmarks/robustness/run_study.py --profile smoke --out /tmp/smoke   # CI

Runs go to ``--work-dir``; a run whose ``result.json`` matches the current configuration is reused and an
interrupted run continues from its last epoch checkpoint (``--fresh`` retrains).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
for path in (HERE, ROOT):  # the study's helper modules; the package from a checkout without installing
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))

import torch  # noqa: E402
from study_config import load_study, select_arms  # noqa: E402
from study_plots import plot_ra_vs_flops, plot_routing_robustness  # noqa: E402
from study_run import run_fingerprint, run_one  # noqa: E402
from study_stats import compare, holm  # noqa: E402
from study_tables import write_expert_usage, write_table  # noqa: E402

DEFAULT_CONFIG = HERE / "study.yaml"
DEFAULT_OUT = ROOT / "benchmarks" / "results" / "robustness_mnist5k"
MIN_GAIN = 1.0  # points: the smallest gain the paper reports; a CI entirely below it contradicts "beats"


def headline_metric(study: dict[str, Any]) -> str:
    """``autoattack`` when configured, else ``pgd``."""
    metrics = study["eval"]["metrics"]
    return "autoattack" if "autoattack" in metrics else "pgd"


def per_seed(record: dict[str, Any], metric: str, eps: str) -> float | None:
    """One run's value of ``metric`` at ``eps`` in points (None if diverged or not measured)."""
    if record.get("diverged"):
        return None
    res = record["result"]
    if metric == "research_pgd":
        value = (res.get("research_pgd") or {}).get("best", {}).get(eps)
    elif metric == "sa":
        value = res.get("sa")
    else:
        value = (res.get(metric) or {}).get(eps)
    return None if value is None else 100.0 * value


def collapsed_layers(record: dict[str, Any], threshold: float = 0.95) -> int | None:
    """MoE layers sending >= ``threshold`` of the clean test images to one expert (None: dense or diverged)."""
    usage = ((record.get("result") or {}).get("routing") or {}).get("usage_clean")
    if not usage:
        return None
    return sum(1 for c in usage.values() if sum(c) and max(c) >= threshold * sum(c))


def domain_score(record: dict[str, Any]) -> float | None:
    """Mean over MoE layers of the routing/domain agreement, in % (None where not measured)."""
    agree = (record.get("result") or {}).get("domain_routing")
    return 100.0 * sum(agree.values()) / len(agree) if agree else None


def summarize(study: dict[str, Any], records: list[dict[str, Any]], arms: list[str]) -> dict[str, Any]:
    """Per arm: finished and diverged seeds, and per metric the per-seed values (points)."""
    eps_keys = [f"{e:g}" for e in study["eval"]["eps"]]
    metrics = [m for m in ("autoattack", "pgd", "research_pgd") if m in study["eval"]["metrics"]]
    out = {}
    for arm in arms:
        runs = sorted((r for r in records if r["arm"] == arm), key=lambda r: r["seed"])
        entry: dict[str, Any] = {
            "label": study["arms"][arm].get("label", arm),
            "seeds": [r["seed"] for r in runs if not r.get("diverged")],
            "diverged": [r["seed"] for r in runs if r.get("diverged")],
            "values": {"sa": {str(r["seed"]): per_seed(r, "sa", "") for r in runs}},
        }
        for m in metrics:
            for e in eps_keys:
                entry["values"][f"{m}@{e}"] = {str(r["seed"]): per_seed(r, m, e) for r in runs}
        fin = [r for r in runs if not r.get("diverged")]
        entry["flops_per_image"] = {str(r["seed"]): r["result"].get("flops_per_image") for r in fin}
        entry["collapsed_layers"] = {str(r["seed"]): collapsed_layers(r) for r in fin}
        entry["selected_epoch"] = {str(r["seed"]): r["selected_epoch"] for r in fin}
        entry["domain_agreement"] = {str(r["seed"]): domain_score(r) for r in fin}
        entry["train_time_s"] = {str(r["seed"]): r.get("train_time_s") for r in runs}
        entry["cpu_s"] = {
            str(r["seed"]): r["train_cpu_s"] + r["eval_cpu_s"] if "train_cpu_s" in r else None for r in fin
        }
        out[arm] = entry
    return out


def comparisons(study: dict[str, Any], summary: dict[str, Any]) -> list[dict[str, Any]]:
    """Paired per-seed differences of the headline metric for every pre-registered comparison and eps."""
    metric = headline_metric(study)
    rows = []
    for first, second in study["comparisons"]:
        if first not in summary or second not in summary:
            continue
        for eps in study["eval"]["eps"]:
            key = f"{metric}@{eps:g}"
            a, b = summary[first]["values"].get(key, {}), summary[second]["values"].get(key, {})
            seeds = sorted((s for s in a if s in b and a[s] is not None and b[s] is not None), key=int)
            diffs = [a[s] - b[s] for s in seeds]
            row = {"first": first, "second": second, "metric": metric, "eps": eps, "seeds": [int(s) for s in seeds]}
            row["diffs"] = diffs
            row.update(compare(diffs))
            rows.append(row)
    adjusted = holm([r["p"] for r in rows]) if "holm" in study["statistics"] else [None] * len(rows)
    for row, p_holm in zip(rows, adjusted, strict=True):
        row["p_holm"] = p_holm
        row["verdict"] = verdict(row)
    return rows


def verdict(row: dict[str, Any]) -> str:
    """The protocol's reading rule for "first arm beats second" (see PROTOCOL.md)."""
    ci, p = row.get("t_ci"), row.get("p_holm") if row.get("p_holm") is not None else row.get("p")
    if ci is None or p is None:
        return "too few pairs"
    if p < 0.05 and ci[0] > 0:
        return "first better (supported)"
    if p < 0.05 and ci[1] < 0:
        return "first worse"
    if ci[1] < MIN_GAIN:
        return f"gain >= {MIN_GAIN:g} pt excluded"
    return "undecided"


def machine() -> dict[str, Any]:
    """Where the study ran."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "cpu_count": os.cpu_count(),
        "gpu": gpu,
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def commit() -> dict[str, Any]:
    """The checkout's commit and whether it had uncommitted changes (None outside git)."""
    try:
        sha = subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True)
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            check=True,
        )
    except (OSError, subprocess.CalledProcessError):
        return {"sha": None, "dirty": None}
    return {"sha": sha.stdout.strip(), "dirty": bool(dirty.stdout.strip())}


def collect(study, arms, seeds, work_dir) -> list[dict[str, Any]]:
    """The finished runs' records already in ``work_dir`` (matching configuration only); nothing is trained."""
    from study_config import arm_config

    records = []
    for arm in arms:
        for seed in seeds:
            path = Path(work_dir) / f"{arm}_seed{seed}" / "result.json"
            if not path.is_file():
                continue
            record = json.loads(path.read_text())
            if record.get("fingerprint") == run_fingerprint(arm_config(study, arm, seed), study["eval"]):
                records.append(record)
    return records


def run_all(study, arms, seeds, work_dir, jobs, threads, fresh) -> list[dict[str, Any]]:
    """Every (arm, seed) run, ``jobs`` at a time in separate processes (1: in this process)."""
    costly = {"advmoe_research": 0, "advmoe_task": 1, "dense": 2, "moe_at": 3}  # longest first
    # seed by seed (a cut-short study still has complete pairs); within a seed the longest arm first when
    # many runs share the machine (shorter total), the cheapest first with 1-2 jobs (more runs finish early)
    order = (lambda a: costly.get(a, 4)) if jobs > 2 else (lambda a: -costly.get(a, 4))
    tasks = sorted(((a, s) for s in seeds for a in arms), key=lambda t: (seeds.index(t[1]), order(t[0])))
    if jobs <= 1:
        return [run_one(study, a, s, work_dir, fresh) for a, s in tasks]
    os.environ["PYTHONPATH"] = os.pathsep.join([str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")])
    records = []
    ctx = __import__("multiprocessing").get_context("spawn")
    with ProcessPoolExecutor(jobs, mp_context=ctx, initializer=torch.set_num_threads, initargs=(threads,)) as pool:
        futures = [pool.submit(run_one, study, a, s, work_dir, fresh) for a, s in tasks]
        for fut in as_completed(futures):
            records.append(fut.result())
    return records


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="study YAML (default: study.yaml)")
    parser.add_argument("--profile", default="cpu", help="profile of the study file: cpu, gpu or smoke")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="override the profile's seeds")
    parser.add_argument("--arms", nargs="+", default=None, help="subset of the study's arms")
    parser.add_argument("--jobs", type=int, default=None, help="concurrent runs (default: the profile's)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per run (default 1)")
    parser.add_argument("--out", type=Path, default=None, help=f"results folder (default {DEFAULT_OUT})")
    parser.add_argument("--work-dir", type=Path, default=None, help="run folders (default: runs/<out name>)")
    parser.add_argument("--fresh", action="store_true", help="retrain even where a matching result exists")
    parser.add_argument(
        "--collect-only",
        action="store_true",
        help="train nothing: summarise the finished runs in --work-dir (a study cut short reports what finished)",
    )
    args = parser.parse_args(argv)
    if args.threads < 1:
        parser.error("--threads must be >= 1")

    study = load_study(args.config, args.profile)
    arms = select_arms(study, args.arms)
    seeds = args.seeds if args.seeds is not None else study["seeds"]
    jobs = args.jobs if args.jobs is not None else study["jobs"]
    out = args.out or DEFAULT_OUT
    work_dir = args.work_dir or ROOT / "runs" / out.name
    out.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(args.threads)

    start, code = time.perf_counter(), commit()  # the code the runs start from
    if args.collect_only:
        records = collect(study, arms, seeds, work_dir)
        if not records:
            parser.error(f"--collect-only: no finished run of this configuration in {work_dir}")
    else:
        records = run_all(study, arms, seeds, work_dir, jobs, args.threads, args.fresh)
    total = time.perf_counter() - start
    if args.collect_only:  # the study's time is the runs' own
        total = sum(r.get("train_time_s", 0) + r.get("eval_time_s", 0) for r in records)
    summary = summarize(study, records, arms)
    results = {
        "study": study.get("name", "AdvMoE robustness study on mnist5k (issue 14)"),
        "profile": args.profile,
        "command": " ".join(
            ["python", *([sys.argv[0]] if argv is None else ["run_study.py"]), *(argv or sys.argv[1:])]
        ),
        "commit": code,
        "machine": machine(),
        "jobs": jobs,
        "threads_per_run": args.threads,
        "total_time_s": round(total, 1),
        "collected_only": args.collect_only,
        "missing_runs": [
            f"{a} seed {s}" for a in arms for s in seeds if not any(r["arm"] == a and r["seed"] == s for r in records)
        ],
        "seeds": seeds,
        "arms": arms,
        "headline_metric": headline_metric(study),
        "config": {k: study[k] for k in ("base", "arms", "eval", "comparisons", "statistics")},
        "summary": summary,
        "comparisons": comparisons(study, summary),
        "runs": sorted(
            ({k: v for k, v in r.items() if k != "fingerprint"} for r in records),
            key=lambda r: (arms.index(r["arm"]), r["seed"]),
        ),
        "diverged": [{"arm": r["arm"], "seed": r["seed"], "error": r["error"]} for r in records if r.get("diverged")],
    }
    (out / "results.json").write_text(json.dumps(results, indent=1))
    write_table(results, out / "table.md")
    write_expert_usage(results, out / "expert_usage.md")
    plot_ra_vs_flops(results, out / "ra_vs_flops.png")
    plot_routing_robustness(results, out / "routing_robustness.png")
    print(
        f"wrote {out}/results.json, table.md, expert_usage.md, ra_vs_flops.png, routing_robustness.png ({total:.0f} s)",
        flush=True,
    )
    return results


if __name__ == "__main__":
    main()
