"""The attack of the research code's AdvMoE recipe, used when ``train.router_loss = "research"``.

L-inf PGD from a small Gaussian start (0.001 * N(0, 1), as TRADES) that maximises
KL(f(x) || f(x_adv)) + sum over routers of KL(s(x) || s(x_adv)) (router scores s), computed stably
from logits (research ``train_moe.py`` lines 49-69 and 110-130). Used by both AdvMoE steps in that recipe,
as in the research code. The research code sums each KL over the batch and we average it; the two terms
keep their 1:1 ratio, and the sign step does not depend on a common positive factor.
"""

from __future__ import annotations

import torch
from torch import nn

from advmoe.nn import forward_with_aux
from advmoe.train.losses import kl_from_logits

__all__ = ["research_attack"]


def research_attack(
    model: nn.Module,
    x: torch.Tensor,
    eps: float,
    alpha: float,
    steps: int,
    router_targets: dict[str, torch.Tensor] | None = None,
) -> torch.Tensor:
    """Adversarial examples against the model's outputs and its routers' scores.

    Args:
        model: model with routers (``advmoe.nn`` interface); its mode and parameter grads are not changed.
        x: (B, C, H, W) clean inputs in [0, 1].
        eps: L-inf budget.
        alpha: step size.
        steps: iterations.
        router_targets: router name -> (B, E) clean router scores to move away from (the research code
            computes them once per batch in train mode, ``train_moe.py`` line 39); None: the scores of
            the clean forward in the model's current mode.

    Returns:
        (B, C, H, W) adversarial inputs in [0, 1] within ``eps`` of ``x`` (detached).
    """
    x = x.detach()
    with torch.no_grad():
        logits_nat, aux_nat = forward_with_aux(model, x)
        routers_nat = {k: v.detach() for k, v in (router_targets or aux_nat.router_logits).items()}
    x_adv = x + 0.001 * torch.randn_like(x)  # research line 49: the start is not clipped
    params = [p for p in model.parameters() if p.requires_grad]
    saved = [p.requires_grad for p in params]
    for p in params:
        p.requires_grad_(False)
    try:
        for _ in range(steps):
            x_adv.requires_grad_(True)
            with torch.enable_grad():
                logits_adv, aux_adv = forward_with_aux(model, x_adv)
                loss = kl_from_logits(logits_adv, logits_nat.detach())
                for name, scores in routers_nat.items():
                    loss = loss + kl_from_logits(aux_adv.router_logits[name], scores)
                (grad,) = torch.autograd.grad(loss, [x_adv])
            x_adv = x_adv.detach() + alpha * grad.sign()
            x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0)
    finally:
        for p, req in zip(params, saved, strict=True):
            p.requires_grad_(req)
    return x_adv.detach()
