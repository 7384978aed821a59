"""DenseNet-BC-40 (growth 12) with CIFAR or ImageNet stem, dense or MoE.

Both convs of every dense layer (1x1 bottleneck and 3x3) are MoE; the stem and the transitions are
dense. Widths follow the research code's dense DenseNet scaled by r (stem int(r*24), growth int(r*12),
bottleneck 4x growth); each MoE expert has that width. (The research code's MoE DenseNet crashes at
construction, passing ``ratio`` to its conv layer; its dense one defines these widths.) Module names
match its state dict (``features.denseblock1.denselayer1.conv1``, ``features.transition1.conv``, ...).
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import torch.nn.functional as F
from torch import nn

from advmoe.models.common import ModelSpec, init_weights, make_normalize
from advmoe.models.registry import register_model
from advmoe.nn import RoutedModel, RoutedSequential, Routing


class DenseLayer(nn.Module):
    """BN-ReLU-conv1x1 (bn_size * growth) -> BN-ReLU-conv3x3 (growth); returns only the new features."""

    takes_routing = True

    def __init__(self, spec: ModelSpec, in_features: int, growth: int, bn_size: int, drop_rate: float):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(in_features)
        self.conv1 = spec.conv(in_features, bn_size * growth, 1)
        self.norm2 = nn.BatchNorm2d(bn_size * growth)
        self.conv2 = spec.conv(bn_size * growth, growth, 3, 1, 1)
        self.drop_rate = drop_rate

    def forward(self, x: torch.Tensor, routing: Routing | None = None) -> torch.Tensor:
        out = _call(self.conv1, F.relu(self.norm1(x)), routing)
        out = _call(self.conv2, F.relu(self.norm2(out)), routing)
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return out


def _call(conv: nn.Module, x: torch.Tensor, routing: Routing | None) -> torch.Tensor:
    return conv(x, routing) if getattr(conv, "takes_routing", False) else conv(x)


class DenseBlock(nn.Module):
    """``num_layers`` dense layers (``denselayer1``...), each reading the concatenation of all before."""

    takes_routing = True

    def __init__(self, spec: ModelSpec, num_layers: int, in_features: int, growth: int, bn_size: int, drop: float):
        super().__init__()
        for i in range(num_layers):
            self.add_module(f"denselayer{i + 1}", DenseLayer(spec, in_features + i * growth, growth, bn_size, drop))

    def forward(self, x: torch.Tensor, routing: Routing | None = None) -> torch.Tensor:
        features = x
        for layer in self.children():
            features = torch.cat([features, layer(features, routing)], 1)
        return features


class DenseNet(RoutedModel):
    """DenseNet-BC for images in [0, 1].

    Args:
        block_config: dense layers per block.
        spec, num_classes, in_channels, normalize: as in ``create_model``.
        small_inputs: CIFAR stem (3x3) if True, else ImageNet stem (7x7 stride 2, BN, ReLU, max-pool).
        growth_rate, num_init_features, bn_size, compression, drop_rate: DenseNet-BC hyper-parameters,
            before the width ratio.
    """

    def __init__(
        self,
        block_config,
        spec: ModelSpec,
        num_classes: int = 10,
        in_channels: int = 3,
        normalize=None,
        small_inputs: bool = True,
        growth_rate: int = 12,
        num_init_features: int = 24,
        bn_size: int = 4,
        compression: float = 0.5,
        drop_rate: float = 0.0,
    ):
        super().__init__(make_normalize(normalize), spec.model_router(in_channels), spec.top_k, spec.gate_score)
        if not 0 < compression <= 1:
            raise ValueError(f"compression must be in (0, 1], got {compression}")
        init = spec.scaled(num_init_features)
        growth = spec.width(growth_rate)
        if small_inputs:
            stem = [("conv0", nn.Conv2d(in_channels, init, 3, 1, 1, bias=False))]
        else:
            stem = [
                ("conv0", nn.Conv2d(in_channels, init, 7, 2, 3, bias=False)),
                ("norm0", nn.BatchNorm2d(init)),
                ("relu0", nn.ReLU(inplace=True)),
                ("pool0", nn.MaxPool2d(kernel_size=3, stride=2, padding=1)),
            ]
        features = OrderedDict(stem)
        num_features = init
        for i, num_layers in enumerate(block_config):
            features[f"denseblock{i + 1}"] = DenseBlock(spec, num_layers, num_features, growth, bn_size, drop_rate)
            num_features += num_layers * growth
            if i != len(block_config) - 1:
                out = int(num_features * compression)
                features[f"transition{i + 1}"] = nn.Sequential(
                    OrderedDict(
                        norm=nn.BatchNorm2d(num_features),
                        relu=nn.ReLU(inplace=True),
                        conv=nn.Conv2d(num_features, out, 1, bias=False),
                        pool=nn.AvgPool2d(kernel_size=2, stride=2),
                    )
                )
                num_features = out
        features["norm_final"] = nn.BatchNorm2d(num_features)
        self.features = RoutedSequential(features)
        self.classifier = nn.Linear(num_features, num_classes)
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) for images x (B, C, H, W) in [0, 1]."""
        x, routing = self.prepare(x)
        out = F.relu(self.features(x, routing))
        return self.classifier(F.adaptive_avg_pool2d(out, 1).flatten(1))


def _depth_config(depth: int) -> list[int]:
    if (depth - 4) % 6:
        raise ValueError(f"DenseNet-BC depth must be 6n + 4, got {depth}")
    return [(depth - 4) // 6] * 3


@register_model
def densenet_cifar(spec, depth: int = 40, **kwargs):
    """DenseNet-BC-40 (growth 12), CIFAR stem."""
    return DenseNet(_depth_config(depth), spec, small_inputs=True, **kwargs)


@register_model
def densenet_imagenet(spec, depth: int = 40, **kwargs):
    """DenseNet-BC-40 (growth 12), ImageNet stem."""
    return DenseNet(_depth_config(depth), spec, small_inputs=False, **kwargs)
