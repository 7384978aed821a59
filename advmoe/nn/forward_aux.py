"""``forward_with_aux``: a model's forward that also returns its routing decisions and router scores."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn

from advmoe.nn.moe_conv import SparseMoEConv2d
from advmoe.nn.routed_model import RoutedModel
from advmoe.nn.routing import load_balance_loss
from advmoe.nn.routing_record import record_routing

__all__ = ["MoEAux", "forward_with_aux"]


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


def forward_with_aux(model: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, MoEAux]:
    """Runs ``model(x)`` and collects the routing decisions and router scores of that forward.

    Works on dense models too (empty dicts, zero balance loss). The decisions come from the reports the
    model's ``SparseMoEConv2d`` layers and ``RoutedModel`` make inside ``advmoe.nn.record_routing``.

    Args:
        model: a zoo model (or any module containing ``SparseMoEConv2d`` layers).
        x: (B, C, H, W) input.

    Returns:
        (logits (B, classes), MoEAux).
    """
    with record_routing() as recorder:
        logits = model(x)
    reporters = [(name, m) for name, m in model.named_modules() if isinstance(m, (SparseMoEConv2d, RoutedModel))]
    model_routers = sum(isinstance(m, RoutedModel) for _, m in reporters)
    aux = MoEAux()
    losses = []
    for name, m in reporters:
        record = recorder.get(m)
        if record is None:
            continue
        if record.expert_idx is not None:
            aux.routing[name] = record.expert_idx
        if record.router is not None:
            # the model-level router is "router" even inside a wrapper (DDP's "module."); layers are qualified
            single = isinstance(m, RoutedModel) and model_routers == 1
            key = "router" if (single or not name) else f"{name}.router"
            aux.router_logits[key] = record.router.logits
            losses.append(load_balance_loss(record.router.logits, record.router.expert_idx))
    aux.balance_loss = torch.stack(losses).mean() if losses else logits.new_zeros(())
    return logits, aux
