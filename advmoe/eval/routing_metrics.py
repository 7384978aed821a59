"""Routing metrics: router robustness (do expert choices survive an attack?) and expert usage.

A routing is what :func:`advmoe.nn.forward_with_aux` reports: per MoE layer name, the (B, k) int64
indices of the experts each sample uses. A sample's routing in one layer is "unchanged" when the ordered
tuple of its k experts is the same on the clean and on the attacked input (the order matters: slot j
of the layer's output holds expert ``expert_idx[:, j]``). "Overall" means unchanged in every layer.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from advmoe.eval.metrics import Tally

__all__ = ["ALL_LAYERS", "UsageCounter", "layer_num_experts", "routing_of", "routing_unchanged", "tally_unchanged"]

ALL_LAYERS = "all_layers"

Routing = Mapping[str, torch.Tensor]


@torch.no_grad()
def routing_of(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Logits and routing of ``model`` on ``x``.

    Args:
        model: a model following the ``advmoe.nn`` interface (dense models give an empty routing).
        x: (B, C, H, W) inputs.

    Returns:
        (logits (B, classes), {MoE layer name: (B, k) int64 expert indices}).
    """
    from advmoe.nn import forward_with_aux

    logits, aux = forward_with_aux(model, x)
    return logits, {name: idx.detach() for name, idx in aux.routing.items()}


def routing_unchanged(clean: Routing, attacked: Routing) -> dict[str, torch.Tensor]:
    """Per-sample "routing unchanged" flags, per layer and over all layers.

    Args:
        clean: {layer: (B, k) int64} routing on clean inputs.
        attacked: {layer: (B, k) int64} routing on attacked inputs; same layers and shapes.

    Returns:
        {layer: (B,) bool, ..., ``ALL_LAYERS``: (B,) bool}; empty when there are no MoE layers.

    Raises:
        ValueError: the two routings name different layers or have different shapes.
    """
    if set(clean) != set(attacked):
        raise ValueError(f"routings name different layers: {sorted(clean)} vs {sorted(attacked)}")
    out: dict[str, torch.Tensor] = {}
    for name, idx in clean.items():
        other = attacked[name]
        if idx.shape != other.shape:
            raise ValueError(f"routing of layer {name!r}: shapes differ, {tuple(idx.shape)} vs {tuple(other.shape)}")
        out[name] = (idx == other).all(dim=1)
    if out:
        out[ALL_LAYERS] = torch.stack(list(out.values())).all(dim=0)
    return out


def tally_unchanged(tally: Tally, prefix: str, clean: Routing, attacked: Routing) -> None:
    """Add :func:`routing_unchanged` flags to ``tally`` under keys ``f"{prefix}/{layer}"``."""
    for name, flags in routing_unchanged(clean, attacked).items():
        tally.add(f"{prefix}/{name}", flags)


def layer_num_experts(model: nn.Module) -> dict[str, int]:
    """{MoE layer name: number of experts E} for every ``SparseMoEConv2d`` of ``model``."""
    from advmoe.nn import moe_layers

    return {name: int(layer.num_experts) for name, layer in moe_layers(model)}


class UsageCounter:
    """Histogram of how often each expert is chosen, per MoE layer, over all samples and all k slots.

    Args:
        num_experts: {layer name: E}; layers missing here are sized from the largest index seen.
    """

    def __init__(self, num_experts: Mapping[str, int] | None = None) -> None:
        self.num_experts = dict(num_experts or {})
        self.counts: dict[str, torch.Tensor] = {}

    def add(self, routing: Routing) -> None:
        """Count one batch's routing {layer: (B, k) int64}."""
        for name, idx in routing.items():
            flat = idx.reshape(-1).to("cpu", torch.int64)
            size = self.num_experts.get(name, int(flat.max()) + 1 if flat.numel() else 0)
            if flat.numel() and (int(flat.min()) < 0 or int(flat.max()) >= max(size, 1)):
                raise ValueError(f"layer {name!r}: expert index out of range [0, {size})")
            hist = torch.bincount(flat, minlength=size)
            prev = self.counts.get(name)
            if prev is not None and prev.numel() != hist.numel():  # sized from data: grow to the larger
                n = max(prev.numel(), hist.numel())
                prev = torch.nn.functional.pad(prev, (0, n - prev.numel()))
                hist = torch.nn.functional.pad(hist, (0, n - hist.numel()))
            self.counts[name] = hist if prev is None else prev + hist

    def as_dict(self) -> dict[str, list[int]]:
        """{layer: [count of expert 0, ..., count of expert E-1]} (JSON-able)."""
        return {name: [int(c) for c in hist] for name, hist in self.counts.items()}

    def fractions(self) -> dict[str, list[float]]:
        """{layer: share of routing slots that went to each expert} (each list sums to 1)."""
        out = {}
        for name, hist in self.counts.items():
            total = int(hist.sum())
            out[name] = [float(c) / total if total else 0.0 for c in hist]
        return out
