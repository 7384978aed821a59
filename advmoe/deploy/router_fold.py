"""Cheaper routers for inference: BatchNorm folded into the router's convolutions.

Folding rounds the router's scores differently (a few ulps), so a sample whose two best scores are closer
than that noise can switch expert. ``routing_agreement`` measures how often the folded router takes the
source router's decision; ``tests/test_deploy.py`` requires >= 99.9% on clean and PGD inputs.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

from advmoe.nn import Router


@torch.no_grad()
def fold_router(router: Router, example: torch.Tensor) -> Router:
    """A copy of ``router`` with every BatchNorm2d that alone follows a convolution folded into it.

    The ResearchRouter's 19 conv -> BatchNorm pairs become 19 convolutions with bias; ReLUs, the
    parameter-free shortcuts, the pooling and the linear head are unchanged. A router without BatchNorm
    (``PerLayerRouter``) comes back as an unchanged copy.

    Args:
        router: an eval-mode router (not changed).
        example: (B, C, H, W) input of the router (normalised images for a model-level router), used once
            to find the conv -> BatchNorm chains.

    Returns:
        The folded copy, in eval mode.
    """
    from advmoe.deploy.to_sparse import fold_batchnorms

    folded = copy.deepcopy(router).eval()
    if any(isinstance(m, nn.BatchNorm2d) for m in folded.modules()):
        fold_batchnorms(folded, example, include_routers=True)
    return folded


@torch.no_grad()
def routing_agreement(source: nn.Module, folded: nn.Module, x: torch.Tensor) -> dict[str, float]:
    """How often two routers take the same top-1 decision on x.

    Args:
        source, folded: routers, (B, C, H, W) -> (B, E) scores.
        x: (B, C, H, W) router input.

    Returns:
        {"agreement": share of samples with equal argmax, "disagree": count, "n": B,
        "max_score_diff": max |score difference|, "min_margin": smallest top-1/top-2 gap of the source}.
    """
    a, b = source(x).double(), folded(x).double()
    top2 = a.topk(min(2, a.shape[1]), dim=1).values
    margin = (top2[:, 0] - top2[:, -1]).min().item() if a.shape[0] else float("inf")
    same = a.argmax(1) == b.argmax(1)
    return {
        "agreement": same.double().mean().item() if a.shape[0] else 1.0,
        "disagree": int((~same).sum()),
        "n": a.shape[0],
        "max_score_diff": (a - b).abs().max().item() if a.shape[0] else 0.0,
        "min_margin": margin,
    }
