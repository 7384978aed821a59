"""Tunes the NHWC Triton kernels once on a GPU and writes ``moe_kernels/_triton/tuned/<gpu>.json``.

One run (meant for a short lent-GPU session; UNMEASURED until a session runs it):

1. prune: every candidate of ``tuning.candidate_configs`` per (kind, dtype, shape) is compiled for
   this GPU's architecture on the CPU cores in parallel (``compile_check``: no register spills,
   shared memory within the limit, tensor-core instructions in the PTX); rejects are never timed;
2. time: each surviving configuration is timed on the GPU with ``triton.testing.do_bench`` (forward;
   input+gate gradient; weight+bias gradient), the fastest per (kind, dtype, shape class) is kept;
3. auto: the Triton backend (with the kept configurations) and the cuDNN path (the ``cuda`` backend if
   built, else the reference's per-expert ``F.conv2d``) are timed forward+backward through
   ``sparse_moe_conv2d``; the faster one is recorded for ``backend="auto"`` (``tuning.choose_backend``);
4. the table (configs, auto choices, every timing, rejects with reasons) is written as JSON.

Usage (repository root, on the GPU machine)::

    python -m moe_kernels._triton.tune [--dtypes bf16,fp32] [--batch 256] [--out moe_kernels/_triton/tuned]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict
from pathlib import Path

# name -> (C_in, expert width, image side), E = 2, k = 1, 3x3: the five benchmark shapes (c64w64@32 and the
# ResNet-18 CIFAR layers at r = 0.5), also those of benchmarks/bench_op.py and bench_slim.
TUNE_SHAPES = {
    "c64w64@32": (64, 64, 32),
    "r18.l1": (64, 32, 32),
    "r18.l2": (128, 64, 16),
    "r18.l3": (256, 128, 8),
    "r18.l4": (512, 256, 4),
}
KERNEL, STRIDE, EXPERTS = (3, 3), (1, 1), 2


def _prune_one(job: tuple) -> tuple:
    """Worker: compile one candidate (all three kinds forced to it) and return the problems per kind."""
    arch, dtype_name, c_in, width, kind, cfg_dict = job
    os.environ.pop("TRITON_INTERPRET", None)
    from moe_kernels._triton import compile_check
    from moe_kernels._triton.tuning import KernelConfig

    cfg = KernelConfig(**cfg_dict)
    launches = compile_check.record_launches(dtype_name, (c_in, width, KERNEL, STRIDE), {kind: cfg}, batch=8, size=8)
    name = {
        "fwd": "moe_conv_fwd_nhwc_kernel",
        "dgrad": "moe_conv_dgrad_nhwc_kernel",
        "wgrad": "moe_conv_wgrad_partial_kernel",
    }[kind]
    launches = [launch for launch in launches if launch.name == name]
    try:
        reports = compile_check.inspect_launches(launches, arch, dtype_name, f"c{c_in}w{width}")
    except Exception as err:  # a candidate that does not compile is a reject, not a failure
        return job, [f"compile error: {type(err).__name__}: {str(err)[:200]}"]
    return job, [p for r in reports for p in r.problems(arch)]


def prune(arch: int, dtypes, shapes, workers: int) -> tuple[dict, list]:
    """Compiles every candidate in parallel; returns ({(kind, dtype, c_in, width): [configs]}, rejects)."""
    import torch

    from moe_kernels._triton import tuning

    jobs = []
    for dtype_name in dtypes:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
        for c_in, width, _ in shapes:
            for kind in tuning.KINDS:
                for cfg in tuning.candidate_configs(kind, dtype, c_in if kind == "dgrad" else width):
                    jobs.append((arch, dtype_name, c_in, width, kind, asdict(cfg)))
    kept, rejects = {}, []
    # spawn, not fork: the parent has initialised CUDA (workers only compile, on meta tensors)
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        for job, problems in pool.map(_prune_one, jobs):
            arch_, dtype_name, c_in, width, kind, cfg = job
            if problems:
                rejects.append(
                    {
                        "kind": kind,
                        "dtype": dtype_name,
                        "c_in": c_in,
                        "width": width,
                        "config": cfg,
                        "problems": problems,
                    }
                )
            else:
                kept.setdefault((kind, dtype_name, c_in, width), []).append(tuning.KernelConfig(**cfg))
    return kept, rejects


def _inputs(c_in, width, size, batch, dtype, device):
    import torch

    g = torch.Generator(device="cpu").manual_seed(0)
    x = (
        torch.randn(batch, c_in, size, size, generator=g)
        .to(device, dtype)
        .contiguous(memory_format=torch.channels_last)
    )
    weight = (torch.randn(EXPERTS * width, c_in, *KERNEL, generator=g) * 0.05).to(device, dtype)
    idx = (torch.randperm(batch, generator=g) % EXPERTS).reshape(batch, 1).to(device)
    gate = torch.ones(batch, 1, device=device, dtype=dtype)
    bias = torch.zeros(EXPERTS * width, device=device, dtype=dtype)
    return x, weight, idx, gate, bias


def time_kind(kind, cfg, args, grad_out) -> float:
    """Median microseconds of one kernel kind with ``cfg`` forced (do_bench: L2 flushed, CUDA events)."""
    import triton.testing

    from moe_kernels._triton import launcher, tuning
    from moe_kernels.call import ConvCall

    x, weight, idx, gate, bias = args
    call = ConvCall(x, weight, idx, EXPERTS, gate, bias, STRIDE, (1, 1), (1, 1))
    with tuning.forced_configs({kind: cfg}):
        if kind == "fwd":
            fn = lambda: launcher.conv_forward(call)  # noqa: E731
        elif kind == "dgrad":
            fn = lambda: launcher.conv_backward(grad_out, call, (True, False, False, True))  # noqa: E731
        else:
            fn = lambda: launcher.conv_backward(grad_out, call, (False, True, True, False))  # noqa: E731
        return 1000.0 * triton.testing.do_bench(fn, warmup=10, rep=40)


def time_op(backend: str, args) -> float:
    """Median microseconds of forward+backward through ``sparse_moe_conv2d`` on ``backend``."""
    import triton.testing

    from moe_kernels import sparse_moe_conv2d

    x, weight, idx, gate, bias = (t.detach().requires_grad_(t.is_floating_point()) for t in args)

    def step():
        out = sparse_moe_conv2d(x, weight, idx, EXPERTS, gate, bias, 1, 1, backend=backend)
        out.backward(out)

    return 1000.0 * triton.testing.do_bench(step, warmup=5, rep=40)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dtypes", default="bf16,fp32")
    parser.add_argument("--shapes", default=",".join(TUNE_SHAPES))
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--out", default=str(Path(__file__).parent / "tuned"))
    parser.add_argument("--workers", type=int, default=max(1, (os.cpu_count() or 2) - 1))
    parser.add_argument("--budget-s", type=float, default=420.0, help="stop timing new shapes after this")
    args = parser.parse_args(argv)
    import torch
    import triton

    from moe_kernels import available_backends
    from moe_kernels._triton import tuning

    if not torch.cuda.is_available():
        print("tune: needs a CUDA GPU", file=sys.stderr)
        return 2
    t0 = time.perf_counter()
    device = torch.device("cuda")
    name = torch.cuda.get_device_name(device)
    major, minor = torch.cuda.get_device_capability(device)
    arch = 10 * major + minor
    dtypes = [d for d in args.dtypes.split(",") if d]
    shapes = [TUNE_SHAPES[s] for s in args.shapes.split(",") if s]
    print(f"tune: {name} (sm_{arch}), triton {triton.__version__}, dtypes {dtypes}, B={args.batch}", flush=True)
    kept, rejects = prune(arch, dtypes, shapes, args.workers)
    print(f"tune: prune done in {time.perf_counter() - t0:.0f} s, {len(rejects)} rejects", flush=True)
    torch.backends.cudnn.benchmark = True
    present = available_backends()
    cudnn_name = next((b for b in ("cuda", "slices", "reference") if b in present), "reference")
    table = {
        "gpu": name,
        "arch": arch,
        "triton": triton.__version__,
        "torch": torch.__version__,
        "batch": args.batch,
        "configs": {},
        "auto": {},
        "timings": [],
        "rejects": rejects,
    }
    for dtype_name in dtypes:
        dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[dtype_name]
        for c_in, width, size in shapes:
            if time.perf_counter() - t0 > args.budget_s:
                print(f"tune: budget spent, skipping c{c_in}w{width} {dtype_name}", flush=True)
                continue
            cls = tuning.shape_class(c_in, width, KERNEL, STRIDE)
            inputs = _inputs(c_in, width, size, args.batch, dtype, device)
            grad_out = torch.randn(args.batch, width, size, size, device=device, dtype=dtype)
            for kind in tuning.KINDS:
                timed = []
                for cfg in kept.get((kind, dtype_name, c_in, width), []):
                    us = time_kind(kind, cfg, inputs, grad_out)
                    timed.append((us, cfg))
                    row = {
                        "kind": kind,
                        "dtype": dtype_name,
                        "class": cls,
                        "c_in": c_in,
                        "width": width,
                        "size": size,
                        "config": asdict(cfg),
                        "us": us,
                    }
                    table["timings"].append(row)
                if timed:
                    us, best = min(timed, key=lambda item: item[0])
                    table["configs"][f"{kind}|{dtype_name}|{cls}"] = tuning.config_dict(best)
                    print(f"  {kind:5s} {dtype_name} {cls}: best {best.key()} {us:.1f} us of {len(timed)}", flush=True)
            with tuning.forced_configs(
                {
                    k: tuning.KernelConfig(**v)
                    for k, v in ((kind, table["configs"].get(f"{kind}|{dtype_name}|{cls}")) for kind in tuning.KINDS)
                    if v
                }
            ):
                triton_us = time_op("triton", inputs)
            cudnn_us = time_op(cudnn_name, inputs)
            choice = "triton" if triton_us < cudnn_us else "cudnn"
            table["auto"][f"{dtype_name}|{cls}"] = {
                "backend": choice,
                "triton_us": triton_us,
                "cudnn_us": cudnn_us,
                "cudnn_backend": cudnn_name,
            }
            print(
                f"  auto {dtype_name} {cls}: triton {triton_us:.1f} us, {cudnn_name} {cudnn_us:.1f} us -> {choice}",
                flush=True,
            )
    out = Path(args.out) / f"{tuning.gpu_slug(name)}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(table, indent=1) + "\n")
    print(f"tune: wrote {out} in {time.perf_counter() - t0:.0f} s", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
