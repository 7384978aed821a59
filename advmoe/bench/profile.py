"""Where the time of one small-batch deployed forward goes (CPU): operators, modules, Python overhead.

``profile_forward`` runs a model a few times under ``torch.profiler`` (operator self-time table) and
``cProfile`` (Python functions), and splits one call's time into: convolutions, other aten ops, and the rest
(Python: module calls, argument checks, dispatch). ``python -m advmoe.bench.profile`` prints it for the
deployed MoE ResNet-18 (CIFAR, r=0.5, E=2, top-1) with either router kind; docs/deployment.md quotes it.
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import time

import torch
from torch import nn


@torch.inference_mode()
def profile_forward(model: nn.Module, x: torch.Tensor, calls: int = 30, rows: int = 12) -> dict:
    """Profiles ``calls`` forwards of ``model(x)`` after warm-up.

    Args:
        model: an eval-mode model.
        x: (B, C, H, W) input.
        calls: profiled calls.
        rows: rows of the operator and Python tables.

    Returns:
        {"ms_per_call" (thread CPU time, no profiler), "conv_ms", "other_aten_ms", "python_ms" (the call's time
        split by the profilers' shares: cProfile's share outside C functions is "python", the rest is split by
        torch.profiler's self-time share of convolution ops), "ops" (table text), "python" (cProfile text)}.
        The profilers run on wall time and inflate under load; only their shares are used.
    """
    from torch.profiler import ProfilerActivity, profile

    for _ in range(3):
        model(x)
    begin = time.thread_time()
    for _ in range(calls):
        model(x)
    per_call = (time.thread_time() - begin) / calls * 1e3
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        for _ in range(calls):
            model(x)
    events = prof.key_averages()
    conv_keys = ("conv", "mkldnn_convolution")
    total_us = sum(e.self_cpu_time_total for e in events) or 1.0
    conv_share = sum(e.self_cpu_time_total for e in events if any(k in e.key for k in conv_keys)) / total_us
    stream = io.StringIO()
    profiler = cProfile.Profile()
    profiler.enable()
    for _ in range(calls):
        model(x)
    profiler.disable()
    stats = pstats.Stats(profiler, stream=stream)
    builtin = sum(v[2] for k, v in stats.stats.items() if k[0] == "~")  # C functions: torch ops and builtins
    python_share = 1.0 - builtin / max(stats.total_tt, 1e-12)
    stats.sort_stats("tottime").print_stats(rows)
    in_ops = per_call * (1.0 - python_share)
    return {
        "ms_per_call": per_call,
        "conv_ms": in_ops * conv_share,
        "other_aten_ms": in_ops * (1.0 - conv_share),
        "python_ms": per_call * python_share,
        "ops": events.table(sort_by="self_cpu_time_total", row_limit=rows),
        "python": stream.getvalue(),
    }


@torch.inference_mode()
def count_kernels(model: nn.Module, x: torch.Tensor) -> dict[str, int]:
    """GPU kernels launched and host<->device synchronisations in ONE forward (after two warm-up calls).

    Args:
        model: a CUDA model (eager, or a ``CapturedModel``: then the graph replay is one launch).
        x: its CUDA input.

    Returns:
        {"kernels": device kernel launches, "syncs": cudaStreamSynchronize / cudaDeviceSynchronize /
        cudaMemcpy(Async) device-to-host calls seen by the profiler, "graph_launches": cudaGraphLaunch calls}.
    """
    from torch.profiler import ProfilerActivity, profile

    for _ in range(2):
        model(x)
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model(x)
        torch.cuda.synchronize()
    kernels = syncs = graphs = 0
    for e in prof.events():
        name = e.name
        if (
            e.device_type == torch.autograd.DeviceType.CUDA
            and "memcpy" not in name.lower()
            and "memset" not in name.lower()
        ):
            kernels += 1
        elif name in ("cudaStreamSynchronize", "cudaDeviceSynchronize") or name.startswith("cudaMemcpy"):
            syncs += 1
        elif name.startswith("cudaGraphLaunch"):
            graphs += 1
    return {"kernels": kernels, "syncs": max(syncs - 1, 0), "graph_launches": graphs}  # minus our own final sync


def main(argv: list[str] | None = None) -> int:
    """Prints the B=1 profile of the deployed ResNet-18 and its parts (router, dense model for reference)."""
    from advmoe.bench.models import build_variants

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--router", default="research", choices=("research", "per_layer"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--threads", type=int, default=1, help="torch threads (default 1: thread CPU time is exact)")
    p.add_argument("--calls", type=int, default=30)
    p.add_argument("--full", action="store_true", help="also print the operator and cProfile tables")
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    names = ["dense", "deployed", "router"] if args.router == "research" else ["dense", "deployed"]
    variants, _ = build_variants(
        "resnet18_cifar", 0.5, 2, torch.device("cpu"), torch.float32, ["cpu"], router=args.router, variants=names
    )
    x = torch.rand(args.batch, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    print(
        f"resnet18_cifar r=0.5 E=2 top-1, {args.router} router, B={args.batch}, {args.threads} thread(s), "
        f"torch {torch.__version__}; thread CPU time per call"
    )
    print("| part | ms/call | convolutions | other aten ops | Python + dispatch |")
    print("|---|---|---|---|---|")
    reports = {}
    for name, model in variants.items():
        r = profile_forward(model, x, args.calls)
        reports[name] = r
        label = f"{name} ({model.deploy_mode})" if hasattr(model, "deploy_mode") else name
        print(
            f"| {label} | {r['ms_per_call']:.2f} | {r['conv_ms']:.2f} | {r['other_aten_ms']:.2f} | "
            f"{r['python_ms']:.2f} |"
        )
    if args.full:
        print(reports["deployed"]["ops"])
        print(reports["deployed"]["python"])
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
