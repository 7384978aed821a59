"""The attack of the research code's AdvMoE recipe, used when ``train.router_loss = "research"``.

L-inf PGD from a small Gaussian start (0.001 * N(0, 1), as TRADES; not clipped) that maximises
KL(f(x) || f(x_adv)) + sum over routers of KL(s(x) || s(x_adv)) (router scores s), computed stably
from logits (research ``train_moe.py`` lines 49-69 and 110-130). Used by both AdvMoE steps in that recipe,
as in the research code. The research code sums each KL over the batch and we average it; the two terms
keep their 1:1 ratio, and the sign step does not depend on a common positive factor. The steps are the
toolbox's projected sign steps (``advmoe.attacks._common.ascend``).
"""

from __future__ import annotations

import torch
from torch import nn

from advmoe.attacks._common import ascend, frozen_params
from advmoe.attacks.losses import kl_loss

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

    The start uses the global torch RNG (``torch.randn_like``), as the research code does.

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
    from advmoe.nn import forward_with_aux

    x = x.detach()
    with torch.no_grad():
        logits_nat, aux_nat = forward_with_aux(model, x)
        routers_nat = {k: v.detach() for k, v in (router_targets or aux_nat.router_logits).items()}

    def objective(x_adv: torch.Tensor) -> torch.Tensor:
        logits_adv, aux_adv = forward_with_aux(model, x_adv)
        loss = kl_loss(logits_adv, logits_nat).mean()
        for name, scores in routers_nat.items():
            loss = loss + kl_loss(aux_adv.router_logits[name], scores).mean()
        return loss

    start = x + 0.001 * torch.randn_like(x)  # research line 49: the start is not clipped
    # the research code's attack differentiates through its straight-through GetMask gate; kept, to follow it
    with frozen_params(model, gate_gradient=True):
        return ascend(objective, x, start, eps, alpha, steps, "linf")
