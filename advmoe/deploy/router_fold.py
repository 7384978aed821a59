"""Cheaper routers for inference: BatchNorm folded into the research router's convolutions
(``fold_router``), and a per-layer router with a leaner eval forward (``FlatPerLayerRouter``, bit-identical).

Folding rounds the router's scores differently (a few ulps), so a sample whose two best scores are closer
than that noise can switch expert. ``routing_agreement`` measures how often the folded router takes the
source router's decision; ``tests/library/test_deploy.py`` requires >= 99.9% on clean and PGD inputs.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from advmoe.nn import PerLayerRouter, ResearchRouter, Router


class FusedResearchRouter(ResearchRouter):
    """A BatchNorm-folded ``ResearchRouter`` with a flat forward: ``conv2d`` (folded bias) + in-place ReLU,
    shortcut add in place, no submodule calls (their Python cost is a quarter of the router's time at B = 1).

    Same parameters and state-dict names as the folded router (the BatchNorms are ``nn.Identity``); same
    scores, operation for operation.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scores (B, E) for images x (B, C, H, W)."""
        stem = self.conv1
        out = F.conv2d(x, stem.weight, stem.bias, stem.stride, stem.padding).relu_()
        for stage in (self.layer1, self.layer2, self.layer3):
            for block in stage:
                c1, c2 = block.conv1, block.conv2
                y = F.conv2d(out, c1.weight, c1.bias, c1.stride, c1.padding).relu_()
                y = F.conv2d(y, c2.weight, c2.bias, c2.stride, c2.padding)
                shortcut = F.pad(out[:, :, ::2, ::2], (0, 0, 0, 0, *block.channel_pad)) if block.pad_shortcut else out
                out = y.add_(shortcut).relu_()
        pooled = F.adaptive_avg_pool2d(out, 1).flatten(1)
        if self.input_norm is not None:
            pooled = self.input_norm(pooled)
        return self.fc(pooled)


class FlatPerLayerRouter(PerLayerRouter):
    """A ``PerLayerRouter`` whose eval-mode forward on the CPU skips the work that calibrated norms do not need.

    ``RouterInputNorm`` in eval mode also computes the batch's mean and variance and picks them with a tensor
    ``where`` (so an uncalibrated model routes evenly without a host read); once the norm has running
    statistics that work is wasted. Here, on the CPU, with the norm's statistics tracked, the forward is five
    operators: pool (``mean`` over H, W), subtract the running mean, divide by ``sqrt(running_var + eps)``
    (computed once and kept until the buffers change), the per-image ``layer_norm``, the linear head. They are
    the source router's operations on the same values, so the scores are bit-identical (tested). In train
    mode, on other devices (where reading the counter would be a host sync), under tracing or torch.compile,
    and while the statistics were never tracked, it runs the source forward. Same parameters, buffers and
    state-dict names.
    """

    def _eval_statistics(self, dtype: torch.dtype) -> tuple[bool, torch.Tensor, torch.Tensor]:
        """(statistics tracked?, running mean, sqrt(running var + eps)) in ``dtype``, cached per buffer version."""
        norm = self.input_norm
        mean, var, tracked = norm.running_mean, norm.running_var, norm.num_batches_tracked
        try:
            key = (mean._version, var._version, tracked._version, mean.data_ptr(), var.data_ptr(), norm.eps, dtype)
        except RuntimeError:  # inference tensors (created under inference_mode) have no version counter
            key = None
        cache = self.__dict__.get("_statistics_cache")
        if key is not None and cache is not None and cache[0] == key:
            return cache[1]
        value = (int(tracked) != 0, mean.to(dtype), torch.sqrt(var.to(dtype) + norm.eps))
        if key is not None:
            self.__dict__["_statistics_cache"] = (key, value)
        return value

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scores (B, E) for a feature map x (B, C_in, H, W)."""
        norm = self.input_norm
        if (
            norm is None
            or norm.training
            or x.device.type != "cpu"
            or x.dim() != 4
            or x.shape[1] != norm.running_mean.numel()
            or torch.jit.is_tracing()
            or torch.compiler.is_compiling()
        ):
            return super().forward(x)  # includes the source's clear shape error
        tracked, mean, std = self._eval_statistics(x.dtype)
        if not tracked:
            return super().forward(x)
        return flat_router_scores(x, mean, std, norm.eps, self.fc.weight, self.fc.bias)


def flat_router_scores(
    x: torch.Tensor,
    mean: torch.Tensor,
    std: torch.Tensor,
    eps: float,
    fc_weight: torch.Tensor,
    fc_bias: torch.Tensor | None,
) -> torch.Tensor:
    """The eval-mode per-layer router in five operators: scores (B, E) for a feature map x (B, C, H, W).

    Pool over H, W; standardise with the running ``mean`` (C,) and ``std`` = sqrt(running_var + eps) (C,);
    the per-image ``layer_norm`` of ``RouterInputNorm._per_image``; the linear head (``fc_weight`` (E, C)).
    The source ``PerLayerRouter`` does the same operations on the same values (bit-identical scores, tested).
    """
    z = (x.mean((2, 3)) - mean) / std
    return F.linear(F.layer_norm(z, z.shape[1:], eps=eps), fc_weight, fc_bias)


@torch.no_grad()
def fold_router(router: Router, example: torch.Tensor) -> Router:
    """A copy of ``router`` with every BatchNorm2d that alone follows a convolution folded into it.

    The ResearchRouter's 19 conv -> BatchNorm pairs become 19 convolutions with bias; ReLUs, the
    parameter-free shortcuts, the pooling and the linear head are unchanged; the result is a
    ``FusedResearchRouter`` (flat forward, in-place ReLU and shortcut add). A router without BatchNorm
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
    if type(folded) is ResearchRouter and not any(isinstance(m, nn.BatchNorm2d) for m in folded.modules()):
        folded.__class__ = FusedResearchRouter
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
