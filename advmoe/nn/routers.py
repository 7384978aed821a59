"""Routers: the research code's CNN router on the image and a cheap per-layer router.

Both return raw scores (B, E); ``advmoe.nn.top_k_routing`` turns them into a ``Routing``. Every router
derives from ``Router`` so ``router_parameters(model)`` can find them.

Both routers read a global average of post-ReLU (all-positive) features. Such features share one large
mean direction, so a linear head on them gives every image nearly the same scores and a top-1 choice
sends almost the whole batch to one expert before any training. ``input_norm=True`` (the default)
standardises the pooled features per channel (``RouterInputNorm``, no learnable affine) before the head,
so the scores start centred across images and the experts share the data from the first step. The
research code's router has no such normalisation: imported research checkpoints use ``input_norm=False``.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class Router(nn.Module):
    """Base class of all routers: ``forward(x) -> (B, E)`` scores. ``num_experts`` says E.

    Args:
        num_experts: E, checked to be a positive int and stored; None leaves setting it to the subclass.
        in_channels: channels of the router's input, checked to be a positive int when given.
    """

    num_experts: int

    def __init__(self, num_experts: int | None = None, in_channels: int | None = None):
        super().__init__()
        if num_experts is not None:
            _check_positive(num_experts, "num_experts")
            self.num_experts = num_experts
        if in_channels is not None:
            _check_positive(in_channels, "in_channels")


class RouterInputNorm(nn.Module):
    """Per-channel standardisation of pooled router features, then per image, without a learnable affine.

    Like ``nn.BatchNorm1d(affine=False)``: in train mode it uses the batch's mean and (biased) variance and
    updates running estimates (momentum 0.1, unbiased variance); in eval mode it uses the running
    estimates, except while they have never been updated (``num_batches_tracked == 0``, a freshly built
    model): then it uses the batch's own statistics, so an untrained model routes evenly in eval mode
    too. The choice is a tensor ``where``, not a Python branch, so tracing and export see one graph.
    A train-mode batch of fewer than 2 samples uses the running estimates and leaves them unchanged.
    Each image's C standardised values are then centred and scaled to unit mean square (a non-affine
    layer norm): correlated channels that rise together with an image's overall activity cancel, which
    makes the split less skewed (measured at init on digits: worst layer 83% instead of 89% on one expert).

    Args:
        num_features: C, the channels of the pooled features.
        eps: added to the variance.
        momentum: running-estimate update factor.
    """

    def __init__(self, num_features: int, eps: float = 1e-6, momentum: float = 0.1, device=None):
        super().__init__()
        _check_positive(num_features, "num_features")
        self.eps, self.momentum = eps, momentum
        self.register_buffer("running_mean", torch.zeros(num_features, device=device))
        self.register_buffer("running_var", torch.ones(num_features, device=device))
        self.register_buffer("num_batches_tracked", torch.zeros((), dtype=torch.int64, device=device))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """Standardised features (B, C) for pooled features z (B, C)."""
        if z.dim() != 2 or z.shape[1] != self.running_mean.numel():
            raise ValueError(f"RouterInputNorm expects (B, {self.running_mean.numel()}) features, got {tuple(z.shape)}")
        running_mean = self.running_mean.to(z.dtype)
        running_var = self.running_var.to(z.dtype)
        if self.training:
            if z.shape[0] < 2:
                return self._per_image((z - running_mean) / torch.sqrt(running_var + self.eps))
            mean, var = z.mean(0), z.var(0, unbiased=False)
            with torch.no_grad():
                n = z.shape[0]
                self.running_mean.lerp_(mean.detach().to(self.running_mean.dtype), self.momentum)
                unbiased = var.detach().to(self.running_var.dtype) * (n / (n - 1))
                self.running_var.lerp_(unbiased, self.momentum)
                self.num_batches_tracked.add_(1)
            return self._per_image((z - mean) / torch.sqrt(var + self.eps))
        untracked = self.num_batches_tracked == 0
        mean = torch.where(untracked, z.mean(0), running_mean)
        var = torch.where(untracked, z.var(0, unbiased=False), running_var)
        return self._per_image((z - mean) / torch.sqrt(var + self.eps))

    def _per_image(self, z: torch.Tensor) -> torch.Tensor:
        """Then centres and scales each image's C standardised features (removes a shared per-image level).

        ``(z - mean_c z) / sqrt(mean_c (z - mean_c z)^2 + eps)``, computed as one non-affine ``layer_norm``
        (one operator instead of seven: the deployed per-layer routers run it once per MoE layer).
        """
        return F.layer_norm(z, z.shape[1:], eps=self.eps)

    def extra_repr(self) -> str:
        return f"{self.running_mean.numel()}, eps={self.eps}, momentum={self.momentum}"


@torch.no_grad()
def calibrate_router_norms(model: nn.Module, x: torch.Tensor) -> int:
    """Sets every ``RouterInputNorm`` of ``model`` to the statistics of one forward pass of ``x``.

    A freshly built model's norms have never seen data, so in eval mode they standardise with each batch's
    own statistics, which makes an untrained model's routing depend on the batch it is in. Calibrated
    norms use fixed running statistics: the model's outputs no longer depend on the batch (what deployment,
    export and benchmarks of untrained models need). Training sets them anyway; only the norms change here
    (other modules keep their mode and state).

    Args:
        model: a model or router containing ``RouterInputNorm`` modules.
        x: (B, C, H, W) inputs of ``model`` with B >= 2.

    Returns:
        The number of norms calibrated (0 when there are none or B < 2).
    """
    norms = [m for m in model.modules() if isinstance(m, RouterInputNorm)]
    if not norms or x.shape[0] < 2:
        return 0
    saved = [(m, m.training, m.momentum) for m in norms]
    try:
        for m in norms:
            m.train()
            m.momentum = 1.0  # running estimates := this batch's statistics
        model(x)
    finally:
        for m, training, momentum in saved:
            m.train(training)
            m.momentum = momentum
    return len(norms)


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
    has exactly E pathways. State-dict names match the research ``Router`` one to one (plus
    ``input_norm.*`` buffers when ``input_norm`` is on). Parameters keep PyTorch's default initialisation,
    as in the research code, whose ``initialize_weights(model)`` runs before the router is built
    (``train_moe.py`` lines 190 and 194).

    Args:
        num_experts: E, the number of scores.
        in_channels: image channels.
        num_blocks: blocks per stage (3, 3, 3 = ResNet-20).
        input_norm: standardise the pooled 64 features before the head (``RouterInputNorm``); False is
            the research code's router exactly.
    """

    def __init__(
        self,
        num_experts: int,
        in_channels: int = 3,
        num_blocks: tuple[int, int, int] = (3, 3, 3),
        input_norm: bool = True,
    ):
        super().__init__(num_experts, in_channels)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        in_planes = 16
        for stage, (planes, blocks) in enumerate(zip((16, 32, 64), num_blocks, strict=True)):
            layers = []
            for i in range(blocks):
                layers.append(_RouterBlock(in_planes, planes, stride=2 if (stage > 0 and i == 0) else 1))
                in_planes = planes
            setattr(self, f"layer{stage + 1}", nn.Sequential(*layers))
        self.input_norm = RouterInputNorm(64) if input_norm else None
        self.fc = nn.Linear(64, num_experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scores (B, E) for images x (B, C, H, W)."""
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        if self.input_norm is not None:
            out = self.input_norm(out)
        return self.fc(out)


class ImageRouter(Router):
    """A cheap model-level router: two strided 3x3 convolutions on the (normalised) image, pool, linear.

    conv(C -> 16, stride 2) + BN + ReLU, conv(16 -> 32, stride 2) + BN + ReLU, global average pool,
    ``RouterInputNorm``, linear to E scores. Like the research router it drives every MoE layer, so each
    sample follows one consistent pathway (with per-layer routers the channels a layer hands on mean
    different things for samples routed differently); it costs about 0.4 MFLOPs on a 32x32 image, against
    about 41 MFLOPs for the research ResNet-20 router.

    Args:
        num_experts: E.
        in_channels: image channels.
        input_norm: standardise the pooled features before the head.
    """

    def __init__(self, num_experts: int, in_channels: int = 3, input_norm: bool = True):
        super().__init__(num_experts, in_channels)
        self.conv1 = nn.Conv2d(in_channels, 16, 3, stride=2, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        self.conv2 = nn.Conv2d(16, 32, 3, stride=2, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(32)
        self.input_norm = RouterInputNorm(32) if input_norm else None
        self.fc = nn.Linear(32, num_experts)
        nn.init.zeros_(self.fc.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scores (B, E) for images x (B, C, H, W)."""
        out = F.relu(self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x))))))
        out = F.adaptive_avg_pool2d(out, 1).flatten(1)
        if self.input_norm is not None:
            out = self.input_norm(out)
        return self.fc(out)


class PerLayerRouter(Router):
    """Global average pool (+ standardisation) + linear on a layer's input: each MoE layer routes on its own features.

    Args:
        in_channels: channels of the layer input.
        num_experts: E.
        input_norm: standardise the pooled features before the head (``RouterInputNorm``).

    The head's bias starts at zero, its weight with ``nn.Linear``'s default initialisation.
    """

    def __init__(self, in_channels: int, num_experts: int, device=None, dtype=None, input_norm: bool = True):
        super().__init__(num_experts, in_channels)
        self.input_norm = RouterInputNorm(in_channels, device=device) if input_norm else None
        self.fc = nn.Linear(in_channels, num_experts, device=device, dtype=dtype)
        nn.init.zeros_(self.fc.bias)  # no expert preferred before training (the weight keeps nn.Linear's init)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Scores (B, E) for a feature map x (B, C_in, H, W)."""
        pooled = F.adaptive_avg_pool2d(x, 1).flatten(1)
        if self.input_norm is not None:
            pooled = self.input_norm(pooled)
        return self.fc(pooled)


def _check_positive(value: object, name: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive int, got {value!r}")
