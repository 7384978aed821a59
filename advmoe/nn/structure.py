"""What MoE structure a model has: its MoE layers, whether it has any, how many pathways it can take."""

from __future__ import annotations

from torch import nn

from advmoe.nn.moe_conv import SparseMoEConv2d

__all__ = ["is_moe", "moe_layers", "num_pathways"]


def moe_layers(model: nn.Module) -> list[tuple[str, SparseMoEConv2d]]:
    """The model's ``SparseMoEConv2d`` layers as (name, layer), in registration (= forward) order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SparseMoEConv2d)]


def is_moe(model: nn.Module) -> bool:
    """True if the model has at least one ``SparseMoEConv2d``."""
    return any(isinstance(m, SparseMoEConv2d) for m in model.modules())


def num_pathways(model: nn.Module) -> int | None:
    """How many distinct pathways the model can take.

    Returns:
        1 for a dense model; E for a top-1 model driven by one model-level router (every layer
        follows it); None when per-layer routing or top-k > 1 make them too many to enumerate.
    """
    layers = moe_layers(model)
    if not layers:
        return 1
    if any(layer.router is not None for _, layer in layers) or any(layer.top_k != 1 for _, layer in layers):
        return None
    experts = {layer.num_experts for _, layer in layers}
    return experts.pop() if len(experts) == 1 else None
