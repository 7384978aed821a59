"""Freezing a model's routing: every MoE layer uses fixed experts (a pathway, or recorded decisions)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import nn

from advmoe.nn.routed_model import RoutedModel
from advmoe.nn.structure import moe_layers

__all__ = ["frozen_routing"]


@contextlib.contextmanager
def frozen_routing(model: nn.Module, routing: dict[str, torch.Tensor] | int) -> Iterator[nn.Module]:
    """Inside this context every MoE layer uses fixed experts, gate 1, and no router runs.

    Args:
        model: the model.
        routing: an int e (pathway e: experts e, e+1, ... mod E for all samples and layers) or a dict
            from MoE layer name to (B, k) expert indices, e.g. ``forward_with_aux(...)[1].routing``.

    Yields:
        The model.

    Raises:
        KeyError: a MoE layer's name is missing from the dict.
        ValueError: the int is outside [0, E).
    """
    layers = moe_layers(model)
    if isinstance(routing, bool) or not isinstance(routing, (int, dict)):
        raise TypeError(f"routing must be an int or a dict of (B, k) tensors, got {type(routing).__name__}")
    plan = []
    for name, layer in layers:
        if isinstance(routing, int):
            if not 0 <= routing < layer.num_experts:
                raise ValueError(f"pathway {routing} out of range [0, {layer.num_experts}) for layer {name!r}")
            plan.append((layer, routing))
        else:
            if name not in routing:
                raise KeyError(f"frozen routing has no entry for MoE layer {name!r}")
            idx = routing[name]
            if not isinstance(idx, torch.Tensor) or idx.dim() != 2 or idx.shape[1] != layer.top_k:
                raise ValueError(f"routing[{name!r}] must be a (B, {layer.top_k}) tensor")
            plan.append((layer, idx.detach().to(torch.int64)))
    routed = [m for m in model.modules() if isinstance(m, RoutedModel)]
    saved_layers = [layer.frozen_expert_idx for layer, _ in plan]
    saved_models = [m.routing_frozen for m in routed]
    try:
        for layer, value in plan:
            layer.frozen_expert_idx = value
        for m in routed:
            m.routing_frozen = True
        yield model
    finally:
        for (layer, _), prev in zip(plan, saved_layers, strict=True):
            layer.frozen_expert_idx = prev
        for m, prev in zip(routed, saved_models, strict=True):
            m.routing_frozen = prev
