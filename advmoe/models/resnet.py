"""ResNets with CIFAR and ImageNet stems, dense or MoE from one definition.

MoE placement follows the research code (OPTML-Group/Robust-MoE-CNN) so its checkpoints map one to one:
- CIFAR: the 3x3 stem keeps its full width (64) and is dense; every block conv is MoE; the 1x1
  projection shortcuts are dense; the head reads int(r*512)*expansion features.
- ImageNet: the 7x7 stem has int(r*64) channels and is dense; every block conv AND the downsample conv
  are MoE.
A dense model scales every width, stem included, by r.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from advmoe.models.common import ModelSpec, init_weights, make_normalize
from advmoe.models.registry import register_model
from advmoe.nn import RoutedModel, RoutedSequential, Routing


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with a residual connection; ``planes`` is the (already scaled) width."""

    expansion = 1
    takes_routing = True

    def __init__(self, spec: ModelSpec, in_planes: int, planes: int, stride: int, shortcut: str, moe_shortcut: bool):
        super().__init__()
        self.conv1 = spec.conv(in_planes, planes, 3, stride, 1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = spec.conv(planes, planes, 3, 1, 1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut_name = shortcut
        setattr(self, shortcut, _shortcut(spec, in_planes, planes * self.expansion, stride, moe_shortcut))

    def forward(self, x: torch.Tensor, routing: Routing | None = None) -> torch.Tensor:
        out = F.relu(self.bn1(_apply(self.conv1, x, routing)))
        out = self.bn2(_apply(self.conv2, out, routing))
        return F.relu(out + _apply(getattr(self, self.shortcut_name), x, routing))


class Bottleneck(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 (x4) with a residual connection."""

    expansion = 4
    takes_routing = True

    def __init__(self, spec: ModelSpec, in_planes: int, planes: int, stride: int, shortcut: str, moe_shortcut: bool):
        super().__init__()
        self.conv1 = spec.conv(in_planes, planes, 1)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = spec.conv(planes, planes, 3, stride, 1)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv3 = spec.conv(planes, planes * self.expansion, 1)
        self.bn3 = nn.BatchNorm2d(planes * self.expansion)
        self.shortcut_name = shortcut
        setattr(self, shortcut, _shortcut(spec, in_planes, planes * self.expansion, stride, moe_shortcut))

    def forward(self, x: torch.Tensor, routing: Routing | None = None) -> torch.Tensor:
        out = F.relu(self.bn1(_apply(self.conv1, x, routing)))
        out = F.relu(self.bn2(_apply(self.conv2, out, routing)))
        out = self.bn3(_apply(self.conv3, out, routing))
        return F.relu(out + _apply(getattr(self, self.shortcut_name), x, routing))


def _routed(module: nn.Module) -> bool:
    return getattr(module, "takes_routing", False)


def _apply(module: nn.Module | None, x: torch.Tensor, routing: Routing | None) -> torch.Tensor:
    if module is None:
        return x
    return module(x, routing) if _routed(module) else module(x)


def _shortcut(spec: ModelSpec, in_planes: int, out_planes: int, stride: int, moe: bool) -> nn.Module | None:
    if stride == 1 and in_planes == out_planes:
        return None
    return RoutedSequential(spec.conv(in_planes, out_planes, 1, stride, 0, moe=moe), nn.BatchNorm2d(out_planes))


class ResNet(RoutedModel):
    """ResNet for images in [0, 1] (normalisation inside).

    Args:
        block: ``BasicBlock`` or ``Bottleneck``.
        num_blocks: blocks per stage.
        spec: width ratio and MoE settings.
        num_classes: classifier outputs.
        in_channels: image channels.
        normalize: None or (mean, std) per channel.
        stem: "cifar" (3x3, stride 1) or "imagenet" (7x7 stride 2 + max-pool).
        stage_planes: nominal widths of the stages (before the ratio).
    """

    def __init__(
        self,
        block,
        num_blocks,
        spec: ModelSpec,
        num_classes: int = 10,
        in_channels: int = 3,
        normalize=None,
        stem: str = "cifar",
        stage_planes: tuple[int, ...] = (64, 128, 256, 512),
    ):
        super().__init__(make_normalize(normalize), spec.model_router(in_channels), spec.top_k, spec.gate_score)
        cifar = stem == "cifar"
        stem_width = stage_planes[0] if (cifar and spec.moe) else spec.scaled(stage_planes[0])
        kernel, stride, padding = (3, 1, 1) if cifar else (7, 2, 3)
        self.conv1 = nn.Conv2d(in_channels, stem_width, kernel, stride, padding, bias=False)
        self.bn1 = nn.BatchNorm2d(stem_width)
        self.maxpool = None if cifar else nn.MaxPool2d(kernel_size=3, stride=2, padding=1)
        in_planes = stem_width
        for i, (planes, blocks) in enumerate(zip(stage_planes, num_blocks, strict=True)):
            width = spec.width(planes)
            layers = []
            for j in range(blocks):
                stride = 2 if (i > 0 and j == 0) else 1
                layers.append(block(spec, in_planes, width, stride, "shortcut" if cifar else "downsample", not cifar))
                in_planes = width * block.expansion
            setattr(self, f"layer{i + 1}", RoutedSequential(*layers))
        self.num_stages = len(stage_planes)
        self.head_name = "linear" if cifar else "fc"
        setattr(self, self.head_name, nn.Linear(in_planes, num_classes))
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) for images x (B, C, H, W) in [0, 1]."""
        x, routing = self.prepare(x)
        out = F.relu(self.bn1(self.conv1(x)))
        if self.maxpool is not None:
            out = self.maxpool(out)
        for i in range(self.num_stages):
            out = getattr(self, f"layer{i + 1}")(out, routing)
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        return getattr(self, self.head_name)(out)


def _resnet(block, num_blocks, stem, stage_planes=(64, 128, 256, 512)):
    def build(spec: ModelSpec, num_classes: int, in_channels: int, normalize) -> ResNet:
        return ResNet(block, num_blocks, spec, num_classes, in_channels, normalize, stem, stage_planes)

    return build


@register_model
def resnet18_cifar(spec, **kwargs):
    """ResNet-18, CIFAR stem (3x3, stride 1), 32x32 inputs."""
    return _resnet(BasicBlock, (2, 2, 2, 2), "cifar")(spec, **kwargs)


@register_model
def resnet34_cifar(spec, **kwargs):
    """ResNet-34, CIFAR stem."""
    return _resnet(BasicBlock, (3, 4, 6, 3), "cifar")(spec, **kwargs)


@register_model
def resnet50_cifar(spec, **kwargs):
    """ResNet-50 (bottlenecks), CIFAR stem."""
    return _resnet(Bottleneck, (3, 4, 6, 3), "cifar")(spec, **kwargs)


@register_model
def resnet18_imagenet(spec, **kwargs):
    """ResNet-18, ImageNet stem (7x7 stride 2 + max-pool)."""
    return _resnet(BasicBlock, (2, 2, 2, 2), "imagenet")(spec, **kwargs)


@register_model
def resnet50_imagenet(spec, **kwargs):
    """ResNet-50, ImageNet stem."""
    return _resnet(Bottleneck, (3, 4, 6, 3), "imagenet")(spec, **kwargs)


@register_model
def resnet10_mini(spec, **kwargs):
    """Small CIFAR-style ResNet: one BasicBlock per stage, widths 16/32/64/128 (demo and studies)."""
    return _resnet(BasicBlock, (1, 1, 1, 1), "cifar", (16, 32, 64, 128))(spec, **kwargs)
