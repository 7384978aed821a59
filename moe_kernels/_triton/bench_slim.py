"""Device time of the Triton op against the slim dense cuDNN conv (GPU only; UNMEASURED so far).

For each shape of ``tune.TUNE_SHAPES`` (E = 2, k = 1, 3x3, padding 1) and dtype, at batch B, channels_last:

* ``slim_fwd``: ``F.conv2d`` with the active width w (the ideal the op should approach);
* ``triton_fwd``: the Triton forward (bias and gate fused);
* ``slim_fwdbwd`` / ``triton_fwdbwd``: forward + backward (all gradients);
* ``slim_bn_relu``: slim conv, then eval BatchNorm, then ReLU as separate ops; ``triton_fused``: the
  Triton forward with the BN folded into weight/bias and the ReLU fused (``forward_fused``).

Device time per call from replaying a CUDA graph of ``--calls`` calls (median of ``--reps`` replays);
``cudnn.benchmark`` on. Writes JSON and a markdown table. Usage:
``python -m moe_kernels._triton.bench_slim --out DIR [--batch 256] [--dtypes bf16,fp32]``.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def graph_us(fn, calls: int = 20, reps: int = 10) -> float:
    """Median device microseconds per call of ``fn`` from CUDA-graph replays of ``calls`` calls."""
    from moe_kernels.graph_timing import cuda_graph_ms

    return 1000.0 * cuda_graph_ms(fn, calls, reps)


def bench_shape(c_in: int, width: int, size: int, batch: int, dtype) -> dict:
    import torch
    import torch.nn.functional as F

    from moe_kernels._triton import launcher
    from moe_kernels.backends import triton as triton_conv
    from moe_kernels.call import ConvCall

    dev = torch.device("cuda")
    g = torch.Generator().manual_seed(0)
    cl = torch.channels_last
    x = torch.randn(batch, c_in, size, size, generator=g).to(dev, dtype).contiguous(memory_format=cl)
    weight = (torch.randn(2 * width, c_in, 3, 3, generator=g) * 0.05).to(dev, dtype)
    bias = torch.zeros(2 * width, device=dev, dtype=dtype)
    idx = (torch.arange(batch) % 2).reshape(batch, 1).to(dev)
    gate = torch.ones(batch, 1, device=dev, dtype=dtype)
    slim_w = weight[:width].contiguous()
    grad = torch.randn(batch, width, size, size, generator=g).to(dev, dtype).contiguous(memory_format=cl)
    call = ConvCall(x, weight, idx, 2, gate, bias, (1, 1), (1, 1), (1, 1))
    bn = torch.nn.BatchNorm2d(width).to(dev).eval()  # fp32 parameters, as under autocast
    out = {
        "slim_fwd": graph_us(lambda: F.conv2d(x, slim_w, None, 1, 1)),
        "triton_fwd": graph_us(lambda: triton_conv.forward(call)),
        "slim_fwdbwd": graph_us(
            lambda: torch.ops.aten.convolution_backward(
                grad, x, slim_w, [width], (1, 1), (1, 1), (1, 1), False, [0, 0], 1, [True, True, True]
            )
        ),
        "triton_fwdbwd": graph_us(
            lambda: (triton_conv.forward(call), launcher.conv_backward(grad, call, (True, True, True, True)))
        ),
        "slim_bn_relu": graph_us(lambda: torch.relu(bn(F.conv2d(x, slim_w, None, 1, 1)))),
        "triton_fused": graph_us(lambda: triton_conv.forward_fused(call, relu=True)),
    }
    out["slim_fwdbwd"] += out["slim_fwd"]  # convolution_backward alone is the backward
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--dtypes", default="bf16,fp32")
    args = parser.parse_args(argv)
    import torch

    from moe_kernels._triton.tune import TUNE_SHAPES

    if not torch.cuda.is_available():
        print("bench_slim: needs a CUDA GPU", file=sys.stderr)
        return 2
    torch.backends.cudnn.benchmark = True
    dtypes = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    rows = []
    for dtype_name in args.dtypes.split(","):
        for name, (c_in, width, size) in TUNE_SHAPES.items():
            times = bench_shape(c_in, width, size, args.batch, dtypes[dtype_name])
            rows.append({"shape": name, "dtype": dtype_name, "batch": args.batch, **times})
            print(f"{name} {dtype_name}: " + ", ".join(f"{k} {v:.1f} us" for k, v in times.items()), flush=True)
    doc = {"device": torch.cuda.get_device_name(), "torch": torch.__version__, "tf32": True, "rows": rows}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "triton_vs_slim.json").write_text(json.dumps(doc, indent=1) + "\n")
    lines = ["| shape | dtype | fwd / slim | fwd+bwd / slim | fused BN+ReLU / slim+BN+ReLU |", "|---|---|---|---|---|"]
    for r in rows:
        ratios = (
            r["triton_fwd"] / r["slim_fwd"],
            r["triton_fwdbwd"] / r["slim_fwdbwd"],
            r["triton_fused"] / r["slim_bn_relu"],
        )
        lines.append(f"| {r['shape']} | {r['dtype']} | " + " | ".join(f"{v:.2f}" for v in ratios) + " |")
    (out / "triton_vs_slim.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
