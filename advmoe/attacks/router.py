"""Router-targeted attack: perturb the input so that the MoE model routes it through other experts."""

from __future__ import annotations

import torch
from torch import nn

from advmoe.attacks._common import (
    ascent_step,
    check_attack_args,
    frozen_params,
    input_grad,
    project,
)
from advmoe.attacks._common import random_start as uniform_start

__all__ = ["routing_changes", "router_attack"]


def routing_changes(clean: dict[str, torch.Tensor], adv: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per sample, the number of MoE layers whose set of chosen experts differs.

    Args:
        clean: per MoE layer name, (B, k) expert indices on clean inputs.
        adv: the same on perturbed inputs.

    Returns:
        (B,) int64 counts in [0, number of layers].
    """
    counts = None
    for name, idx in clean.items():
        changed = (idx.sort(dim=1).values != adv[name].sort(dim=1).values).any(dim=1).long()
        counts = changed if counts is None else counts + changed
    if counts is None:
        raise ValueError("no routing decisions to compare (the model has no MoE layers)")
    return counts


def _router_k(name: str, routing: dict[str, torch.Tensor]) -> int:
    """k of a router: its layer's k for a per-layer router ("<layer>.router"), else the first layer's."""
    layer = name[: -len(".router")] if name.endswith(".router") else None
    if layer is not None and layer in routing:
        return routing[layer].shape[1]
    return next(iter(routing.values())).shape[1] if routing else 1


def _top_k_mask(scores: torch.Tensor, k: int) -> torch.Tensor:
    """(B, E) bool mask of the k largest scores per row."""
    mask = torch.zeros_like(scores, dtype=torch.bool)
    return mask.scatter_(1, scores.topk(min(k, scores.shape[1]), dim=1).indices, True)


def _switch_loss(scores: torch.Tensor, chosen: torch.Tensor) -> torch.Tensor:
    """Sum over the batch of logsumexp(scores[~chosen]) - logsumexp(scores[chosen]); 0 if all are chosen."""
    if bool(chosen.all()):
        return scores.sum() * 0.0
    s = scores.float()
    neg_inf = torch.finfo(s.dtype).min
    return (s.masked_fill(chosen, neg_inf).logsumexp(1) - s.masked_fill(~chosen, neg_inf).logsumexp(1)).sum()


def router_attack(
    model: nn.Module,
    x: torch.Tensor,
    eps: float,
    alpha: float,
    steps: int,
    norm: str = "linf",
    random_start: bool = True,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """PGD that maximises the change of the routing decisions, for router-robustness analysis.

    The loss, summed over every router of the model (``advmoe.nn.forward_with_aux``) and the batch, is
    ``logsumexp(s[unchosen]) - logsumexp(s[chosen])`` on the perturbed router scores s, where "chosen" are
    the router's clean top-k experts: it moves score mass from the clean choice to the other experts
    (for top-1 this is the cross-entropy against the clean expert, up to a constant). Per sample the
    iterate that changes the routing of the most MoE layers is returned (the last one on ties), so the
    result is at least as disruptive as any intermediate point.

    Args:
        model: an MoE model (``advmoe.nn`` interface) returning logits; mode and ``requires_grad`` restored.
        x: (B, C, H, W) clean inputs in [0, 1].
        eps: budget in ``norm``.
        alpha: step size.
        steps: iterations.
        norm: ``"linf"`` or ``"l2"``.
        random_start: start from a random point of the ball.
        generator: random generator for the start.

    Returns:
        (B, C, H, W) perturbed inputs (detached) in the eps-ball and [0, 1].

    Raises:
        ValueError: the model has no router (a dense model, or routing frozen).
    """
    from advmoe.nn import forward_with_aux

    check_attack_args(model, x, None, eps, alpha, steps, norm)
    x = x.detach()
    with frozen_params(model):
        with torch.no_grad():
            _, aux = forward_with_aux(model, x)
        if not aux.router_logits:
            raise ValueError("router_attack needs a model with routers (advmoe.nn); this model has none")
        clean_routing = {k: v.detach() for k, v in aux.routing.items()}
        chosen = {
            name: _top_k_mask(scores.detach(), _router_k(name, aux.routing))
            for name, scores in aux.router_logits.items()
        }
        if x.shape[0] == 0 or eps == 0:
            return x.clone()
        best = x.clone()
        best_count = torch.zeros(x.shape[0], dtype=torch.long, device=x.device)
        x_adv = uniform_start(x, eps, norm, generator) if random_start else x.clone()
        with torch.enable_grad():
            for step in range(steps + 1):
                x_adv.requires_grad_(step < steps)
                _, aux_adv = forward_with_aux(model, x_adv)
                count = routing_changes(clean_routing, aux_adv.routing)
                better = count >= best_count
                best[better] = x_adv.detach()[better]
                best_count = torch.where(better, count, best_count)
                if step == steps:
                    break
                loss = sum(_switch_loss(scores, chosen[name]) for name, scores in aux_adv.router_logits.items())
                grad = input_grad(loss, x_adv)
                x_adv = project(ascent_step(x_adv.detach(), grad, alpha, norm), x, eps, norm)
    return best.detach()
