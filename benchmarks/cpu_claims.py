"""One command for the CPU claims: deployed MoE ResNet-18 vs the BatchNorm-folded dense model, B=64 and B=1.

For each router kind (research = one model-level router, per_layer = a router per MoE layer) and each
layout (contiguous = NCHW, channels_last = NHWC; every model and input in that layout), runs ``advmoe bench``
in 3 SEPARATE processes (2 threads, variants dense / deployed / ideal / router), then writes

- ``benchmarks/results/<cpu-device>/claims.json``: {"commit", "device", "claims": [{"id", "value", "target",
  "source"}]}, value = the MEDIAN over the processes of each process's median ratio deployed/dense, plus its
  min and max; ids ``model.resnet18_cifar.cpu.b<B>.deployed_vs_dense.<router>`` for contiguous and
  ``...<router>.channels_last`` for channels_last;
- ``benchmarks/results/<cpu-device>/models_bench_<router>[_channels_last]_run<i>.json``: every process's full
  results.

Routers of the untrained models are calibrated to a balanced split on the benchmark's probe images
(``balance_router`` / ``balance_per_layer_routers``: each router's bias is set so its input splits 50/50);
the split measured on the timed inputs is in the run files.

Usage (repo root)::

    python benchmarks/cpu_claims.py                 # ~10-20 min on a quiet 2-core machine
    python benchmarks/cpu_claims.py --runs 3 --budget 10 --device-name cpu-2core --layouts contiguous
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

TARGETS = {64: 0.40, 1: 0.50}


def _key(router: str, layout: str) -> str:
    """The run files' name part: the router kind, with "_channels_last" for that layout."""
    return router if layout == "contiguous" else f"{router}_channels_last"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--runs", type=int, default=3, help="separate processes per router kind (default 3)")
    p.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    p.add_argument("--budget", type=float, default=20.0, help="seconds per (model, batch) in each process")
    p.add_argument("--device-name", default=None, help="results folder name (default: the bench's device slug)")
    p.add_argument("--routers", nargs="+", default=["research", "per_layer"], choices=["research", "per_layer"])
    p.add_argument(
        "--layouts",
        nargs="+",
        default=["contiguous", "channels_last"],
        choices=["contiguous", "channels_last"],
        help="memory formats to measure, every side in the same one (default both)",
    )
    p.add_argument(
        "--aggregate-only", action="store_true", help="run nothing: rebuild claims.json from the stored run files"
    )
    args = p.parse_args(argv)
    root = Path(__file__).resolve().parent.parent
    runs: dict[str, list[dict]] = {}
    kinds = {_key(router, layout): (router, layout) for router in args.routers for layout in args.layouts}
    if args.aggregate_only:
        folder = root / "benchmarks" / "results" / (args.device_name or "")
        for key in kinds:
            files = sorted(folder.glob(f"models_bench_{key}_run*.json"))
            if files:
                runs[key] = [json.loads(f.read_text()) for f in files]
        if not runs:
            p.error(f"no models_bench_<router>_run*.json in {folder} (pass --device-name)")
    for key, (router, layout) in [] if args.aggregate_only else kinds.items():
        for i in range(args.runs):
            with tempfile.TemporaryDirectory() as tmp:
                cmd = [
                    sys.executable,
                    "-m",
                    "advmoe",
                    "bench",
                    "--models",
                    "resnet18_cifar",
                    "--batch",
                    "1",
                    "64",
                    "--threads",
                    str(args.threads),
                    "--router",
                    router,
                    "--budget",
                    str(args.budget),
                    "--variants",
                    "dense",
                    "deployed",
                    "ideal",
                    "router",
                    "--layout",
                    layout,
                    "--out",
                    tmp,
                    "--no-plot",
                ]
                print(f"[{key} run {i + 1}/{args.runs}] {' '.join(cmd[1:])}", flush=True)
                subprocess.run(cmd, cwd=root, check=True, stdout=subprocess.DEVNULL)
                runs.setdefault(key, []).append(json.loads((Path(tmp) / "models_bench.json").read_text()))
    first = next(iter(runs.values()))[0]
    commits = {r["provenance"]["commit"] for rs in runs.values() for r in rs}
    device = args.device_name or first["device_slug"]
    out = root / "benchmarks" / "results" / device
    out.mkdir(parents=True, exist_ok=True)
    claims = []
    for key, results in runs.items():
        router, layout = results[0]["settings"]["router"], results[0]["settings"].get("layout", "contiguous")
        for i, r in enumerate(results):
            if not args.aggregate_only:
                (out / f"models_bench_{key}_run{i}.json").write_text(json.dumps(r, indent=1) + "\n")
        for batch, target in TARGETS.items():
            ratios = [
                row["vs_dense"]
                for r in results
                for row in r["models"][0]["latency"]
                if row["variant"] == "deployed" and row["batch"] == batch
            ]
            modes = sorted({r["models"][0]["deploy_mode"] for r in results})
            claims.append(
                {
                    "id": f"model.resnet18_cifar.cpu.b{batch}.deployed_vs_dense.{router}"
                    + (".channels_last" if layout == "channels_last" else ""),
                    "layout": layout,
                    "value": statistics.median(ratios),
                    "target": target,
                    "min": min(ratios),
                    "max": max(ratios),
                    "runs": len(ratios),
                    "met": statistics.median(ratios) <= target,
                    "source": f"benchmarks/results/{device}/models_bench_{key}_run*.json (deployed modes {modes}; "
                    f"{args.threads} threads; median of per-process medians over {len(ratios)} processes)",
                }
            )
    doc = {
        "commit": first["provenance"]["commit"] if len(commits) == 1 else sorted(commits),
        "dirty": any(r["provenance"]["dirty"] for rs in runs.values() for r in rs),
        "device": first["device"],
        "command": "python benchmarks/cpu_claims.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "claims": claims,
    }
    (out / "claims.json").write_text(json.dumps(doc, indent=1) + "\n")
    for c in claims:
        print(f"{c['id']}: {c['value']:.3f} (min {c['min']:.3f}, max {c['max']:.3f}; target <= {c['target']})")
    print(f"-> {out / 'claims.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
