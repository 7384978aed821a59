"""The two parameter groups of a MoE model: router parameters and everything else (experts, dense layers)."""

from __future__ import annotations

from torch import nn

from advmoe.nn.routers import Router

__all__ = ["expert_parameters", "router_parameters"]


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
