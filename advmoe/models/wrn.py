"""Wide ResNets (WRN-28-10, WRN-34-10), pre-activation, dense or MoE.

MoE placement follows the research code: the 3x3 stem (int(r*16) channels) is dense; both block convs
AND the 1x1 projection shortcut are MoE; the head reads int(r*64*widen) features. Names match its state dict
(``block1.layer.0.conv1``, ``convShortcut``, ``bn1``, ``fc``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from advmoe.models.common import ModelSpec, init_weights, make_normalize
from advmoe.models.registry import register_model
from advmoe.models.resnet import _apply
from advmoe.nn import RoutedModel, RoutedSequential, Routing


class WideBasicBlock(nn.Module):
    """BN-ReLU-conv3x3 twice with an identity or 1x1 projection shortcut.

    ``preact_projection=False`` reproduces the research code's MoE WRN, whose projecting blocks feed the
    raw input (not relu(bn1(x))) to conv1 and to the shortcut.
    """

    takes_routing = True

    def __init__(
        self,
        spec: ModelSpec,
        in_planes: int,
        out_planes: int,
        stride: int,
        drop_rate: float = 0.0,
        preact_projection: bool = True,
    ):
        super().__init__()
        self.preact_projection = preact_projection
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = spec.conv(in_planes, out_planes, 3, stride, 1)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = spec.conv(out_planes, out_planes, 3, 1, 1)
        self.drop_rate = drop_rate
        self.equal_in_out = in_planes == out_planes
        self.convShortcut = None if self.equal_in_out else spec.conv(in_planes, out_planes, 1, stride, 0)

    def forward(self, x: torch.Tensor, routing: Routing | None = None) -> torch.Tensor:
        pre = F.relu(self.bn1(x))
        if not self.equal_in_out and self.preact_projection:
            x = pre  # standard WRN: conv1 and the projection read the pre-activation
        # else (research MoE code): they read the raw x and bn1 of a projecting block goes unused
        out = F.relu(self.bn2(_apply(self.conv1, pre if self.equal_in_out else x, routing)))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        out = _apply(self.conv2, out, routing)
        return out + (x if self.equal_in_out else _apply(self.convShortcut, x, routing))


class NetworkBlock(nn.Module):
    """A stage of ``num_layers`` wide blocks (the container is named ``layer``, as in the research code)."""

    takes_routing = True

    def __init__(
        self,
        spec: ModelSpec,
        num_layers: int,
        in_planes: int,
        out_planes: int,
        stride: int,
        drop: float,
        preact_projection: bool,
    ):
        super().__init__()
        self.layer = RoutedSequential(
            *[
                WideBasicBlock(
                    spec,
                    in_planes if i == 0 else out_planes,
                    out_planes,
                    stride if i == 0 else 1,
                    drop,
                    preact_projection,
                )
                for i in range(num_layers)
            ]
        )

    def forward(self, x: torch.Tensor, routing: Routing | None = None) -> torch.Tensor:
        return self.layer(x, routing)


class WideResNet(RoutedModel):
    """WRN-depth-widen for images in [0, 1].

    Args:
        depth: 6n + 4.
        widen_factor: channel multiplier k of the 16/32/64 stages.
        spec, num_classes, in_channels, normalize: as in ``create_model``.
        drop_rate: dropout inside the blocks.
        preact_projection: False reproduces the research MoE code's projecting blocks (see
            ``WideBasicBlock``); set by ``load_research_checkpoint``.
    """

    def __init__(
        self,
        depth: int,
        widen_factor: int,
        spec: ModelSpec,
        num_classes: int = 10,
        in_channels: int = 3,
        normalize=None,
        drop_rate: float = 0.0,
        preact_projection: bool = True,
    ):
        super().__init__(make_normalize(normalize), spec.model_router(in_channels), spec.top_k, spec.gate_score)
        if (depth - 4) % 6:
            raise ValueError(f"WideResNet depth must be 6n + 4, got {depth}")
        n = (depth - 4) // 6
        stem = spec.scaled(16)
        widths = [spec.width(16 * widen_factor), spec.width(32 * widen_factor), spec.width(64 * widen_factor)]
        self.conv1 = nn.Conv2d(in_channels, stem, 3, 1, 1, bias=False)
        self.block1 = NetworkBlock(spec, n, stem, widths[0], 1, drop_rate, preact_projection)
        self.block2 = NetworkBlock(spec, n, widths[0], widths[1], 2, drop_rate, preact_projection)
        self.block3 = NetworkBlock(spec, n, widths[1], widths[2], 2, drop_rate, preact_projection)
        self.bn1 = nn.BatchNorm2d(widths[2])
        self.fc = nn.Linear(widths[2], num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) for images x (B, C, H, W) in [0, 1]."""
        x, routing = self.prepare(x)
        out = self.conv1(x)
        out = self.block3(self.block2(self.block1(out, routing), routing), routing)
        out = F.relu(self.bn1(out))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


@register_model
def wrn_28_10_cifar(spec, drop_rate: float = 0.0, preact_projection: bool = True, **kwargs):
    """WRN-28-10 (CIFAR, 32x32)."""
    return WideResNet(28, 10, spec, drop_rate=drop_rate, preact_projection=preact_projection, **kwargs)


@register_model
def wrn_34_10_cifar(spec, drop_rate: float = 0.0, preact_projection: bool = True, **kwargs):
    """WRN-34-10 (CIFAR, 32x32)."""
    return WideResNet(34, 10, spec, drop_rate=drop_rate, preact_projection=preact_projection, **kwargs)
