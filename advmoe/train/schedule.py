"""Optimizers and per-step learning-rate schedules.

The learning rate is a pure function of the global step (no scheduler object to save), so a resumed run
sets exactly the same rates as an uninterrupted one.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch

from advmoe.train.config import OptimizerConfig

__all__ = ["build_optimizer", "lr_at", "set_lr"]


def build_optimizer(
    params: Iterable[torch.nn.Parameter], cfg: OptimizerConfig, masked_decay: Iterable[torch.nn.Parameter] = ()
) -> torch.optim.Optimizer:
    """SGD (momentum, weight decay, optional Nesterov) or Adam over ``params``.

    Args:
        params: the parameters.
        cfg: the optimizer settings.
        masked_decay: parameters among ``params`` whose weight decay the caller applies itself (per expert
            row, see ``Strategy``): they go to a second group with ``weight_decay=0`` that records the
            configured value as ``"masked_decay"``.

    Raises:
        ValueError: ``params`` is empty.
    """
    params = list(params)
    if not params:
        raise ValueError("cannot build an optimizer over an empty parameter list")
    masked = {id(p) for p in masked_decay}
    groups = [{"params": [p for p in params if id(p) not in masked]}]
    if masked and cfg.weight_decay > 0:
        groups.append({"params": [p for p in params if id(p) in masked], "weight_decay": 0.0})
        groups[-1]["masked_decay"] = cfg.weight_decay
    else:
        groups[0]["params"] = params
    groups = [g for g in groups if g["params"]]
    if cfg.name == "sgd":
        return torch.optim.SGD(
            groups, lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay, nesterov=cfg.nesterov
        )
    return torch.optim.Adam(groups, lr=cfg.lr, weight_decay=cfg.weight_decay)


def lr_at(cfg: OptimizerConfig, step: int, total_steps: int, steps_per_epoch: int) -> float:
    """Learning rate for the optimisation step ``step`` (0-based) of ``total_steps``.

    Args:
        cfg: optimizer config (peak ``lr``, ``schedule``, ``warmup_epochs``).
        step: global step about to be taken.
        total_steps: steps in the whole run (epochs x steps per epoch).
        steps_per_epoch: steps in one epoch (for the warm-up length).

    Returns:
        The learning rate: linear warm-up, then ``cosine`` (``lr * (1 + cos(pi * t / T)) / 2``), ``step``
        (x0.1 from 75% and x0.01 from 90% of training) or ``constant``.
    """
    warmup = int(round(cfg.warmup_epochs * steps_per_epoch))
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, total_steps - warmup)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    if cfg.schedule == "step":
        return cfg.lr * (0.01 if progress >= 0.9 else 0.1 if progress >= 0.75 else 1.0)
    return cfg.lr


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Set the learning rate of every parameter group."""
    for group in optimizer.param_groups:
        group["lr"] = lr
