"""Honest-evaluation checks, in the spirit of AutoAttack's: warn when a robustness number can be fooled.

``check_evaluation_setup`` looks at the model on one batch: train mode, randomised outputs, outputs that
are probabilities instead of logits, non-finite values, and inputs whose loss gradient is exactly zero (a
hard top-k gate or a masking defence: gradient attacks then overstate robustness).
``check_black_box`` warns when a gradient-free attack is stronger than the gradient attacks.
"""

from __future__ import annotations

import warnings

import torch
import torch.nn.functional as F
from torch import nn

from advmoe.attacks._common import check_attack_args, frozen_params

__all__ = ["EvaluationWarning", "check_black_box", "check_evaluation_setup", "check_model_for_eval"]


class EvaluationWarning(UserWarning):
    """A robustness evaluation may be unreliable."""


def _warn(messages: list[str], text: str) -> None:
    messages.append(text)
    warnings.warn(text, EvaluationWarning, stacklevel=3)


def check_evaluation_setup(model: nn.Module, x: torch.Tensor, y: torch.Tensor | None = None) -> list[str]:
    """Checks a model and a batch before a robustness evaluation; warns (``EvaluationWarning``) per problem.

    The model is not changed: its mode, parameters' ``requires_grad``, ``.grad`` and buffers (e.g.
    batch-norm running statistics, which a forward pass in train mode would update) are as before.

    Args:
        model: module mapping x to logits (B, K).
        x: (B, ...) inputs in [0, 1] (a few dozen samples are enough).
        y: (B,) int64 labels (None: the model's predictions).

    Returns:
        The warning messages (empty if nothing was found).
    """
    check_attack_args(model, x, y, 0.0, None, None, "linf")
    messages: list[str] = []
    if x.shape[0] == 0:
        return messages
    training = [name or "<model>" for name, m in model.named_modules() if m.training]
    if training:
        _warn(
            messages,
            f"model has modules in train mode ({', '.join(training[:3])}{', ...' if len(training) > 3 else ''}): "
            "batch norm uses batch statistics and dropout is random; call model.eval() before evaluating",
        )
    buffers = {name: b.detach().clone() for name, b in model.named_buffers()}
    try:
        with frozen_params(model):
            with torch.no_grad():
                first = model(x).float()
                second = model(x).float()
            x_req = x.detach().clone().requires_grad_(True)
            with torch.enable_grad():
                logits = model(x_req)
                labels = first.argmax(dim=1) if y is None else y
                loss = F.cross_entropy(logits.float(), labels, reduction="sum")
                grad = torch.autograd.grad(loss, [x_req], allow_unused=True)[0] if loss.requires_grad else None
    finally:
        state = dict(model.named_buffers())
        with torch.no_grad():
            for name, value in buffers.items():
                state[name].copy_(value)
    if not torch.isfinite(first).all():
        _warn(messages, "model outputs contain NaN or inf; attacks and accuracies are meaningless")
        return messages
    scale = first.abs().max().clamp_min(1e-6)
    if (first - second).abs().max() > 1e-4 * scale:
        _warn(
            messages,
            "two forward passes on the same input differ: the model is randomised; gradient attacks need "
            "Expectation over Transformation and robust accuracy must be averaged over several runs",
        )
    rows_sum_to_one = torch.allclose(first.sum(dim=1), torch.ones_like(first[:, 0]), atol=1e-3)
    if first.shape[1] > 1 and (first >= 0).all() and rows_sum_to_one:
        _warn(
            messages,
            "model outputs are non-negative and every row sums to 1: they look like probabilities, not logits; "
            "the CE and CW losses of the attacks then have tiny or vanishing gradients (return logits instead)",
        )
    if grad is None:
        _warn(messages, "the loss does not depend on the input: gradient attacks cannot work on this model")
        return messages
    if not torch.isfinite(grad).all():
        _warn(messages, "input gradients contain NaN or inf: gradient attacks will fail silently")
        return messages
    zero = (grad.flatten(1).abs().amax(dim=1) == 0).float().mean().item()
    if zero > 0:
        _warn(
            messages,
            f"{zero:.0%} of the samples have an exactly zero input gradient (e.g. a hard gate or masking): gradient "
            "attacks overstate robustness there; also run per-pathway attacks and a black-box attack",
        )
    return messages


check_model_for_eval = check_evaluation_setup


def check_black_box(
    robust_gradient: torch.Tensor, robust_black_box: torch.Tensor, name: str = "black-box"
) -> list[str]:
    """Warns if a gradient-free attack fools samples that the gradient attacks could not.

    Args:
        robust_gradient: (N,) bool, sample survived all gradient attacks.
        robust_black_box: (N,) bool, sample survived the black-box attack.
        name: the black-box attack's name, for the message.

    Returns:
        The warning messages (empty if the gradient attacks were at least as strong).
    """
    if robust_gradient.shape != robust_black_box.shape:
        raise ValueError(
            f"robust_gradient {tuple(robust_gradient.shape)} and robust_black_box "
            f"{tuple(robust_black_box.shape)} must have the same shape"
        )
    messages: list[str] = []
    extra = (robust_gradient.bool() & ~robust_black_box.bool()).sum().item()
    if extra:
        _warn(
            messages,
            f"{name} fooled {extra} sample(s) that every gradient attack missed: gradients are likely masked, so the "
            "gradient-based robust accuracy is overstated",
        )
    return messages
