"""Deployed convolution layers: one expert as a dense conv, the fused MoE conv, and the two fast top-1 forms.

- ``ExpertConv2d``: expert e of a ``SparseMoEConv2d`` as an ``nn.Conv2d`` (pathway mode).
- ``FusedMoEConv2d``: the sparse op with folded BatchNorm and a fused ReLU (layer mode, any routing).
- ``RoutedExpertConv2d``: top-1 with the layer's own per-layer router, computed without the op's generic
  path: at B = 1 the chosen expert's weight rows run as one ``conv2d``; for B > 1 the batch is grouped by
  expert (one argsort, one host read of the counts), each expert runs ``conv2d`` on its samples and writes
  its rows straight back to the samples' places.
- ``GroupedExpertConv2d``: top-1 layer of a ``GroupedMoE`` network, whose batch arrives already sorted by
  expert: per-expert ``conv2d`` on contiguous slices, no gather or scatter.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from advmoe.nn import SparseMoEConv2d
from advmoe.nn.moe_conv import run_sparse_conv
from moe_kernels.geometry import output_memory_format


def _tracing() -> bool:
    return torch.compiler.is_compiling() or torch.jit.is_tracing()


class ExpertConv2d(nn.Conv2d):
    """One expert of a ``SparseMoEConv2d`` as a dense convolution; accepts (and ignores) ``routing``."""

    takes_routing = True

    def forward(self, x: torch.Tensor, routing=None) -> torch.Tensor:
        """x (B, C_in, H, W) -> (B, w, H_out, W_out)."""
        return super().forward(x)

    @classmethod
    def from_moe(cls, layer: SparseMoEConv2d, expert: int) -> ExpertConv2d:
        """Expert ``expert`` of ``layer`` (top-1 only), weight rows ``[e*w, (e+1)*w)``."""
        w = layer.expert_width
        rows = slice(expert * w, (expert + 1) * w)
        conv = cls(
            layer.in_channels,
            w,
            layer.kernel_size,
            layer.stride,
            layer.padding,
            layer.dilation,
            bias=layer.bias is not None,
            padding_mode=layer.padding_mode,
            device=layer.weight.device,
            dtype=layer.weight.dtype,
        )
        with torch.no_grad():
            conv.weight.copy_(layer.weight[rows])
            if layer.bias is not None:
                conv.bias.copy_(layer.bias[rows])
        return conv


class FusedMoEConv2d(SparseMoEConv2d):
    """Inference form of ``SparseMoEConv2d``: folded BatchNorm in weight/bias, optional fused ReLU.

    Attributes:
        activation: "none" or "relu", applied in the op's epilogue.
    """

    activation: str = "none"

    def forward(self, x: torch.Tensor, routing=None) -> torch.Tensor:
        """x (B, C_in, H, W) -> (B, out_channels, H_out, W_out), then the fused activation."""
        expert_idx, gate = self.route(x, routing)
        return run_sparse_conv(self, x, expert_idx, gate, activation=self.activation)


class RoutedExpertConv2d(FusedMoEConv2d):
    """Top-1 MoE convolution driven by its own (per-layer) router, in its cheapest eager form.

    Same weights, folded BatchNorm and fused activation as ``FusedMoEConv2d`` (the state dict is the same),
    same routing decision (the layer's router on the same input, argmax), so the same output; only the
    execution differs. Falls back to ``FusedMoEConv2d.forward`` (the op) under torch.compile / export,
    for frozen routing, a routing argument, or a non-zero padding mode.
    """

    def _fast(self, routing) -> bool:
        return (
            routing is None
            and self.router is not None
            and self.frozen_expert_idx is None
            and self.top_k == 1
            and self.padding_mode == "zeros"
            and not _tracing()
        )

    def _expert_conv(self, x: torch.Tensor, expert: int) -> torch.Tensor:
        rows = slice(expert * self.expert_width, (expert + 1) * self.expert_width)
        bias = self.bias[rows] if self.bias is not None else None
        return F.conv2d(x, self.weight[rows], bias, self.stride, self.padding, self.dilation)

    def _select_conv(self, x: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
        """Sync-free form for CUDA graphs: all E experts on the whole batch, each sample keeps its own."""
        return _select_experts(self, x, choice)

    def forward(self, x: torch.Tensor, routing=None) -> torch.Tensor:
        """x (B, C_in, H, W) -> (B, w, H_out, W_out), then the fused activation."""
        if not self._fast(routing) or x.shape[0] == 0:
            return super().forward(x, routing)
        scores = self.router(x)
        if x.is_cuda and torch.cuda.is_current_stream_capturing():
            y = self._select_conv(x, scores.argmax(dim=1))  # no host sync allowed while a CUDA graph is captured
        elif x.shape[0] == 1:
            y = self._expert_conv(x, int(scores.argmax()))
        else:
            y = _grouped_conv(self, x, scores.argmax(dim=1))
        return torch.relu_(y) if self.activation == "relu" else y


def _select_experts(layer: FusedMoEConv2d, x: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
    """All E experts of ``layer`` on the whole batch x, then each sample's own expert (choice (B,)): no host sync.

    E times the FLOPs of the sparse form: the form for tracing and CUDA-graph capture until a sync-free grouped
    kernel takes over.
    """
    y = F.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation)
    y = y.view(y.shape[0], layer.num_experts, layer.expert_width, *y.shape[2:])
    return y[torch.arange(y.shape[0], device=y.device), choice]


def _grouped_conv(layer: RoutedExpertConv2d, x: torch.Tensor, choice: torch.Tensor) -> torch.Tensor:
    """Groups the batch by ``choice`` (B,), runs each expert on its samples, puts the rows back in order."""
    counts = torch.bincount(choice, minlength=layer.num_experts).tolist()
    used = [e for e, c in enumerate(counts) if c]
    if len(used) == 1:
        return layer._expert_conv(x, used[0])
    order = torch.argsort(choice, stable=True)
    xs = x.index_select(0, order)
    out, start = None, 0
    for e, c in enumerate(counts):
        if c:
            y = layer._expert_conv(xs[start : start + c], e)
            if out is None:
                out = torch.empty(
                    (x.shape[0], *y.shape[1:]), dtype=y.dtype, device=y.device, memory_format=output_memory_format(y)
                )
            out.index_copy_(0, order[start : start + c], y)  # straight to the samples' rows: no concatenation
        start += c
    return out


@dataclass
class GroupRanges:
    """Shared by the layers of one ``GroupedMoE`` network: per expert, how many samples of the sorted batch.

    Attributes:
        counts: samples per expert, in expert order (the sorted batch holds expert 0's samples first).
        choice: None, or (B,) expert per sample of an UNSORTED batch: the sync-free form used under
            torch.export / torch.compile and CUDA-graph capture (every expert on the whole batch, select).
    """

    counts: list[int] = field(default_factory=list)
    choice: torch.Tensor | None = None


class GroupedExpertConv2d(FusedMoEConv2d):
    """Top-1 MoE layer of a ``GroupedMoE`` network: the batch arrives sorted by expert.

    Expert e's samples are the contiguous rows ``[offset_e, offset_e + counts[e])``; each runs one
    ``conv2d`` with expert e's (BatchNorm-folded) weight rows, the slices are concatenated (one copy; none when
    a single expert has the whole batch). No gather, no scatter, no routing of its own.

    Attributes:
        groups: the ``GroupRanges`` the owning ``GroupedMoE`` fills before each forward.
    """

    groups: GroupRanges | None = None

    def forward(self, x: torch.Tensor, routing=None) -> torch.Tensor:
        """x (B, C_in, H, W), sorted by expert -> (B, w, H_out, W_out) in the same order."""
        if self.groups is not None and self.groups.choice is not None:
            y = _select_experts(self, x, self.groups.choice)
            return torch.relu_(y) if self.activation == "relu" else y
        if self.groups is None or sum(self.groups.counts) != x.shape[0]:
            raise RuntimeError(
                "GroupedExpertConv2d runs inside a GroupedMoE, which sets the per-expert counts of the sorted batch"
            )
        parts, start = [], 0
        for e, c in enumerate(self.groups.counts):
            if c:
                rows = slice(e * self.expert_width, (e + 1) * self.expert_width)
                bias = self.bias[rows] if self.bias is not None else None
                parts.append(
                    F.conv2d(x[start : start + c], self.weight[rows], bias, self.stride, self.padding, self.dilation)
                )
            start += c
        if not parts:  # empty batch
            w = self.expert_width
            parts = [F.conv2d(x, self.weight[:w], None, self.stride, self.padding, self.dilation)]
        y = parts[0] if len(parts) == 1 else torch.cat(parts, 0)
        return torch.relu_(y) if self.activation == "relu" else y
