"""The research code's MoE formulation as a benchmark baseline: compute ALL experts, then mask.

``to_masked(model)`` copies a MoE zoo model and swaps every ``SparseMoEConv2d`` for a
``MaskedMoEConv2d`` that holds the same weights but runs the full (E*w)-channel convolution and then
keeps the chosen experts' channels (multiply by the one-hot routing mask, sum over experts), as the
public research code does. Same routing, same logits, the research code's cost.
"""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F
from torch import nn

from advmoe.nn import SparseMoEConv2d, moe_layers


class MaskedMoEConv2d(SparseMoEConv2d):
    """``SparseMoEConv2d`` computed the research code's way: full convolution, then an expert mask."""

    def forward(self, x: torch.Tensor, routing=None) -> torch.Tensor:
        """x (B, C_in, H, W) -> (B, k*w, H_out, W_out); all E*w channels are computed first."""
        expert_idx, gate = self.route(x, routing)
        padding = self.padding
        if self.padding_mode != "zeros" and any(padding):
            x, padding = F.pad(x, (padding[1], padding[1], padding[0], padding[0]), mode=self.padding_mode), (0, 0)
        full = F.conv2d(x, self.weight, self.bias, self.stride, padding, self.dilation)  # (B, E*w, H, W)
        batch, _, h, w = full.shape
        full = full.view(batch, self.num_experts, self.expert_width, h, w)
        mask = F.one_hot(expert_idx, self.num_experts).to(full.dtype)  # (B, k, E)
        if gate is not None:
            mask = mask * gate.to(full.dtype)[:, :, None]
        if self.top_k == 1:
            return (full * mask[:, 0, :, None, None, None]).sum(1)
        return torch.einsum("bke,bewhx->bkwhx", mask, full).reshape(batch, self.top_k * self.expert_width, h, w)


def to_masked(model: nn.Module) -> nn.Module:
    """A copy of ``model`` whose MoE layers compute all experts and mask (the research code's cost).

    Args:
        model: a MoE zoo model (unchanged).

    Returns:
        The masked copy, in the source's train/eval mode.
    """
    masked = copy.deepcopy(model)
    for _, layer in moe_layers(masked):
        layer.__class__ = MaskedMoEConv2d
        layer.track_usage = False
    return masked
