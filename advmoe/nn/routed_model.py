"""Plumbing that hands a model-level routing decision down to every MoE layer, explicitly.

``RoutedModel`` is the base class of every zoo model: it holds the optional input normalisation module
(``advmoe.models.common.Normalize`` in the zoo) and the optional model-level router, and ``route(x)`` turns
the router's scores into a ``Routing`` that the model's forward passes down through ``RoutedSequential``
containers and ``takes_routing`` blocks.
"""

from __future__ import annotations

import torch
from torch import nn

from advmoe.nn.routers import Router
from advmoe.nn.routing import GATE_SCORES, Routing, top_k_routing
from advmoe.nn.routing_record import report_routing


class RoutedSequential(nn.Sequential):
    """``nn.Sequential`` that passes ``routing`` to the children that take it (``takes_routing``)."""

    takes_routing = True

    def forward(self, x: torch.Tensor, routing: Routing | None = None) -> torch.Tensor:
        for module in self:
            x = module(x, routing) if getattr(module, "takes_routing", False) else module(x)
        return x


class RoutedModel(nn.Module):
    """Base of the zoo models: normalisation buffers, optional model-level router, ``route()``.

    Args:
        normalize: the input normalisation module (the zoo's ``advmoe.models.common.Normalize``, with ``mean`` and
            ``std`` buffers of C values) or None.
        router: a model-level ``Router`` or None.
        top_k: experts per sample chosen from the model-level router.
        gate_score: "softmax" or "logits" (see ``advmoe.nn.top_k_routing``).

    Attributes:
        normalize: the input normalisation module or None.
        router: a model-level ``Router`` or None (dense models and per-layer routing).
        top_k: experts per sample chosen from the model-level router.
        gate_score: what the straight-through gate's gradient flows into ("softmax" or "logits"; see
            ``advmoe.nn.top_k_routing``).
        config: the ``create_model`` arguments that rebuild this model (set by the registry).
    """

    def __init__(
        self,
        normalize: nn.Module | None = None,
        router: Router | None = None,
        top_k: int = 1,
        gate_score: str = "softmax",
    ):
        super().__init__()
        if gate_score not in GATE_SCORES:
            raise ValueError(f"gate_score must be one of {GATE_SCORES}, got {gate_score!r}")
        if normalize is not None and not isinstance(normalize, nn.Module):
            raise ValueError(
                f"normalize must be an nn.Module (e.g. advmoe.models.common.Normalize(mean, std)) or None, "
                f"got {type(normalize).__name__}"
            )
        self.gate_score = gate_score
        self.normalize = normalize
        self.router = router
        self.top_k = top_k
        self.routing_frozen = False
        self.config: dict = {}

    def prepare(self, x: torch.Tensor) -> tuple[torch.Tensor, Routing | None]:
        """Checks the input, normalises it and routes it.

        Args:
            x: (B, C, H, W) images in [0, 1].

        Returns:
            (normalised x, the model-level Routing or None).
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"input must be a (B, C, H, W) image tensor, got {getattr(x, 'shape', type(x))}")
        if self.normalize is not None:
            if x.shape[1] != self.normalize.mean.numel():
                raise ValueError(f"input has {x.shape[1]} channels, normalisation {self.normalize.mean.numel()}")
            x = self.normalize(x)
        return x, self.route(x)

    def route(self, x: torch.Tensor) -> Routing | None:
        """The model-level routing for normalised x, or None (no router, or routing frozen)."""
        if self.router is None or self.routing_frozen:
            return None
        routing = top_k_routing(self.router(x), self.top_k, score=self.gate_score)
        report_routing(self, router=routing)
        return routing
