"""Kernel and sync counts per model variant on a GPU: ``python -m advmoe.bench.gpu_counts --out FILE``.

For each model, dtype and batch: every benchmark variant (eager) and, where it can be captured, its CUDA
graph (``CapturedModel``), with ``advmoe.bench.profile.count_kernels``. Writes JSON and prints a table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch


def main(argv: list[str] | None = None) -> int:
    from advmoe.bench.models import build_variants, image_size, parse_dtype, provenance
    from advmoe.bench.profile import count_kernels
    from advmoe.deploy import CapturedModel

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--models", nargs="+", default=["resnet18_cifar", "wrn_28_10_cifar", "vgg16_bn"])
    p.add_argument("--batch", nargs="+", type=int, default=[1, 256])
    p.add_argument("--dtype", default="bf16")
    p.add_argument("--router", default="research", choices=("research", "per_layer"))
    p.add_argument(
        "--variants",
        nargs="+",
        default=["dense", "deployed", "deployed[pathway]", "deployed[grouped]", "deployed[layer]", "ideal", "router"],
    )
    p.add_argument("--out", required=True)
    args = p.parse_args(argv)
    device, dtype = torch.device("cuda"), parse_dtype(args.dtype)
    torch.backends.cudnn.benchmark = True
    rows = []
    for name in args.models:
        variants, moe = build_variants(name, 0.5, 2, device, dtype, ["reference"], args.router, args.variants)
        size = image_size(name)
        for batch in args.batch:
            x = torch.rand(batch, 3, size, size, device=device, dtype=dtype).contiguous(
                memory_format=torch.channels_last
            )
            for key, model in variants.items():
                row = {"model": name, "batch": batch, "variant": key, "dtype": args.dtype, "router": args.router}
                try:
                    row["eager"] = count_kernels(model, x)
                except Exception as err:  # noqa: BLE001 -- recorded, the other variants still run
                    row["eager_error"] = f"{type(err).__name__}: {str(err)[:200]}"
                try:
                    row["graph"] = count_kernels(CapturedModel(model, x), x)
                except Exception as err:  # noqa: BLE001
                    row["graph_error"] = f"{type(err).__name__}: {str(err)[:200]}"
                rows.append(row)
                print(json.dumps(row), flush=True)
        del variants, moe
        torch.cuda.empty_cache()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps({"provenance": provenance(), "rows": rows}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
