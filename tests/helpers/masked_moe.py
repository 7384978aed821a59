"""Test oracles: the masked full-convolution formulation of a MoE conv, and research-layout models.

Written for the tests from the research code's documented semantics (compute every expert with one full
convolution, multiply the unselected channels by zero, keep the selected ones; straight-through one-hot
of the router's argmax; one router module attached to the model and to every MoE layer). Nothing here
is copied from that code.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from advmoe.nn import ResearchRouter, SparseMoEConv2d


class StraightThroughOneHot(torch.autograd.Function):
    """one_hot(argmax(scores)) forward; the gradient passes to the scores unchanged."""

    @staticmethod
    def forward(ctx, scores):
        return torch.zeros_like(scores).scatter_(1, scores.argmax(1, keepdim=True), 1.0)

    @staticmethod
    def backward(ctx, grad):
        return grad


def masked_moe_conv(x, weight, bias, expert_idx, gate, num_experts, stride, padding, dilation):
    """All experts computed, then slot j keeps gate_j * channels of expert e_j. -> (B, k*w, H, W)."""
    full = F.conv2d(x, weight, bias, stride, padding, dilation)
    width = weight.shape[0] // num_experts
    slots = []
    for j in range(expert_idx.shape[1]):
        chan = expert_idx[:, j, None] * width + torch.arange(width, device=x.device)
        picked = full.gather(1, chan[:, :, None, None].expand(-1, -1, *full.shape[2:]))
        slots.append(picked if gate is None else picked * gate[:, j, None, None, None].to(picked.dtype))
    return torch.cat(slots, 1)


class MaskedTwin(nn.Module):
    """Stands in for a ``SparseMoEConv2d``: same parameters, masked full-conv compute."""

    takes_routing = True

    def __init__(self, layer: SparseMoEConv2d):
        super().__init__()
        self.layer = layer

    def forward(self, x, routing=None):
        layer = self.layer
        expert_idx, gate = layer.route(x, routing)
        return masked_moe_conv(
            x,
            layer.weight,
            layer.bias,
            expert_idx,
            gate,
            layer.num_experts,
            layer.stride,
            layer.padding,
            layer.dilation,
        )


def masked_twin_(model: nn.Module) -> nn.Module:
    """Replaces every ``SparseMoEConv2d`` of ``model`` in place by a ``MaskedTwin`` sharing its weights."""
    for module in list(model.modules()):
        for child_name, child in list(module.named_children()):
            if isinstance(child, SparseMoEConv2d):
                setattr(module, child_name, MaskedTwin(child))
    return model


# ----------------------------------------------------------------------------------------------------
# Research-layout models: MoE convs that own (a reference to) the router, masks, state-dict layout.


class ResearchMaskedConv(nn.Conv2d):
    """nn.Conv2d with E*w outputs; keeps the w channels of the expert picked by the shared scores."""

    def __init__(self, in_ch, width, kernel_size, stride=1, padding=0, num_experts=2):
        super().__init__(in_ch, width * num_experts, kernel_size, stride, padding, bias=False)
        self.num_experts, self.width = num_experts, width
        self.router = None  # set to the shared router -> its weights repeat in the state dict
        self.scores = None

    def forward(self, x):
        one_hot = StraightThroughOneHot.apply(self.scores)
        mask = one_hot.repeat_interleave(self.width, dim=1)  # (B, E*w)
        out = super().forward(x) * mask[:, :, None, None]
        keep = mask.reshape(-1) > 0
        b, c, h, w = out.shape
        return out.reshape(b * c, h, w)[keep].reshape(b, self.width, h, w)


class ResearchModel(nn.Module):
    """Attaches one router module to the model and to every masked conv (as the research code does)."""

    def attach_router(self, router: nn.Module) -> None:
        self.router = router
        for m in self.modules():
            if isinstance(m, ResearchMaskedConv):
                m.router = router


class ResearchNormalize(nn.Module):
    def __init__(self, mean, std):
        super().__init__()
        self.register_buffer("mean", torch.tensor(mean))
        self.register_buffer("std", torch.tensor(std))


class ResearchBasicBlock(nn.Module):
    def __init__(self, in_planes, planes, stride, num_experts):
        super().__init__()
        self.conv1 = ResearchMaskedConv(in_planes, planes, 3, stride, 1, num_experts)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = ResearchMaskedConv(planes, planes, 3, 1, 1, num_experts)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            self.shortcut = nn.Sequential(nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + self.shortcut(x))


class ResearchResNetCifar(ResearchModel):
    """Research-layout MoE ResNet-18 (CIFAR): full-width dense stem, MoE block convs, dense shortcuts."""

    def __init__(self, ratio, num_experts, num_classes=10, normalize=None):
        super().__init__()
        self.normalize = ResearchNormalize(*normalize) if normalize else None
        self.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(64)
        in_planes = 64
        for i, planes in enumerate((64, 128, 256, 512)):
            planes = int(ratio * planes)
            blocks = []
            for j in range(2):
                blocks.append(ResearchBasicBlock(in_planes, planes, 2 if (i > 0 and j == 0) else 1, num_experts))
                in_planes = planes
            setattr(self, f"layer{i + 1}", nn.Sequential(*blocks))
        self.linear = nn.Linear(in_planes, num_classes)
        self.attach_router(ResearchRouter(num_experts, input_norm=False))

    def forward(self, x):
        if self.normalize is not None:
            x = (x - self.normalize.mean[None, :, None, None]) / self.normalize.std[None, :, None, None]
        scores = self.router(x)
        for m in self.modules():
            if isinstance(m, ResearchMaskedConv):
                m.scores = scores
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        return self.linear(F.adaptive_avg_pool2d(out, 1).flatten(1))


class ResearchWideBlock(nn.Module):
    """The research MoE WRN block: a projecting block feeds the raw x to conv1 and to the shortcut."""

    def __init__(self, in_planes, out_planes, stride, num_experts):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = ResearchMaskedConv(in_planes, out_planes, 3, stride, 1, num_experts)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.conv2 = ResearchMaskedConv(out_planes, out_planes, 3, 1, 1, num_experts)
        self.equal = in_planes == out_planes
        self.convShortcut = None if self.equal else ResearchMaskedConv(in_planes, out_planes, 1, stride, 0, num_experts)

    def forward(self, x):
        pre = F.relu(self.bn1(x))
        out = F.relu(self.bn2(self.conv1(pre if self.equal else x)))
        out = self.conv2(out)
        return (x if self.equal else self.convShortcut(x)) + out


class ResearchStage(nn.Module):
    def __init__(self, n, in_planes, out_planes, stride, num_experts):
        super().__init__()
        self.layer = nn.Sequential(
            *[
                ResearchWideBlock(in_planes if i == 0 else out_planes, out_planes, stride if i == 0 else 1, num_experts)
                for i in range(n)
            ]
        )

    def forward(self, x):
        return self.layer(x)


class ResearchWRN(ResearchModel):
    """Research-layout MoE WRN-depth-widen."""

    def __init__(self, depth, widen, ratio, num_experts, num_classes=10):
        super().__init__()
        n = (depth - 4) // 6
        ch = [int(r * ratio) for r in (16, 16 * widen, 32 * widen, 64 * widen)]
        self.conv1 = nn.Conv2d(3, ch[0], 3, 1, 1, bias=False)
        self.block1 = ResearchStage(n, ch[0], ch[1], 1, num_experts)
        self.block2 = ResearchStage(n, ch[1], ch[2], 2, num_experts)
        self.block3 = ResearchStage(n, ch[2], ch[3], 2, num_experts)
        self.bn1 = nn.BatchNorm2d(ch[3])
        self.fc = nn.Linear(ch[3], num_classes)
        self.attach_router(ResearchRouter(num_experts, input_norm=False))

    def forward(self, x):
        scores = self.router(x)
        for m in self.modules():
            if isinstance(m, ResearchMaskedConv):
                m.scores = scores
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = F.relu(self.bn1(out))
        return self.fc(F.adaptive_avg_pool2d(out, 1).flatten(1))


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Non-trivial BatchNorm statistics and affine parameters, so eval-mode comparisons mean something."""
    gen = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.randn(n, generator=gen) * 0.1)
            m.running_var.copy_(torch.rand(n, generator=gen) + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=gen) + 0.5)
            m.bias.data.copy_(torch.randn(n, generator=gen) * 0.1)
    return model
