"""Small models shared by the attack tests: a digits MLP trained in about a second, and helpers."""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F
from torch import nn

from advmoe.data import build_dataset


@lru_cache(maxsize=1)
def digits_8x8() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train (N, 1, 8, 8), y_train, x_test (360, 1, 8, 8), y_test) in [0, 1]."""
    train = build_dataset("digits", split="train", size=8, channels=1)
    test = build_dataset("digits", split="test", size=8, channels=1)
    return train.images, train.targets, test.images, test.targets


def _train(model: nn.Module, steps: int = 150, lr: float = 0.02) -> nn.Module:
    x, y, _, _ = digits_8x8()
    torch.manual_seed(0)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    for _ in range(steps):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    opt.zero_grad(set_to_none=True)
    return model.eval()


@lru_cache(maxsize=1)
def trained_mlp() -> nn.Module:
    """A 64-32-10 MLP trained full-batch on 8x8 digits (about 95% test accuracy), in eval mode."""
    torch.manual_seed(0)
    return _train(nn.Sequential(nn.Flatten(), nn.Linear(64, 32), nn.ReLU(), nn.Linear(32, 10)))


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return (model(x).argmax(dim=1) == y).float().mean().item()


def small_cnn(num_classes: int = 10, in_channels: int = 1) -> nn.Module:
    """An untrained conv net with batch norm and dropout (for mode / requires_grad / buffer checks)."""
    torch.manual_seed(0)
    return nn.Sequential(
        nn.Conv2d(in_channels, 4, 3, padding=1),
        nn.BatchNorm2d(4),
        nn.ReLU(),
        nn.Dropout(0.2),
        nn.AdaptiveAvgPool2d(2),
        nn.Flatten(),
        nn.Linear(16, num_classes),
    )
