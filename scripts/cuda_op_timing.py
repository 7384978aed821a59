"""Quick GPU timing of the ``cuda`` backend against cuDNN's slim conv (the ideal) and the masked conv.

Run on a GPU machine after building the CUDA extension (scripts/gpu_check_cuda.sh does both):

    python scripts/cuda_op_timing.py --batch 256 --out timing.json

For each ResNet-18-like layer (E = 2 experts, top-1, balanced random routing) and dtype it reports the
median time of: ``sparse`` (backend="cuda"), ``reference`` (backend="reference"), ``slim`` (one cuDNN conv
with only the active width w: the cost the sparse op should approach), ``masked`` (all E*w channels then
a mask, as the research code does), forward and forward+backward. Ratios are against ``slim``.
fp32 runs with torch's default TF32 setting for cuDNN convolutions (allow_tf32=True), on every variant.
The sparse and reference timings include the op's host syncs (index check, per-expert group sizes).
"""

from __future__ import annotations

import argparse
import json
import statistics

import torch
import torch.nn.functional as F

from moe_kernels import sparse_moe_conv2d

# (name, C_in, expert width w, H = W, stride)
LAYERS = [
    ("l1_64x32x32", 64, 64, 32, 1),
    ("l2_128x16x16", 128, 128, 16, 1),
    ("l3_256x8x8", 256, 256, 8, 1),
    ("l2_down_s2", 64, 128, 32, 2),
]
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def median_ms(fn, warmup: int, repeat: int) -> float:
    """Median wall time of ``fn()`` on the current stream in milliseconds (CUDA events)."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeat):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times)


def bench_layer(c_in, width, size, stride, batch, dtype, experts, warmup, repeat):
    """Times of every variant for one layer shape and dtype: {variant: {"fwd": ms, "fwd_bwd": ms}}."""
    dev = "cuda"
    x = torch.randn(batch, c_in, size, size, device=dev, dtype=dtype, requires_grad=True)
    weight = (torch.randn(experts * width, c_in, 3, 3, device=dev, dtype=dtype) / (9 * c_in) ** 0.5).requires_grad_()
    bias = torch.zeros(experts * width, device=dev, dtype=dtype, requires_grad=True)
    expert_idx = torch.randint(0, experts, (batch, 1), device=dev)
    gate = torch.ones(batch, 1, device=dev, dtype=dtype, requires_grad=True)
    mask = torch.zeros(batch, experts * width, 1, 1, device=dev, dtype=dtype)
    mask.scatter_(1, (expert_idx * width + torch.arange(width, device=dev))[:, :, None, None], 1.0)
    slim_w = weight[:width].detach().clone().requires_grad_()
    slim_b = bias[:width].detach().clone().requires_grad_()
    variants = {
        "sparse": lambda: sparse_moe_conv2d(x, weight, expert_idx, experts, gate, bias, stride, 1, backend="cuda"),
        "reference": lambda: sparse_moe_conv2d(
            x, weight, expert_idx, experts, gate, bias, stride, 1, backend="reference"
        ),
        "slim": lambda: F.conv2d(x, slim_w, slim_b, stride, 1),
        "masked": lambda: F.conv2d(x, weight, bias, stride, 1) * mask,
    }
    result = {}
    for name, fn in variants.items():
        with torch.no_grad():
            fwd = median_ms(fn, warmup, repeat)
        grad = torch.randn_like(fn())

        def fwd_bwd(fn=fn, grad=grad):
            fn().backward(grad)

        result[name] = {"fwd": fwd, "fwd_bwd": median_ms(fwd_bwd, warmup, repeat)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--experts", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=50)
    parser.add_argument("--dtypes", default="bf16,fp16,fp32")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        raise SystemExit("cuda_op_timing.py needs a CUDA GPU")
    # cudnn.benchmark stays off: the per-expert group sizes change with every routing, and benchmark mode
    # would re-tune cuDNN for each new size.
    device = torch.cuda.get_device_name()
    rows = []
    print(f"device: {device}; torch {torch.__version__}; B={args.batch}, E={args.experts}, top-1, 3x3 conv, NCHW")
    print("| layer | dtype | sparse fwd ms | slim fwd ms | sparse/slim fwd | masked/slim fwd | reference/slim fwd "
          "| sparse/slim fwd+bwd | masked/slim fwd+bwd |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for dname in args.dtypes.split(","):
        for name, c_in, width, size, stride in LAYERS:
            t = bench_layer(c_in, width, size, stride, args.batch, DTYPES[dname], args.experts, args.warmup,
                            args.repeat)  # fmt: skip
            slim, slim_b = t["slim"]["fwd"], t["slim"]["fwd_bwd"]
            rows.append({"layer": name, "dtype": dname, "times_ms": t})
            print(f"| {name} | {dname} | {t['sparse']['fwd']:.3f} | {slim:.3f} | {t['sparse']['fwd'] / slim:.2f} "
                  f"| {t['masked']['fwd'] / slim:.2f} | {t['reference']['fwd'] / slim:.2f} "
                  f"| {t['sparse']['fwd_bwd'] / slim_b:.2f} | {t['masked']['fwd_bwd'] / slim_b:.2f} |")  # fmt: skip
    if args.out:
        meta = {"device": device, "torch": torch.__version__, "batch": args.batch, "experts": args.experts}
        with open(args.out, "w") as f:
            json.dump({"meta": meta, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
