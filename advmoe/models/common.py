"""What every zoo model shares: the width/conv factory that switches MoE on, input normalisation, weight init.

One definition per architecture serves both variants: the builder asks ``ModelSpec.conv(...)`` for each
convolution, marking which ones the research code makes MoE; a dense spec returns ``nn.Conv2d`` there.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from advmoe.nn import PerLayerRouter, ResearchRouter, Router, SparseMoEConv2d
from advmoe.nn.routers import ImageRouter
from advmoe.nn.routing import GATE_SCORES

ROUTERS = ("research", "per_layer", "image")


@dataclass(frozen=True)
class ModelSpec:
    """Width ratio and MoE settings of a model.

    Attributes:
        num_experts: E; None or 1 means a dense model.
        ratio: width ratio r; a dense model scales every width by r (the "slim" network), a MoE model
            uses experts of width int(r * planes).
        top_k: experts per sample.
        router: "research" (the research code's ResNet-20 router on the image drives every MoE layer),
            "image" (a cheap two-conv router on the image drives every MoE layer) or "per_layer".
        backend: the ``sparse_moe_conv2d`` backend of every MoE layer.
        router_norm: routers standardise their pooled features (``advmoe.nn.routers.RouterInputNorm``) so
            routing starts balanced; False gives the research code's router exactly (checkpoint import).
        gate_score: what the straight-through gate's gradient flows into: "softmax" (default, bounded) or
            "logits" (the research code's ``GetMask``, unbounded; the research recipe uses it).
    """

    num_experts: int | None = None
    ratio: float = 1.0
    top_k: int = 1
    router: str = "research"
    backend: str = "auto"
    router_norm: bool = True
    gate_score: str = "softmax"

    def __post_init__(self):
        if self.num_experts is not None and (
            isinstance(self.num_experts, bool) or not isinstance(self.num_experts, int) or self.num_experts < 1
        ):
            raise ValueError(f"num_experts must be None or an int >= 1, got {self.num_experts!r}")
        if isinstance(self.ratio, bool) or not isinstance(self.ratio, (int, float)) or not 0 < self.ratio <= 1:
            raise ValueError(f"ratio must be a number in (0, 1], got {self.ratio!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, int) or self.top_k < 1:
            raise ValueError(f"top_k must be an int >= 1, got {self.top_k!r}")
        if self.moe and self.top_k > self.num_experts:
            raise ValueError(f"top_k ({self.top_k}) must not exceed num_experts ({self.num_experts})")
        if self.router not in ROUTERS:
            raise ValueError(f"router must be one of {ROUTERS}, got {self.router!r}")
        if not isinstance(self.router_norm, bool):
            raise ValueError(f"router_norm must be True or False, got {self.router_norm!r}")
        if self.gate_score not in GATE_SCORES:
            raise ValueError(f"gate_score must be one of {GATE_SCORES}, got {self.gate_score!r}")

    @property
    def moe(self) -> bool:
        """True when the model has experts (num_experts >= 2)."""
        return self.num_experts is not None and self.num_experts > 1

    def scaled(self, planes: int) -> int:
        """int(ratio * planes), at least 1: the width of a dense layer, or of one expert."""
        width = int(self.ratio * planes)
        if width < 1:
            raise ValueError(f"ratio {self.ratio} leaves no channels of a {planes}-channel layer")
        return width

    def width(self, planes: int) -> int:
        """Channels a (possibly MoE) layer of nominal width ``planes`` outputs: top_k * int(r * planes)."""
        return self.scaled(planes) * (self.top_k if self.moe else 1)

    def conv(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int,
        stride: int = 1,
        padding: int = 0,
        dilation: int = 1,
        bias: bool = False,
        moe: bool = True,
    ) -> nn.Module:
        """A ``SparseMoEConv2d`` if this spec is MoE and ``moe`` is True, else an ``nn.Conv2d``."""
        if self.moe and moe:
            return SparseMoEConv2d(
                in_channels,
                out_channels,
                kernel_size,
                stride=stride,
                padding=padding,
                dilation=dilation,
                bias=bias,
                num_experts=self.num_experts,
                top_k=self.top_k,
                backend=self.backend,
                gate_score=self.gate_score,
                router=PerLayerRouter(in_channels, self.num_experts, input_norm=self.router_norm)
                if self.router == "per_layer"
                else None,
            )
        return nn.Conv2d(in_channels, out_channels, kernel_size, stride, padding, dilation, bias=bias)

    def model_router(self, in_channels: int) -> Router | None:
        """The model-level router (``ResearchRouter`` or ``ImageRouter``), or None (dense, per-layer)."""
        if self.moe and self.router == "research":
            return ResearchRouter(self.num_experts, in_channels, input_norm=self.router_norm)
        if self.moe and self.router == "image":
            return ImageRouter(self.num_experts, in_channels, input_norm=self.router_norm)
        return None


class Normalize(nn.Module):
    """``(x - mean) / std`` per channel, with mean and std as buffers (names match the research code).

    Args:
        mean: per-channel means (C,).
        std: per-channel standard deviations (C,), all > 0.
    """

    def __init__(self, mean, std):
        super().__init__()
        mean = torch.as_tensor(mean, dtype=torch.float32).reshape(-1)
        std = torch.as_tensor(std, dtype=torch.float32).reshape(-1)
        if mean.shape != std.shape or (std <= 0).any():
            raise ValueError(f"normalize needs mean and std of equal length with std > 0, got {mean}, {std}")
        self.register_buffer("mean", mean)
        self.register_buffer("std", std)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, C, H, W) -> normalised (B, C, H, W)."""
        return (x - self.mean[None, :, None, None].to(x.dtype)) / self.std[None, :, None, None].to(x.dtype)


def make_normalize(normalize: tuple | None) -> Normalize | None:
    """``Normalize(mean, std)`` for a ``(mean, std)`` pair (``create_model``'s ``normalize``), None for None."""
    return Normalize(*normalize) if normalize is not None else None


def init_weights(model: nn.Module) -> None:
    """Kaiming-normal (fan_out) convolutions and unit/zero norms, outside routers.

    Routers keep PyTorch's default initialisation: the research code builds its router after
    ``initialize_weights(model)`` (``train_moe.py`` lines 190, 194), so its router is never re-initialised.
    """
    in_routers = {id(m) for router in model.modules() if isinstance(router, Router) for m in router.modules()}
    for module in model.modules():
        if id(module) in in_routers:
            continue
        if isinstance(module, (nn.Conv2d, SparseMoEConv2d)):
            nn.init.kaiming_normal_(module.weight, mode="fan_out", nonlinearity="relu")
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, (nn.BatchNorm2d, nn.GroupNorm)):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
