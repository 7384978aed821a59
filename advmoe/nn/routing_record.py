"""Model-level helpers every other part uses: find MoE layers and routers, split parameters, run a
forward that also returns the routing decisions, freeze routing, count pathways."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass, field

import torch
from torch import nn

from advmoe.nn.moe_conv import SparseMoEConv2d
from advmoe.nn.routed_model import RoutedModel
from advmoe.nn.routers import Router
from advmoe.nn.routing import load_balance_loss


@dataclass
class MoEAux:
    """What ``forward_with_aux`` returns besides the logits.

    Attributes:
        routing: per MoE layer name, the chosen experts (B, k) int64.
        router_logits: per router name ("router" for a model-level router, "<layer>.router" for a
            per-layer router), the scores (B, E), still attached to the graph.
        balance_loss: scalar load-balancing loss averaged over the routers (0 for dense models).
    """

    routing: dict[str, torch.Tensor] = field(default_factory=dict)
    router_logits: dict[str, torch.Tensor] = field(default_factory=dict)
    balance_loss: torch.Tensor | None = None


def moe_layers(model: nn.Module) -> list[tuple[str, SparseMoEConv2d]]:
    """The model's ``SparseMoEConv2d`` layers as (name, layer), in registration (= forward) order."""
    return [(name, m) for name, m in model.named_modules() if isinstance(m, SparseMoEConv2d)]


def is_moe(model: nn.Module) -> bool:
    """True if the model has at least one ``SparseMoEConv2d``."""
    return any(isinstance(m, SparseMoEConv2d) for m in model.modules())


def router_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Parameters of every router (model-level and per-layer), each once."""
    seen: dict[int, nn.Parameter] = {}
    for module in model.modules():
        if isinstance(module, Router):
            for p in module.parameters():
                seen.setdefault(id(p), p)
    return list(seen.values())


def expert_parameters(model: nn.Module) -> list[nn.Parameter]:
    """Every parameter that is not a router parameter: experts, dense convs, norms, the head."""
    routers = {id(p) for p in router_parameters(model)}
    return [p for p in model.parameters() if id(p) not in routers]


def _recorders(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, (SparseMoEConv2d, RoutedModel))]


def forward_with_aux(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
    """Runs ``model(x)`` and collects the routing decisions and router scores of that forward.

    Works on dense models too (empty dicts, zero balance loss).

    Args:
        model: a zoo model (or any module containing ``SparseMoEConv2d`` layers).
        x: (B, C, H, W) input.

    Returns:
        (logits (B, classes), MoEAux).
    """
    modules = _recorders(model)
    records = {id(m): {} for m in modules}
    previous = [m._record for m in modules]
    try:
        for m in modules:
            m._record = records[id(m)]
        logits = model(x)
    finally:
        for m, prev in zip(modules, previous, strict=True):
            m._record = prev
    aux = MoEAux()
    losses = []
    names = {id(m): name for name, m in model.named_modules()}
    model_routers = [m for m in modules if isinstance(m, RoutedModel)]
    for m in modules:
        record, name = records[id(m)], names[id(m)]
        if "expert_idx" in record:
            aux.routing[name] = record["expert_idx"]
        if "router" in record:
            routing = record["router"]
            # the model-level router is "router" even inside a wrapper (DDP's "module."); layers are qualified
            single = isinstance(m, RoutedModel) and len(model_routers) == 1
            key = "router" if (single or not name) else f"{name}.router"
            aux.router_logits[key] = routing.logits
            losses.append(load_balance_loss(routing.logits, routing.expert_idx))
    aux.balance_loss = torch.stack(losses).mean() if losses else logits.new_zeros(())
    return logits, aux


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
