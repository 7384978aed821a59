"""Projected gradient descent (Madry et al. 2018) in the L-inf or L2 ball, on [0, 1] inputs."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from advmoe.attacks._common import ascent_step, check_attack_args, frozen_params, input_grad, project
from advmoe.attacks._common import random_start as uniform_start
from advmoe.attacks.losses import resolve_loss

__all__ = ["pgd"]


def _per_sample(value: torch.Tensor, batch: int) -> torch.Tensor:
    if value.dim() == 0:
        return value
    if value.shape != (batch,):
        raise ValueError(f"the attack loss must return a scalar or shape ({batch},), got {tuple(value.shape)}")
    return value


def pgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    alpha: float,
    steps: int,
    random_start: bool = True,
    norm: str = "linf",
    loss: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "ce",
    restarts: int = 1,
    generator: torch.Generator | None = None,
    track_success: bool = False,
) -> torch.Tensor:
    """Untargeted PGD: maximise ``loss(model(x_adv), y)`` over the eps-ball around ``x`` within [0, 1].

    With one restart and ``track_success=False`` this is textbook PGD (the last iterate is returned), as
    adversarial training uses it. For evaluation, ``restarts > 1`` keeps per sample the worst restart: one
    whose final point is misclassified if any, else the one with the highest final loss;
    ``track_success=True`` also keeps the first misclassified iterate of any step.

    The model's train/eval mode and its parameters' ``requires_grad`` are left as found and no parameter
    ``.grad`` is written (only input gradients are taken).

    Args:
        model: any module mapping x to logits (B, K).
        x: (B, ...) clean inputs in [0, 1].
        y: (B,) int64 labels.
        eps: budget (L-inf: max absolute change per element; L2: max per-sample L2 norm).
        alpha: step size (L-inf: per-element step; L2: step length).
        steps: iterations (0: the random start, or x itself).
        random_start: start from a uniformly random point of the ball (else from x).
        norm: ``"linf"`` or ``"l2"``.
        loss: ``"ce"`` (cross-entropy), ``"cw"`` (CW margin ``max_{j!=y} z_j - z_y``), ``"dlr"``, or a callable
            ``(logits (B, K), y (B,)) -> (B,) or scalar`` to maximise.
        restarts: independent random restarts (>= 1).
        generator: random generator for the starts (on x's device).
        track_success: keep the first misclassified iterate of every sample.

    Returns:
        (B, ...) adversarial inputs (detached), ``|x_adv - x| <= eps`` in the chosen norm and in [0, 1].
    """
    check_attack_args(model, x, y, eps, alpha, steps, norm)
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"restarts must be an int >= 1, got {restarts!r}")
    loss_fn = resolve_loss(loss)
    x = x.detach()
    batch = x.shape[0]
    if batch == 0 or eps == 0:
        return x.clone()
    select = restarts > 1 or track_success
    best = x.clone()
    best_loss = torch.full((batch,), float("-inf"), device=x.device)
    fooled = torch.zeros(batch, dtype=torch.bool, device=x.device)

    def keep(points: torch.Tensor, logits: torch.Tensor, values: torch.Tensor | None) -> None:
        nonlocal fooled
        newly = (logits.argmax(dim=1) != y) & ~fooled
        best[newly] = points[newly]
        fooled = fooled | newly
        if values is not None:
            better = ~fooled & (values.detach() > best_loss)
            best[better] = points[better]
            best_loss[better] = values.detach()[better].float()

    with frozen_params(model), torch.enable_grad():
        for _ in range(restarts):
            x_adv = uniform_start(x, eps, norm, generator) if random_start else x.clone()
            for _ in range(steps):
                x_adv.requires_grad_(True)
                logits = model(x_adv)
                values = _per_sample(loss_fn(logits, y), batch)
                grad = input_grad(values.sum(), x_adv)
                x_adv = x_adv.detach()
                if track_success:
                    keep(x_adv, logits.detach(), None)
                x_adv = project(ascent_step(x_adv, grad, alpha, norm), x, eps, norm)
            if not select:
                return x_adv.detach()
            with torch.no_grad():
                logits = model(x_adv)
                values = _per_sample(loss_fn(logits, y), batch)
            if values.dim() == 0:  # a scalar loss cannot rank samples: the latest restart wins ties
                values = torch.full((batch,), float("inf"), device=x.device)
            keep(x_adv, logits, values)
    return best.detach()
