"""Benchmark of the sparse MoE convolution op against the dense "slim" conv and the masked MoE.

For each layer shape and batch size it times, forward and forward+backward:

- ``slim``:      F.conv2d with only the active width (w output channels): the ideal the op should reach;
- ``masked``:    the research code's MoE: F.conv2d with all E*w channels, then zero the unselected ones;
- ``reference``: ``sparse_moe_conv2d(backend="reference")`` (pure PyTorch);
- every other backend present for the device (``cpu``; ``cuda``/``triton`` on a GPU).

Routing is random and balanced (top-k of E, each expert gets B*k/E slots). Forward runs under
``torch.no_grad`` without a gate (inference); forward+backward uses a gate that requires grad
(training with a straight-through gate). Results go to ``benchmarks/results/<device>/op_bench.{json,md}``.

    python benchmarks/bench_op.py                           # CPU, fp32, B in {1, 16, 64}, 2 threads
    python benchmarks/bench_op.py --device cuda --dtype bf16 --batch 256
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys
from dataclasses import asdict, dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from _timing import device_description, device_slug, time_interleaved  # noqa: E402

import moe_kernels  # noqa: E402
from moe_kernels import sparse_moe_conv2d  # noqa: E402

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


@dataclass(frozen=True)
class Shape:
    """One MoE conv layer: C_in input channels, expert width w, E experts, top-k, square input."""

    name: str
    c_in: int
    width: int
    size: int
    experts: int = 2
    top_k: int = 1
    kernel: int = 3


SHAPES = {
    "c64w64@32": Shape("c64w64@32", 64, 64, 32),  # the target shape (w = 64 active channels)
    "r18.l1": Shape("r18.l1", 64, 32, 32),  # ResNet-18 CIFAR layer shapes, r = 0.5, E = 2
    "r18.l2": Shape("r18.l2", 128, 64, 16),
    "r18.l3": Shape("r18.l3", 256, 128, 8),
    "r18.l4": Shape("r18.l4", 512, 256, 4),
}
QUICK_SHAPE = Shape("quick", 8, 4, 8, experts=3)


def _routing(batch: int, shape: Shape, device) -> torch.Tensor:
    """(B, k) balanced random routing: expert e gets B*k/E slots (up to rounding), k distinct per sample."""
    g = torch.Generator().manual_seed(batch)
    first = torch.randperm(batch, generator=g) % shape.experts
    idx = (first[:, None] + torch.arange(shape.top_k)[None, :]) % shape.experts
    return idx.to(device)


def _methods(shape: Shape, batch: int, mode: str, backends: list[str], device, dtype):
    """name -> zero-argument callable doing one forward (or forward+backward) of that method."""
    g = torch.Generator().manual_seed(0)
    train = mode == "fwd+bwd"
    rows = shape.experts * shape.width
    x = torch.randn(batch, shape.c_in, shape.size, shape.size, generator=g).to(device, dtype)
    weight = (torch.randn(rows, shape.c_in, shape.kernel, shape.kernel, generator=g) * 0.05).to(device, dtype)
    bias = torch.zeros(rows, device=device, dtype=dtype)
    expert_idx = _routing(batch, shape, device)
    gate = torch.ones(batch, shape.top_k, device=device, dtype=dtype) if train else None
    for t in (x, weight, bias) + ((gate,) if train else ()):
        t.requires_grad_(train)
    pad = shape.kernel // 2
    active = shape.top_k * shape.width
    slim_w, slim_b = weight[:active].detach().requires_grad_(train), bias[:active].detach().requires_grad_(train)
    mask = torch.zeros(batch, shape.experts, shape.width, device=device, dtype=dtype)
    mask.scatter_(1, expert_idx[:, :, None].expand(-1, -1, shape.width), 1.0)
    mask = mask.reshape(batch, rows, 1, 1)
    out_size = (batch, active, shape.size, shape.size)
    grad_out = torch.randn(out_size, generator=g).to(device, dtype) if train else None
    grad_full = torch.randn(batch, rows, shape.size, shape.size, generator=g).to(device, dtype) if train else None

    def run(fn, grad):
        def call():
            if not train:
                with torch.no_grad():
                    return fn()
            fn().backward(grad)

        return call

    methods = {
        "slim": run(lambda: F.conv2d(x, slim_w, slim_b, 1, pad), grad_out),
        "masked": run(lambda: F.conv2d(x, weight, bias, 1, pad) * mask, grad_full),
    }
    for name in backends:
        methods[name] = run(
            lambda name=name: sparse_moe_conv2d(x, weight, expert_idx, shape.experts, gate, bias, 1, pad, backend=name),
            grad_out,
        )
    return methods


def _backends(device) -> list[str]:
    present = moe_kernels.available_backends()
    names = ["reference", "cpu"] if device.type == "cpu" else ["reference", "triton", "cuda"]
    return [n for n in names if n in present]


def _load_average() -> float | None:
    """1-minute load average of the machine (other jobs skew CPU timings), or None where unknown."""
    try:
        return round(os.getloadavg()[0], 2)
    except OSError:
        return None


def run_benchmark(args) -> dict:
    """Runs every (shape, batch, mode) configuration; returns the JSON-able result document."""
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    shapes = [QUICK_SHAPE] if args.quick else [SHAPES[s] for s in args.shapes]
    batches = args.batch or ([2, 5] if args.quick else ([1, 16, 64] if device.type == "cpu" else [1, 16, 64, 256]))
    modes = args.modes
    backends = _backends(device)
    rows = []
    load_before = _load_average()
    configs = [(s, b, m) for s in shapes for b in batches for m in modes]
    for shape, batch, mode in tqdm(configs, desc="bench_op", disable=args.quiet):
        times = time_interleaved(
            _methods(shape, batch, mode, backends, device, dtype), device, reps=args.reps, warmup=args.warmup
        )
        for method, ms in times.items():
            rows.append({
                **asdict(shape), "shape": shape.name, "batch": batch, "mode": mode, "method": method, "ms": ms,
                "vs_slim": ms / times["slim"], "vs_masked": ms / times["masked"],
            })  # fmt: skip
    return {
        "benchmark": "sparse_moe_conv2d op",
        "device": device_description(device),
        "device_slug": device_slug(device),
        "dtype": args.dtype,
        "threads": torch.get_num_threads(),
        "reps": args.reps,
        "warmup": args.warmup,
        "backends": backends,
        "load_average": [load_before, _load_average()],
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "notes": "median ms of interleaved runs; vs_slim = time / slim conv time; fwd without gate under no_grad, "
        "fwd+bwd with a gate requiring grad; routing random and balanced",
        "rows": rows,
    }


def markdown_table(doc: dict) -> str:
    """One line per (shape, batch, mode): every method's ms and its ratio to the slim conv."""
    methods = ["slim", "masked", *doc["backends"]]
    head = "| shape (C_in, w, E, HxW) | B | pass | " + " | ".join(methods) + " |"
    lines = [
        f"Device: {doc['device']}; dtype {doc['dtype']}; median of {doc['reps']} interleaved runs; "
        f"1-min load average before/after: {doc['load_average']}. Cells: ms (ratio to slim).",
        "",
        head,
        "|" + "---|" * (3 + len(methods)),
    ]
    groups: dict[tuple, dict[str, dict]] = {}
    for r in doc["rows"]:
        groups.setdefault((r["shape"], r["batch"], r["mode"]), {})[r["method"]] = r
    for (name, batch, mode), by_method in groups.items():
        r0 = by_method["slim"]
        label = f"{name} ({r0['c_in']}, {r0['width']}, {r0['experts']}, {r0['size']}x{r0['size']})"
        cells = [f"{by_method[m]['ms']:.3f} ({by_method[m]['vs_slim']:.2f}x)" for m in methods if m in by_method]
        lines.append(f"| {label} | {batch} | {mode} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    p.add_argument("--dtype", default="fp32", choices=list(DTYPES))
    p.add_argument("--batch", type=int, nargs="+", help="batch sizes (default: 1 16 64 on CPU, + 256 on GPU)")
    p.add_argument("--shapes", nargs="+", default=list(SHAPES), choices=list(SHAPES))
    p.add_argument("--modes", nargs="+", default=["fwd", "fwd+bwd"], choices=["fwd", "fwd+bwd"])
    p.add_argument("--threads", type=int, default=2, help="CPU intra-op threads (default 2; 0 = torch default)")
    p.add_argument("--reps", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="tiny shapes, few reps (for CI)")
    p.add_argument("--out-dir", help="default: benchmarks/results/<device-slug>")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    if args.quick:
        args.reps, args.warmup = min(args.reps, 3), 1
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("bench_op: --device cuda but no CUDA GPU is available")
    if args.device == "cpu" and args.threads > 0:
        torch.set_num_threads(args.threads)
    doc = run_benchmark(args)
    out_dir = args.out_dir or os.path.join(os.path.dirname(os.path.abspath(__file__)), "results", doc["device_slug"])
    os.makedirs(out_dir, exist_ok=True)
    table = markdown_table(doc)
    suffix = "" if args.dtype == "fp32" else f"_{args.dtype}"
    with open(os.path.join(out_dir, f"op_bench{suffix}.json"), "w") as f:
        json.dump(doc, f, indent=1)
    with open(os.path.join(out_dir, f"op_bench{suffix}.md"), "w") as f:
        f.write(f"# sparse_moe_conv2d op benchmark ({doc['device_slug']}, {args.dtype})\n\n" + table)
    print(table)
    return doc


if __name__ == "__main__":
    main()
