"""The demo's cost table, like for like: ``cost_table`` (FLOPs per image and median latency per batch size).

Every side gets the same inference treatment (``advmoe.bench.models.TREATMENT``): the dense model and the
ideal slim network are BatchNorm-folded with ``to_sparse`` as the deployed model is, the ideal's router is
BatchNorm-folded with ``fold_router``; all run in eval mode under ``torch.inference_mode``, in the same
dtype, eagerly, channels_last on GPU. ``masked`` and ``sparse`` are the training-form MoE (unfolded).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn


def cost_table(
    dense: nn.Module,
    moe: nn.Module,
    deployed: nn.Module,
    device: torch.device,
    inputs: torch.Tensor,
    batches: tuple[int, ...],
    repeats: int,
    slim_name: str | None = None,
) -> dict[str, Any]:
    """FLOPs per image and median latency of dense / masked / sparse / deployed / ideal / router.

    Args:
        dense: the trained dense model (not changed: a folded copy is timed).
        moe: the trained MoE model (its ``config`` rebuilds the slim network).
        deployed: ``to_sparse(moe)``.
        device: where to time.
        inputs: (N, C, H, W) images, N >= max(batches); the first B are used for batch size B.
        batches: batch sizes.
        repeats: timed interleaved rounds.
        slim_name: zoo name of the slim network (default ``moe.config["name"]``).

    Returns:
        {"flops_g": name -> GFLOPs/img, "latency_ms": name -> {batch -> median ms}, "treatment": text}.
    """
    from advmoe.bench.masked import to_masked
    from advmoe.bench.models import TREATMENT, IdealModel, RouterOnly, flops_per_image, inference_treatment
    from advmoe.bench.timing import time_interleaved
    from advmoe.deploy import fold_router, to_sparse
    from advmoe.models import create_model

    cfg = moe.config
    dtype = next(moe.parameters()).dtype
    example = inputs[:2].to(device=device, dtype=dtype)
    slim = (
        create_model(
            slim_name or cfg["name"],
            ratio=cfg["ratio"],
            num_classes=cfg["num_classes"],
            in_channels=cfg["in_channels"],
            normalize=cfg.get("normalize"),
        )
        .to(device)
        .eval()
    )
    router = None
    if getattr(moe, "router", None) is not None:
        router = fold_router(moe.router, moe.normalize(example) if moe.normalize is not None else example)
    ideal = IdealModel(moe, to_sparse(slim, example_input=example), router)
    variants = {
        "dense": to_sparse(dense.eval(), example_input=example),
        "masked": to_masked(moe),
        "sparse": moe,
        "deployed": deployed,
        "ideal": ideal,
    }
    if router is not None:
        variants["router"] = RouterOnly(moe, router)
    variants = {k: inference_treatment(m, device, dtype) for k, m in variants.items()}
    x1 = example[:1]
    flops = {k: flops_per_image(m, x1)[0] for k, m in variants.items()}
    latency: dict[str, dict[int, float]] = {k: {} for k in variants}
    for batch in batches:
        x = inputs[:batch].to(device=device, dtype=dtype)
        if device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        fns = {k: (lambda m=m, x=x: m(x)) for k, m in variants.items()}
        with torch.inference_mode():
            t = time_interleaved(fns, device, warmup=1 if repeats < 5 else 2, repeats=repeats)
        for k in variants:
            latency[k][batch] = t[k]["median_ms"]
    return {"flops_g": flops, "latency_ms": latency, "treatment": TREATMENT + "; execution eager"}
