"""VGG-16 (with or without BatchNorm) for 32x32 inputs, dense or MoE.

As in the research code: the first conv (int(r*64) channels) is dense, every other conv is MoE; a 2x2
adaptive average pool and a 256-256 MLP head. Layer indices of ``features`` and ``classifier`` match its
state dict.
"""

from __future__ import annotations

import torch
from torch import nn

from advmoe.models.common import ModelSpec, init_weights, make_normalize
from advmoe.models.registry import register_model
from advmoe.nn import RoutedModel, RoutedSequential

VGG16 = (64, 64, "M", 128, 128, "M", 256, 256, 256, "M", 512, 512, 512, "M", 512, 512, 512)


class VGG(RoutedModel):
    """VGG for images in [0, 1].

    Args:
        layout: channel counts and "M" (2x2 max-pool) in order.
        batch_norm: BatchNorm after every conv.
        spec, num_classes, in_channels, normalize: as in ``create_model``.
        hidden: width of the two hidden classifier layers.
    """

    def __init__(
        self,
        layout,
        batch_norm: bool,
        spec: ModelSpec,
        num_classes: int = 10,
        in_channels: int = 3,
        normalize=None,
        hidden: int = 256,
    ):
        super().__init__(make_normalize(normalize), spec.model_router(in_channels), spec.top_k, spec.gate_score)
        layers: list[nn.Module] = []
        channels = in_channels
        first = True
        for v in layout:
            if v == "M":
                layers.append(nn.MaxPool2d(kernel_size=2, stride=2))
                continue
            width = spec.scaled(v) if first else spec.width(v)
            layers.append(spec.conv(channels, width, 3, 1, 1, moe=not first))
            if batch_norm:
                layers.append(nn.BatchNorm2d(width))
            layers.append(nn.ReLU())  # not in place: the op output may be a view (autograd forbids that)
            channels, first = width, False
        self.features = RoutedSequential(*layers)
        self.avgpool = nn.AdaptiveAvgPool2d((2, 2))
        self.classifier = nn.Sequential(
            nn.Linear(channels * 4, hidden),
            nn.ReLU(True),
            nn.Linear(hidden, hidden),
            nn.ReLU(True),
            nn.Linear(hidden, num_classes),
        )
        init_weights(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) for images x (B, C, H, W) in [0, 1]."""
        x, routing = self.prepare(x)
        out = self.avgpool(self.features(x, routing))
        return self.classifier(out.flatten(1))


@register_model
def vgg16_bn(spec, **kwargs):
    """VGG-16 with BatchNorm."""
    return VGG(VGG16, True, spec, **kwargs)


@register_model
def vgg16(spec, **kwargs):
    """VGG-16 without BatchNorm."""
    return VGG(VGG16, False, spec, **kwargs)
