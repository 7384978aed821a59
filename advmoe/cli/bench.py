"""``advmoe bench``: FLOPs and latency of dense, masked (research), sparse, deployed and ideal slim models."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from advmoe.cli.options import command_line

__all__ = ["DESCRIPTION", "HELP", "add_arguments", "run"]


HELP = "FLOPs and latency: dense vs masked (research) vs sparse vs deployed vs ideal slim"
DESCRIPTION = "Model benchmark; writes models_bench.{json,md,png} to benchmarks/results/<device>/ (or --out)."


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The ``advmoe bench`` options."""
    p.add_argument("--models", nargs="+", help="zoo names (default: the six README models)")
    p.add_argument("--batch", nargs="+", type=int, help="batch sizes (default 1 16 64, +256 on GPU)")
    p.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    p.add_argument("--dtype", default="fp32", help="fp32, bf16 or fp16 (default fp32)")
    p.add_argument("--ratio", type=float, default=0.5, help="MoE width ratio r (default 0.5)")
    p.add_argument("--num-experts", type=int, default=2, help="E (default 2)")
    p.add_argument("--repeats", type=int, help="timed rounds (default: fit --budget, 3..20)")
    p.add_argument("--warmup", type=int, default=2, help="warm-up rounds (default 2)")
    p.add_argument("--budget", type=float, default=20.0, help="seconds per (model, batch) when --repeats is unset")
    p.add_argument("--backends", nargs="+", help="op backends for the sparse[...] rows (default: all present)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's)")
    p.add_argument("--quick", action="store_true", help="tiny CI mode (resnet10_mini, B=1,4, 2 repeats)")
    p.add_argument(
        "--clock",
        default="wall",
        choices=("wall", "thread"),
        help="wall: latency (default); thread: CPU time of one thread (1 thread), for machines shared with other jobs",
    )
    p.add_argument(
        "--router",
        default="research",
        choices=("research", "per_layer"),
        help="MoE routers: one model-level research router (default) or per-layer routers",
    )
    p.add_argument("--variants", nargs="+", help="variants to run (default all; e.g. dense deployed ideal router)")
    p.add_argument(
        "--execution",
        default="eager",
        choices=("eager", "graph", "compile"),
        help="every variant eager (default), CUDA-graph captured (GPU), torch.compile reduce-overhead",
    )
    p.add_argument(
        "--layout",
        choices=("contiguous", "channels_last"),
        help="memory format of every variant and input (default: channels_last on GPU, contiguous on CPU)",
    )
    p.add_argument("--out", help="output folder (default benchmarks/results/<device-slug>)")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG")


def run(args: argparse.Namespace) -> int:
    """Runs ``advmoe bench`` with the parsed arguments; returns the exit status."""
    import torch

    from advmoe.bench.models import run_benchmark
    from advmoe.bench.report import markdown_table, write_results

    if args.threads:
        torch.set_num_threads(args.threads)
    results = run_benchmark(
        models=args.models,
        batches=args.batch,
        device=args.device,
        dtype=args.dtype,
        ratio=args.ratio,
        num_experts=args.num_experts,
        warmup=args.warmup,
        repeats=args.repeats,
        budget_s=args.budget,
        backends=args.backends,
        quick=args.quick,
        clock=args.clock,
        router=args.router,
        variants=args.variants,
        execution=args.execution,
        layout=args.layout,
        command=command_line("bench", args),
    )
    out = args.out or str(Path("benchmarks") / "results" / results["device_slug"])
    paths = write_results(results, out, plot=not args.no_plot)
    print(markdown_table(results))
    print(json.dumps({k: str(v) for k, v in paths.items()}))
    return 0
