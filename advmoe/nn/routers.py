"""Routers: the research code's CNN router on the image and a cheap per-layer router.

Both return raw scores (B, E); ``advmoe.nn.top_k_routing`` turns them into a ``Routing``. Every router
derives from ``Router`` so ``router_parameters(model)`` can find them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Router(nn.Module):
    """Base class of all routers: ``forward(x) -> (B, E)`` scores. ``num_experts`` says E."""

    num_experts: int


class _RouterBlock(nn.Module):
    """ResNet-20 basic block with the parameter-free "option A" shortcut (subsample + zero-pad channels).

    Parameter names (conv1, bn1, conv2, bn2) follow the research code's router so its weights load.
    """

    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad_shortcut = stride != 1 or in_planes != planes
        self.channel_pad = (int((planes - in_planes) * 0.5), int((planes - in_planes + 1) * 0.5))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        shortcut = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, *self.channel_pad)) if self.pad_shortcut else x
        return F.relu(out + shortcut)


class ResearchRouter(Router):
    """The research code's router: a CIFAR ResNet-20 (16/32/64 channels) on the (normalised) image.

    One router serves the whole model: its scores pick the experts of every MoE layer, so a top-1 model
    has exactly E pathways. State-dict names match the research ``Router`` one to one.

    Args:
        num_experts: E, the number of scores.
        in_channels: image channels.
        num_blocks: blocks per stage (3, 3, 3 = ResNet-20).
    """

    def __init__(self, num_experts: int, in_channels: int = 3, num_blocks: tuple[int, int, int] = (3, 3, 3)):
        super().__init__()
        _check_positive(num_experts, "num_experts")
        _check_positive(in_channels, "in_channels")
        self.num_experts = num_experts
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        for stage, (planes, blocks) in enumerate(zip((16, 32, 64), num_blocks, strict=True)):
            layers = []
            for i in range(blocks):
                layers.append(_RouterBlock(in_planes, planes, stride=2 if (stage > 0 and i == 0) else 1))
                in_planes = planes
            setattr(self, f"layer{stage + 1}", nn.Sequential(*layers))
        self.fc = nn.Linear(64, num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scores (B, E) for images x (B, C, H, W)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return self.fc(out)


class PerLayerRouter(Router):
    """Global average pool + linear on a layer's input: each MoE layer routes on its own features.

    Args:
        in_channels: channels of the layer input.
        num_experts: E.
    """

    def __init__(self, in_channels: int, num_experts: int, device=None, dtype=None):
        super().__init__()
        _check_positive(in_channels, "in_channels")
        _check_positive(num_experts, "num_experts")
        self.num_experts = num_experts
        self.fc = nn.Linear(in_channels, num_experts, device=device, dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scores (B, E) for a feature map x (B, C_in, H, W)."""
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def _check_positive(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
