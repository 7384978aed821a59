"""Auto-PGD (APGD, Croce & Hein, ICML 2020): PGD with momentum and a budget-aware step-size schedule.

Per sample: the step size starts at 2 * eps; at checkpoints (the first after 22% of the iterations,
then intervals shrinking by 3% down to 6%) it is halved, and the iterate reset to the best point so far,
when the loss rose in fewer than 75% of the steps since the last checkpoint, or when the step size was
not halved at the last checkpoint and the best loss has not improved since. Steps use momentum 0.75.
Own implementation written from the paper; the official code is github.com/fra31/auto-attack.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from advmoe.attacks._common import ascent_step, check_attack_args, frozen_params, input_grad, project
from advmoe.attacks._common import random_start as uniform_start
from advmoe.attacks.losses import dlr_targeted_loss, resolve_loss

__all__ = ["apgd", "apgd_targeted", "step_schedule"]

MOMENTUM = 0.75
RHO = 0.75  # condition 1: the loss must have risen in at least this share of the steps since the last checkpoint


def step_schedule(n_iter: int) -> tuple[int, int, int]:
    """(first checkpoint interval, interval decrement, minimum interval) in iterations, as in the paper."""
    return max(int(0.22 * n_iter), 1), max(int(0.03 * n_iter), 1), max(int(0.06 * n_iter), 1)


def _apgd_run(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    norm: str,
    n_iter: int,
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    generator: torch.Generator | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One APGD run from a random start. Returns (best point, its loss (B,), misclassified-found (B,) bool);
    for samples where a misclassified iterate was found, the best point is that iterate."""
    batch = x.shape[0]
    shape = (batch,) + (1,) * (x.dim() - 1)

    def evaluate(points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        points = points.detach().requires_grad_(True)
        with torch.enable_grad():
            logits = model(points)
            values = loss_fn(logits)
            grad = input_grad(values.sum(), points)
        return values.detach(), grad, logits.detach().argmax(dim=1) != y

    x_adv = uniform_start(x, eps, norm, generator)
    loss, grad, wrong = evaluate(x_adv)
    found = wrong.clone()
    x_found = x_adv.clone()
    x_best, loss_best, grad_best = x_adv.clone(), loss.clone(), grad.clone()
    step = torch.full(shape, 2.0 * eps, device=x.device, dtype=x.dtype)
    interval, decrement, min_interval = step_schedule(n_iter)
    since_check, rises = 0, torch.zeros(batch, device=x.device)
    loss_at_check = loss_best.clone()
    halved_at_check = torch.ones(batch, dtype=torch.bool, device=x.device)
    x_prev = x_adv.clone()
    for i in range(n_iter):
        a = MOMENTUM if i > 0 else 1.0
        momentum = x_adv - x_prev
        x_prev = x_adv
        z = project(ascent_step(x_adv, grad, step, norm), x, eps, norm)  # plain projected step
        x_adv = project(x_adv + a * (z - x_adv) + (1 - a) * momentum, x, eps, norm)
        new_loss, grad, wrong = evaluate(x_adv)
        newly = wrong & ~found
        x_found[newly] = x_adv[newly]
        found |= wrong
        rises += (new_loss > loss).float()
        loss = new_loss
        improved = loss > loss_best
        x_best[improved], grad_best[improved], loss_best[improved] = x_adv[improved], grad[improved], loss[improved]
        since_check += 1
        if since_check == interval:
            oscillating = rises <= interval * RHO
            stalled = ~halved_at_check & (loss_at_check >= loss_best)
            halve = oscillating | stalled
            halved_at_check = halve
            loss_at_check = loss_best.clone()
            step[halve] /= 2.0
            x_adv = x_adv.clone()
            x_adv[halve], grad[halve] = x_best[halve], grad_best[halve]
            since_check, rises = 0, torch.zeros_like(rises)
            interval = max(interval - decrement, min_interval)
    out = torch.where(found.view(shape), x_found, x_best)
    return out, loss_best, found


def _check_apgd(model, x, y, eps, norm, n_iter, restarts) -> None:
    check_attack_args(model, x, y, eps, None, n_iter, norm)
    if isinstance(restarts, bool) or not isinstance(restarts, int) or restarts < 1:
        raise ValueError(f"restarts must be an int >= 1, got {restarts!r}")


def apgd(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    eps: float,
    norm: str = "linf",
    n_iter: int = 100,
    loss: str | Callable[[torch.Tensor, torch.Tensor], torch.Tensor] = "ce",
    restarts: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Untargeted APGD (APGD-CE with ``loss="ce"``, APGD-DLR with ``loss="dlr"``).

    Args:
        model: module mapping x to logits (B, K); mode and ``requires_grad`` restored, no ``.grad`` written.
        x: (B, ...) clean inputs in [0, 1].
        y: (B,) int64 labels.
        eps: budget in ``norm``.
        norm: ``"linf"`` or ``"l2"``.
        n_iter: iterations per restart.
        loss: ``"ce"``, ``"dlr"``, ``"cw"`` or a callable ``(logits, y) -> (B,)``.
        restarts: random restarts; later restarts only run on samples not yet misclassified.
        generator: random generator for the starts.

    Returns:
        (B, ...) per sample a misclassified point if one was found, else the highest-loss point.
    """
    _check_apgd(model, x, y, eps, norm, n_iter, restarts)
    loss_fn = resolve_loss(loss)
    return _restarted(model, x, y, eps, norm, n_iter, restarts, lambda logits, idx: loss_fn(logits, y[idx]), generator)


def apgd_targeted(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    target: torch.Tensor,
    eps: float,
    norm: str = "linf",
    n_iter: int = 100,
    restarts: int = 1,
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """APGD on the targeted DLR loss towards ``target`` (B,) int64 (needs >= 4 classes); as :func:`apgd`."""
    _check_apgd(model, x, y, eps, norm, n_iter, restarts)
    if target.shape != y.shape:
        raise ValueError(f"target must have the shape of y {tuple(y.shape)}, got {tuple(target.shape)}")

    def loss_fn(logits, idx):
        return dlr_targeted_loss(logits, y[idx], target[idx])

    return _restarted(model, x, y, eps, norm, n_iter, restarts, loss_fn, generator)


def _restarted(model, x, y, eps, norm, n_iter, restarts, loss_fn, generator) -> torch.Tensor:
    x = x.detach()
    if x.shape[0] == 0 or eps == 0:
        return x.clone()
    best = x.clone()
    best_loss = torch.full((x.shape[0],), float("-inf"), device=x.device)
    found = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    with frozen_params(model):
        for _ in range(restarts):
            idx = (~found).nonzero().squeeze(1)
            if idx.numel() == 0:
                break
            point, value, wrong = _apgd_run(
                model, x[idx], y[idx], eps, norm, n_iter, lambda logits, idx=idx: loss_fn(logits, idx), generator
            )
            take = wrong | (value > best_loss[idx])
            best[idx[take]] = point[take]
            best_loss[idx[take]] = value[take]
            found[idx[wrong]] = True
    return best
