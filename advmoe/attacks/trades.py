"""The TRADES inner maximisation (Zhang et al. 2019): move the output distribution away from the clean one."""

from __future__ import annotations

import torch
from torch import nn

from advmoe.attacks._common import ascend, check_attack_args, frozen_params, project
from advmoe.attacks.losses import kl_loss

__all__ = ["trades_pgd"]

START_STD = 0.001  # TRADES' small Gaussian start


def trades_pgd(
    model: nn.Module,
    x: torch.Tensor,
    eps: float,
    alpha: float,
    steps: int,
    norm: str = "linf",
    generator: torch.Generator | None = None,
    logits_nat: torch.Tensor | None = None,
) -> torch.Tensor:
    """PGD that maximises ``KL(softmax(f(x)) || softmax(f(x_adv)))`` (no labels needed).

    Starts at ``x + 0.001 * N(0, 1)`` as TRADES does. The KL is computed from log-probabilities on both
    sides, so it never underflows to NaN. The model's mode and parameters' ``requires_grad`` are restored.

    Args:
        model: module mapping x to logits (B, K).
        x: (B, ...) clean inputs in [0, 1].
        eps: budget in ``norm``.
        alpha: step size.
        steps: iterations.
        norm: ``"linf"`` or ``"l2"``.
        generator: random generator for the start.
        logits_nat: (B, K) clean logits if already computed (else one forward pass computes them).

    Returns:
        (B, ...) adversarial inputs (detached) in the eps-ball and [0, 1].
    """
    check_attack_args(model, x, None, eps, alpha, steps, norm)
    x = x.detach()
    if x.shape[0] == 0 or eps == 0:
        return x.clone()
    with frozen_params(model):
        if logits_nat is None:
            with torch.no_grad():
                logits_nat = model(x)
        target = logits_nat.detach()
        noise = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        start = project(x + START_STD * noise, x, eps, norm)
        return ascend(lambda x_adv: kl_loss(model(x_adv), target).sum(), x, start, eps, alpha, steps, norm)
