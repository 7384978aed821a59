"""Soft routing: a differentiable surrogate of a hard-gated MoE model, for attacks that cross routing boundaries.

A hard top-k gate passes the input gradient only through the chosen experts: an attack on the real model
cannot see that moving the input across a routing boundary would hand it to an expert that gets it
wrong. Inside :func:`soft_routing` every ``advmoe.nn.SparseMoEConv2d`` of the model replaces its hard
choice by the router's softmax: for top-1, the layer's output is ``sum_e softmax(s / T)_e * expert_e(x)``
(s: the router's scores for that layer, T: the temperature), a smooth function of the input on both
sides of a boundary. Attack this surrogate end to end (e.g. with ``advmoe.attacks.pgd``), then score the
examples on the real, hard-routed model: the surrogate is only a way to find examples, never a model
whose accuracy counts.

For top-k with k > 1, output slot j (channels ``[j*w, (j+1)*w)``) mixes the experts with
``softmax(s / T)`` taken over the experts not among the hard choice's first j (a sequential soft top-k):
as T -> 0 slot j holds exactly the hard choice's j-th expert, so the surrogate tends to the real model.

Nothing in ``advmoe.nn`` is changed: the context sets an instance-level ``forward`` on every MoE layer
and removes it on exit. The routing decisions still come from each layer's own ``route`` (model-level
router, per-layer router); layers whose routing is frozen (``advmoe.nn.frozen_routing``) keep their
fixed experts and stay hard.
"""

from __future__ import annotations

import contextlib
import functools
import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["soft_mixture", "soft_routing"]


def soft_mixture(
    expert_out: torch.Tensor, scores: torch.Tensor, hard_idx: torch.Tensor, temperature: float
) -> torch.Tensor:
    """Mix every expert's output with the router's softmax, one sequential soft top-k slot per hard slot.

    Args:
        expert_out: (B, E, w, H, W) output of every expert.
        scores: (B, E) router scores.
        hard_idx: (B, k) the hard routing's experts, best first (slot order).
        temperature: T > 0; the softmax is taken of ``scores / T``.

    Returns:
        (B, k*w, H, W): slot j = ``sum_e q_j[:, e] * expert_out[:, e]`` with
        ``q_j = softmax(scores / T)`` over the experts not in ``hard_idx[:, :j]``.
    """
    batch, num_experts = scores.shape
    taken = torch.zeros(batch, num_experts, dtype=torch.bool, device=scores.device)
    slots = []
    for j in range(hard_idx.shape[1]):
        weights = torch.softmax((scores / temperature).masked_fill(taken, float("-inf")), dim=1)
        slots.append(torch.einsum("be,bechw->bchw", weights.to(expert_out.dtype), expert_out))
        taken = taken.scatter(1, hard_idx[:, j : j + 1], True)
    return torch.cat(slots, dim=1)


def _soft_forward(layer: nn.Module, temperature: float, x: torch.Tensor, routing=None) -> torch.Tensor:
    """Replacement ``forward`` of a ``SparseMoEConv2d`` inside :func:`soft_routing`."""
    if layer.frozen_expert_idx is not None:  # pinned experts stay hard
        return type(layer).forward(layer, x, routing)
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a (B, C, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    record: dict = {}
    outer, layer._record = layer._record, record
    try:  # the layer's own routing path: its per-layer router, or the model-level routing handed in
        hard_idx, _ = layer.route(x, routing)
    finally:
        layer._record = outer
    scores = routing.logits if routing is not None else record["router"].logits
    if outer is not None:  # inside forward_with_aux: report the hard choice and the router's scores
        outer["expert_idx"] = hard_idx.detach()
        if "router" in record:
            outer["router"] = record["router"]
    padding = layer.padding
    if layer.padding_mode != "zeros" and any(padding):
        x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]), mode=layer.padding_mode)
        padding = (0, 0)
    # every expert's channels: one dense convolution over all E * w weight rows (expert e = rows e*w..)
    out = F.conv2d(x, layer.weight, layer.bias, layer.stride, padding, layer.dilation)
    out = out.view(out.shape[0], layer.num_experts, layer.expert_width, *out.shape[2:])
    return soft_mixture(out, scores, hard_idx, temperature)


@contextlib.contextmanager
def soft_routing(model: nn.Module, temperature: float = 1.0) -> Iterator[nn.Module]:
    """Inside this context every MoE layer of ``model`` mixes its experts with the router's softmax.

    See the module docstring for the exact mixture. Model parameters, modes and the ``advmoe.nn`` code are
    untouched; the routing decisions are the ones each layer's ``route`` makes. The usage counters
    (``expert_counts``) are not updated inside.

    Example:
        >>> with soft_routing(model):                       # doctest: +SKIP
        ...     x_adv = pgd(model, x, y, eps=8 / 255, alpha=2 / 255, steps=50)
        >>> robust = model(x_adv).argmax(1) == y             # doctest: +SKIP  (scored on the real model)

    Args:
        model: a model containing ``advmoe.nn.SparseMoEConv2d`` layers.
        temperature: T > 0 (finite); the softmax is taken of ``scores / T``. Small T tends to the hard
            model; large T to an even mixture.

    Yields:
        The model.

    Raises:
        ValueError: the model has no MoE layer, or a bad temperature.
    """
    from advmoe.nn import moe_layers

    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    if not (math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    layers = [layer for _, layer in moe_layers(model)]
    if not layers:
        raise ValueError("soft_routing needs a model with SparseMoEConv2d layers (advmoe.nn); this model has none")
    saved = [(layer, layer.__dict__.get("forward"), layer.track_usage) for layer in layers]
    try:
        for layer in layers:
            layer.forward = functools.partial(_soft_forward, layer, float(temperature))
            layer.track_usage = False
        yield model
    finally:
        for layer, forward, track in saved:
            if forward is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = forward
            layer.track_usage = track
