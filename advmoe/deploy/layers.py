"""Deployed convolution layers: one expert as a dense conv, the fused MoE conv, and the two fast top-1 forms.

- ``ExpertConv2d``: expert e of a ``SparseMoEConv2d`` as an ``nn.Conv2d`` (pathway mode).
- ``FusedMoEConv2d``: the sparse op with folded BatchNorm and a fused ReLU (layer mode, any routing).
- ``RoutedExpertConv2d``: top-1 with the layer's own per-layer router, computed without the op's generic
  path: at B = 1 the chosen expert's weight rows run as one ``conv2d`` (on the CPU from a cached plan: the
  router's five operators and the expert rows, no router module call); for B > 1 the batch is grouped by
  expert (one argsort, one host read of the counts), each expert runs ``conv2d`` on its samples and writes
  its rows straight back to the samples' places.
- ``GroupedExpertConv2d``: top-1 layer of a ``GroupedMoE`` network, whose batch arrives already sorted by
  expert: per-expert ``conv2d`` on contiguous slices, no gather or scatter.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from advmoe.deploy.router_fold import FlatPerLayerRouter, flat_router_scores
from advmoe.nn import SparseMoEConv2d
from advmoe.nn.moe_conv import run_sparse_conv
from moe_kernels.geometry import gather_rows, output_memory_format


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

    def _one_image_plan(self) -> _OneImagePlan | None:
        """The cached tensors of the CPU one-image path, or None where that path does not apply.

        Applies to a ``FlatPerLayerRouter`` with a tracked, eval-mode input norm. The plan holds the running
        mean, ``sqrt(running_var + eps)``, the head and every expert's weight and bias rows (views); it is
        rebuilt when any of its seven source tensors is replaced, changed in place (version counter) or moved
        (data pointer), or the norm's eps changes. Tensors made under ``torch.inference_mode`` have no
        version counter: no plan then.
        """
        router = self._modules.get("router")
        if type(router) is not FlatPerLayerRouter or self.frozen_expert_idx is not None or self.top_k != 1:
            return None
        norm, fc = router._modules.get("input_norm"), router._modules.get("fc")
        if norm is None or norm.training or self.padding_mode != "zeros":
            return None
        buffers = norm._buffers
        sources = (
            self._parameters["weight"],
            self._parameters.get("bias"),
            fc._parameters["weight"],
            fc._parameters.get("bias"),
            buffers["running_mean"],
            buffers["running_var"],
            buffers["num_batches_tracked"],
        )
        cached = self.__dict__.get("_one_image_cache")
        try:
            if (
                cached is not None
                and cached[3] == norm.eps
                and all(
                    a is b and (a is None or (a._version == v and a.data_ptr() == p))
                    for a, b, (v, p) in zip(sources, cached[0], cached[1], strict=True)
                )
            ):
                return cached[2]
        except RuntimeError:  # a copy made under inference_mode kept the cache: inference tensors
            return None
        if any(t is not None and t.is_inference() for t in sources):
            return None
        weight, bias, fc_weight, fc_bias, _, var, _ = sources
        tracked, mean, std = router._eval_statistics(var.dtype)
        plan = None
        if tracked:
            w = self.expert_width
            rows = [slice(e * w, (e + 1) * w) for e in range(self.num_experts)]
            plan = _OneImagePlan(
                mean,
                std,
                norm.eps,
                fc_weight,
                fc_bias,
                [weight[r] for r in rows],
                [None if bias is None else bias[r] for r in rows],
            )
        stamp = [(0, 0) if t is None else (t._version, t.data_ptr()) for t in sources]
        self.__dict__["_one_image_cache"] = (sources, stamp, plan, norm.eps)
        return plan

    def forward(self, x: torch.Tensor, routing=None) -> torch.Tensor:
        """x (B, C_in, H, W) -> (B, w, H_out, W_out), then the fused activation."""
        if routing is None and x.is_cpu and x.dim() == 4 and x.shape[0] == 1 and not _tracing():
            plan = self._one_image_plan()
            if plan is not None and x.dtype == plan.mean.dtype and x.shape[1] == plan.mean.shape[0]:
                # The router's five operators on the same values as FlatPerLayerRouter (bit-identical scores),
                # then the chosen expert's rows, without the module calls and checks of the general path.
                scores = flat_router_scores(x, plan.mean, plan.std, plan.eps, plan.fc_weight, plan.fc_bias)
                e = int(scores.argmax())
                y = F.conv2d(x, plan.weights[e], plan.biases[e], self.stride, self.padding, self.dilation)
                return torch.relu_(y) if self.activation == "relu" else y
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


class _OneImagePlan(NamedTuple):
    """What ``RoutedExpertConv2d`` needs for one image on the CPU: router statistics, head, expert rows."""

    mean: torch.Tensor  # (C_in,) running mean of the router norm
    std: torch.Tensor  # (C_in,) sqrt(running_var + eps)
    eps: float
    fc_weight: torch.Tensor  # (E, C_in)
    fc_bias: torch.Tensor | None  # (E,)
    weights: list[torch.Tensor]  # E views (w, C_in, kh, kw) of the layer weight
    biases: list[torch.Tensor | None]  # E views (w,) of the layer bias


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
    xs = gather_rows(x, order)
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
