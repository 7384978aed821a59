"""Shared pieces of the attacks: argument checks, the model guard, eps-ball projection, random starts and the
projected steepest-ascent loop."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterator

import torch
from torch import nn

NORMS = ("linf", "l2")


def check_attack_args(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor | None,
    eps: float,
    alpha: float | None,
    steps: int | None,
    norm: str,
) -> None:
    """Raises a ValueError/TypeError naming the bad argument."""
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(x, torch.Tensor) or not x.is_floating_point():
        raise TypeError(f"x must be a floating point tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    if x.dim() < 2:
        raise ValueError(f"x must be batched, (B, C, H, W) or (B, D), got shape {tuple(x.shape)}")
    if y is not None:
        if not isinstance(y, torch.Tensor) or y.dtype != torch.int64:
            raise TypeError(f"y must be an int64 tensor of labels, got {getattr(y, 'dtype', type(y).__name__)}")
        if y.shape != (x.shape[0],):
            raise ValueError(f"y must have shape ({x.shape[0]},) to match x, got {tuple(y.shape)}")
        if y.device != x.device:
            raise ValueError(f"y is on {y.device} but x is on {x.device}")
    if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not math.isfinite(eps) or eps < 0:
        raise ValueError(f"eps must be a finite number >= 0, got {eps!r}")
    if alpha is not None and (
        isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha) or alpha < 0
    ):
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha!r}")
    if steps is not None and (isinstance(steps, bool) or not isinstance(steps, int) or steps < 0):
        raise ValueError(f"steps must be an int >= 0, got {steps!r}")
    if norm not in NORMS:
        raise ValueError(f"norm must be one of {list(NORMS)}, got {norm!r}")
    if x.numel() and (x.min() < -1e-6 or x.max() > 1 + 1e-6):
        raise ValueError("x must hold images in [0, 1] (models normalise inside; attacks work in pixel space)")


@contextlib.contextmanager
def frozen_params(model: nn.Module, gate_gradient: bool = False) -> Iterator[None]:
    """Inside: no parameter requires grad (attacks need only input gradients), the model's train/eval
    mode is watched, and MoE gates carry no straight-through gradient unless ``gate_gradient``
    (``advmoe.nn.gate_gradient``: the estimator's term is not the model's gradient and masks attacks). On
    exit every parameter's ``requires_grad``, every module's mode and the gate setting are restored."""
    from advmoe.nn.routing import gate_gradient as gate_context

    params = list(model.parameters())
    saved = [p.requires_grad for p in params]
    modes = [(m, m.training) for m in model.modules()]
    try:
        for p in params:
            p.requires_grad_(False)
        with gate_context(gate_gradient):
            yield
    finally:
        for p, req in zip(params, saved, strict=True):
            p.requires_grad_(req)
        for m, training in modes:
            m.training = training


def _flat_norm(t: torch.Tensor) -> torch.Tensor:
    """Per-sample L2 norm, shaped (B, 1, ..., 1) for broadcasting."""
    return t.flatten(1).norm(dim=1).view(-1, *([1] * (t.dim() - 1)))


def project(x_adv: torch.Tensor, x: torch.Tensor, eps: float, norm: str) -> torch.Tensor:
    """Projects ``x_adv`` onto the eps-ball around ``x`` intersected with [0, 1]."""
    delta = x_adv - x
    if norm == "linf":
        delta = delta.clamp(-eps, eps)
    else:
        delta = delta * (eps / _flat_norm(delta).clamp_min(1e-12)).clamp(max=1.0)
    return (x + delta).clamp(0.0, 1.0)


def random_start(x: torch.Tensor, eps: float, norm: str, generator: torch.Generator | None) -> torch.Tensor:
    """A uniformly random point of the eps-ball around ``x`` (clipped to [0, 1])."""
    if norm == "linf":
        noise = torch.rand(x.shape, generator=generator, device=x.device, dtype=x.dtype) * 2 - 1
        delta = noise * eps
    else:
        d = x[0].numel()
        direction = torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)
        direction = direction / _flat_norm(direction).clamp_min(1e-12)
        radius = torch.rand((x.shape[0],), generator=generator, device=x.device, dtype=x.dtype) ** (1.0 / d)
        delta = direction * (eps * radius).view(-1, *([1] * (x.dim() - 1)))
    return (x + delta).clamp(0.0, 1.0)


def ascent_step(x_adv: torch.Tensor, grad: torch.Tensor, alpha: float | torch.Tensor, norm: str) -> torch.Tensor:
    """One steepest-ascent step (sign for L-inf, normalised gradient for L2).

    ``alpha`` is the step size: a float or a per-sample (B, 1, ..., 1) tensor.
    """
    if norm == "linf":
        return x_adv + alpha * grad.sign()
    return x_adv + alpha * grad / _flat_norm(grad).clamp_min(1e-12)


def input_grad(loss: torch.Tensor, x_adv: torch.Tensor) -> torch.Tensor:
    """d loss / d x_adv; zeros if the loss does not depend on the input (e.g. fully masked)."""
    if not loss.requires_grad:
        return torch.zeros_like(x_adv)
    (grad,) = torch.autograd.grad(loss, [x_adv], allow_unused=True)
    return torch.zeros_like(x_adv) if grad is None else grad


def ascend(
    loss_fn: Callable[[torch.Tensor], torch.Tensor],
    x: torch.Tensor,
    x_adv: torch.Tensor,
    eps: float,
    alpha: float,
    steps: int,
    norm: str,
) -> torch.Tensor:
    """``steps`` projected steepest-ascent steps on a scalar loss of the input, from ``x_adv``.

    Each step computes ``d loss_fn(x_adv) / d x_adv``, takes :func:`ascent_step` and projects onto the
    eps-ball around ``x`` intersected with [0, 1] (:func:`project`). The start itself is not projected.

    Args:
        loss_fn: (B, ...) inputs -> scalar loss to maximise (run with grad enabled).
        x: (B, ...) clean inputs (the centre of the ball).
        x_adv: (B, ...) starting point.
        eps: budget in ``norm``.
        alpha: step size.
        steps: iterations (0 returns the start).
        norm: ``"linf"`` or ``"l2"``.

    Returns:
        (B, ...) the last iterate (detached).
    """
    with torch.enable_grad():
        for _ in range(steps):
            x_adv = x_adv.detach().requires_grad_(True)
            grad = input_grad(loss_fn(x_adv), x_adv)
            x_adv = project(ascent_step(x_adv.detach(), grad, alpha, norm), x, eps, norm)
    return x_adv.detach()
