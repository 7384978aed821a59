"""Soft routing: a differentiable surrogate of a hard-gated MoE model, for attacks that cross routing boundaries.

A hard top-k gate passes the input gradient only through the chosen experts: an attack on the real model
cannot see that moving the input across a routing boundary would hand it to an expert that gets it
wrong. Inside :func:`soft_routing` every ``advmoe.nn.SparseMoEConv2d`` of the model replaces its hard
choice by the router's softmax: for top-1, the layer's output is ``sum_e softmax(s / T)_e * expert_e(x)``
(s: the router's scores for that layer, T: the temperature), a smooth function of the input on both
sides of a boundary. Attack this surrogate end to end (e.g. with ``advmoe.attacks.pgd``), then score the
examples on the real, hard-routed model: the surrogate is only a way to find examples, never a model
whose accuracy counts.

The temperature can be one number or one per layer: :func:`calibrated_temperatures` scales each layer's T to
how far apart its router scores its experts on a clean batch (a fixed T suits no model; ``advmoe.eval`` uses
the calibrated ones).

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
from collections.abc import Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from advmoe.nn.routing import Routing
from advmoe.nn.routing_record import record_routing, report_routing

__all__ = ["calibrated_temperatures", "soft_mixture", "soft_routing"]


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


def _route_with_scores(layer: nn.Module, x: torch.Tensor, routing) -> tuple[torch.Tensor, torch.Tensor, Routing | None]:
    """The layer's own routing path (its per-layer router, or the model-level routing handed in):
    (hard expert_idx (B, k), router scores (B, E), the Routing the layer's own router produced or None)."""
    with record_routing() as inner:
        hard_idx, _ = layer.route(x, routing)
    record = inner.get(layer)
    own = record.router if record is not None else None
    scores = routing.logits if routing is not None else own.logits
    return hard_idx, scores, own


def _soft_forward(layer: nn.Module, temperature: float, x: torch.Tensor, routing=None) -> torch.Tensor:
    """Replacement ``forward`` of a ``SparseMoEConv2d`` inside :func:`soft_routing`."""
    if layer.frozen_expert_idx is not None:  # pinned experts stay hard
        return type(layer).forward(layer, x, routing)
    if not isinstance(x, torch.Tensor) or x.dim() != 4:
        raise ValueError(f"x must be a (B, C, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")
    hard_idx, scores, own = _route_with_scores(layer, x, routing)
    # inside forward_with_aux (advmoe.nn.record_routing): report the hard choice and the router's scores
    report_routing(layer, expert_idx=hard_idx, router=own)
    padding = layer.padding
    if layer.padding_mode != "zeros" and any(padding):
        x = F.pad(x, (padding[1], padding[1], padding[0], padding[0]), mode=layer.padding_mode)
        padding = (0, 0)
    # every expert's channels: one dense convolution over all E * w weight rows (expert e = rows e*w..)
    out = F.conv2d(x, layer.weight, layer.bias, layer.stride, padding, layer.dilation)
    out = out.view(out.shape[0], layer.num_experts, layer.expert_width, *out.shape[2:])
    return soft_mixture(out, scores, hard_idx, temperature)


def _check_temperature(value: object, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{what} must be a finite number > 0, got {value!r}")
    return float(value)


@torch.no_grad()
def calibrated_temperatures(model: nn.Module, x: torch.Tensor, relative: float = 0.1) -> dict[str, float]:
    """Per-layer temperatures scaled to how decisive each layer's router is on the batch ``x``.

    A fixed temperature suits no model: trained routers often score their experts only a few tenths apart,
    so at T = 1 the softmax mixes the experts almost evenly and the surrogate no longer resembles the model
    (measured on the digits study's MoE models: clean accuracy 10%, chance). Here layer l gets
    ``T_l = relative * g_l``, where ``g_l`` is the median over the batch of the gap between the best and the
    second-best router score of layer l: with E = 2, every sample whose gap is at least the median keeps a
    weight of at least ``sigmoid(1 / relative)`` on its hard choice, and samples near a routing boundary are
    mixed.

    Args:
        model: a model containing ``advmoe.nn.SparseMoEConv2d`` layers, in the mode it is evaluated in.
        x: (B, C, H, W) clean inputs.
        relative: the factor (> 0, finite).

    Returns:
        {MoE layer name: temperature}, every value > 0 (a layer whose gaps are all 0 gets ``relative``).
    """
    from advmoe.nn import moe_layers

    relative = _check_temperature(relative, "relative")
    layers = moe_layers(model)
    if not layers:
        raise ValueError("calibrated_temperatures needs a model with SparseMoEConv2d layers; this model has none")
    gaps: dict[str, float] = {}

    def recorder(name: str, layer: nn.Module, inp: torch.Tensor, routing=None) -> torch.Tensor:
        if layer.frozen_expert_idx is None:
            _, scores, _ = _route_with_scores(layer, inp, routing)
            top = scores.float().topk(min(2, scores.shape[1]), dim=1).values
            gaps[name] = float((top[:, 0] - top[:, -1]).median()) if top.shape[1] > 1 else 0.0
        return type(layer).forward(layer, inp, routing)

    with _patched(layers, lambda name, layer: functools.partial(recorder, name, layer)):
        model(x)
    return {name: relative * gaps[name] if gaps.get(name, 0.0) > 0 else relative for name, _ in layers}


@contextlib.contextmanager
def _patched(layers, make_forward) -> Iterator[None]:
    """Set an instance-level ``forward`` (``make_forward(name, layer)``) on every (name, layer); usage
    counting off; everything restored on exit."""
    saved = [(layer, layer.__dict__.get("forward"), layer.track_usage) for _, layer in layers]
    try:
        for name, layer in layers:
            layer.forward = make_forward(name, layer)
            layer.track_usage = False
        yield
    finally:
        for layer, forward, track in saved:
            if forward is None:
                layer.__dict__.pop("forward", None)
            else:
                layer.forward = forward
            layer.track_usage = track


@contextlib.contextmanager
def soft_routing(model: nn.Module, temperature: float | Mapping[str, float] = 1.0) -> Iterator[nn.Module]:
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
            model; large T to an even mixture. Or {MoE layer name: T} with an entry for every MoE layer,
            e.g. from :func:`calibrated_temperatures` (what ``advmoe.eval`` uses).

    Yields:
        The model.

    Raises:
        ValueError: the model has no MoE layer, or a bad temperature (a dict missing a layer included).
    """
    from advmoe.nn import moe_layers

    layers = moe_layers(model)
    if not layers:
        raise ValueError("soft_routing needs a model with SparseMoEConv2d layers (advmoe.nn); this model has none")
    if isinstance(temperature, Mapping):
        missing = [name for name, _ in layers if name not in temperature]
        if missing:
            raise ValueError(f"temperature has no entry for MoE layer(s) {missing}")
        per_layer = {name: _check_temperature(temperature[name], f"temperature[{name!r}]") for name, _ in layers}
    else:
        value = _check_temperature(temperature, "temperature")
        per_layer = {name: value for name, _ in layers}
    with _patched(layers, lambda name, layer: functools.partial(_soft_forward, layer, per_layer[name])):
        yield model
