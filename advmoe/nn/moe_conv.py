"""``SparseMoEConv2d``: a drop-in for ``nn.Conv2d`` whose output channels are split into experts.

Each sample runs only the k experts its router picks; the forward always goes through
``moe_kernels.sparse_moe_conv2d``, so compute scales with k/E, never with the full width E*w.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.modules.utils import _pair

from advmoe.nn.routers import PerLayerRouter, Router
from advmoe.nn.routing import GATE_SCORES, Routing, top_k_routing
from advmoe.nn.routing_record import report_routing
from moe_kernels import sparse_moe_conv2d
from moe_kernels.backends import backend_uses_plan, resolve_backend
from moe_kernels.plan import RoutingPlan

_PADDING_MODES = ("zeros", "reflect", "replicate", "circular")


def run_sparse_conv(layer: nn.Module, x: torch.Tensor, expert_idx: torch.Tensor, gate, **options) -> torch.Tensor:
    """``sparse_moe_conv2d`` with a conv-like layer's weight, bias, geometry and backend.

    A ``padding_mode`` other than "zeros" pads ``x`` first (the op pads with zeros only).

    Args:
        layer: has ``weight`` (E*w, C_in, kh, kw), ``bias``, ``num_experts``, ``stride``, ``padding``,
            ``dilation``, ``padding_mode`` and ``backend``.
        x: (B, C_in, H, W) input.
        expert_idx: (B, k) chosen experts.
        gate: (B, k) gates or None.
        **options: further keyword arguments of the op (``plan``, ``activation``).

    Returns:
        (B, out_channels, H_out, W_out), as the op: only the chosen experts' channels are computed.
    """
    padding = layer.padding
    if layer.padding_mode != "zeros" and any(padding):
        pad = (padding[1], padding[1], padding[0], padding[0])
        x, padding = F.pad(x, pad, mode=layer.padding_mode), (0, 0)
    return sparse_moe_conv2d(
        x,
        layer.weight,
        expert_idx,
        layer.num_experts,
        gate=gate,
        bias=layer.bias,
        stride=layer.stride,
        padding=padding,
        dilation=layer.dilation,
        backend=layer.backend,
        **options,
    )


class SparseMoEConv2d(nn.Module):
    """Channel-gated mixture-of-experts convolution, a drop-in for ``nn.Conv2d``.

    The layer holds E experts of width ``w = out_channels // top_k``: weight (E*w, C_in, kh, kw), rows
    ``[e*w, (e+1)*w)`` for expert e (the research code's layout). A sample's output stacks its k chosen
    experts: (B, k*w = out_channels, H_out, W_out), so the layers around it keep their shapes.

    Routing comes from (first match wins): an override set by ``advmoe.nn.frozen_routing``; the
    ``routing`` argument handed down by a model-level router; the layer's own router.

    Args:
        in_channels, out_channels, kernel_size, stride, padding, dilation, bias, padding_mode, device,
            dtype: as in ``nn.Conv2d``; out_channels must divide by top_k. ``padding`` may be "valid"
            or "same" (stride 1 only).
        groups: must be 1 (grouped expert convolutions are not supported).
        num_experts: E >= 1.
        top_k: experts per sample, 1 <= top_k <= E.
        router: None (routing must be handed in), "per_layer" (a ``PerLayerRouter`` on the input), or a
            ``Router`` module mapping this layer's input to (B, E) scores.
        gate_score: what the straight-through gate's gradient flows into when this layer's own router
            routes: "softmax" (default; the gradient into each score is bounded, which keeps adversarial
            training of per-layer routers finite) or "logits" (the research code's ``GetMask``).
        backend: the ``sparse_moe_conv2d`` backend ("auto", "reference", "cpu", "triton", "cuda").

    Attributes:
        expert_counts: (E,) int64 routing slots each expert received since the last ``reset_usage()``
            (counted while ``track_usage`` is True; not saved in the state dict).
        frozen_expert_idx: None, an int, or a (B, k) tensor set by ``frozen_routing``.
    """

    takes_routing = True

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] | str = 0,
        dilation: int | tuple[int, int] = 1,
        groups: int = 1,
        bias: bool = True,
        padding_mode: str = "zeros",
        device=None,
        dtype=None,
        *,
        num_experts: int = 2,
        top_k: int = 1,
        router: None | str | Router = None,
        backend: str = "auto",
        gate_score: str = "softmax",
    ):
        super().__init__()
        for name, value in (("in_channels", in_channels), ("out_channels", out_channels)):
            _check_int(value, name, 1)
        _check_int(num_experts, "num_experts", 1)
        _check_int(top_k, "top_k", 1)
        if top_k > num_experts:
            raise ValueError(f"top_k ({top_k}) must not exceed num_experts ({num_experts})")
        if out_channels % top_k:
            raise ValueError(f"out_channels ({out_channels}) must divide by top_k ({top_k})")
        if groups != 1:
            raise ValueError(f"groups must be 1 for SparseMoEConv2d, got {groups!r}")
        if padding_mode not in _PADDING_MODES:
            raise ValueError(f"padding_mode must be one of {_PADDING_MODES}, got {padding_mode!r}")
        if gate_score not in GATE_SCORES:
            raise ValueError(f"gate_score must be one of {GATE_SCORES}, got {gate_score!r}")
        self.gate_score = gate_score
        self.in_channels, self.out_channels = in_channels, out_channels
        self.kernel_size, self.stride, self.dilation = _pair(kernel_size), _pair(stride), _pair(dilation)
        for name, value, low in (("kernel_size", self.kernel_size, 1), ("stride", self.stride, 1)):
            for v in value:
                _check_int(v, name, low)
        for v in self.dilation:
            _check_int(v, "dilation", 1)
        self.padding = self._resolve_padding(padding)
        self.groups, self.padding_mode = 1, padding_mode
        self.num_experts, self.top_k = num_experts, top_k
        self.expert_width = out_channels // top_k
        self.backend = backend
        factory = {"device": device, "dtype": dtype}
        rows = num_experts * self.expert_width
        self.weight = nn.Parameter(torch.empty(rows, in_channels, *self.kernel_size, **factory))
        self.bias = nn.Parameter(torch.empty(rows, **factory)) if bias else None
        if router is None or isinstance(router, Router):
            self.router = router
        elif router == "per_layer":
            self.router = PerLayerRouter(in_channels, num_experts, **factory)
        else:
            raise ValueError(f"router must be None, 'per_layer' or a Router module, got {router!r}")
        self.track_usage = True
        self.register_buffer("expert_counts", torch.zeros(num_experts, dtype=torch.int64, device=device), False)
        self.frozen_expert_idx: None | int | torch.Tensor = None
        self.reset_parameters()

    def _resolve_padding(self, padding) -> tuple[int, int]:
        if padding == "valid":
            return (0, 0)
        if padding == "same":
            if self.stride != (1, 1):
                raise ValueError("padding='same' needs stride 1")
            pads = tuple(d * (k - 1) for d, k in zip(self.dilation, self.kernel_size, strict=True))
            if any(p % 2 for p in pads):
                raise ValueError("padding='same' needs an odd effective kernel size")
            return (pads[0] // 2, pads[1] // 2)
        pads = _pair(padding)
        for p in pads:
            _check_int(p, "padding", 0)
        return pads

    def reset_parameters(self) -> None:
        """``nn.Conv2d``'s initialisation (kaiming-uniform, a = sqrt(5)); fan-in is one expert's."""
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        if self.bias is not None:
            fan_in = self.in_channels * self.kernel_size[0] * self.kernel_size[1]
            bound = 1 / math.sqrt(fan_in)
            nn.init.uniform_(self.bias, -bound, bound)

    def reset_usage(self) -> None:
        """Zeroes ``expert_counts``."""
        self.expert_counts.zero_()

    def expert_usage(self) -> torch.Tensor:
        """(E,) share of routing slots per expert since the last reset (zeros if none)."""
        total = self.expert_counts.sum()
        counts = self.expert_counts.double()
        return counts / total if total > 0 else counts

    def shared_plan(self, x: torch.Tensor, routing: Routing | None, expert_idx: torch.Tensor) -> RoutingPlan | None:
        """The routing plan to pass to the op: ``routing.plan()`` (built once, shared by every layer driven by
        this routing) when ``expert_idx`` came from ``routing`` and the backend uses plans, else None (the op
        then builds its own when its backend uses one)."""
        if routing is None or routing.expert_idx is not expert_idx or self.frozen_expert_idx is not None:
            return None
        if not backend_uses_plan(resolve_backend(self.backend, x.device)):
            return None
        return routing.plan(self.num_experts)

    def route(self, x: torch.Tensor, routing: Routing | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The (expert_idx (B, k), gate (B, k) or None) this layer uses for input x (B, C_in, H, W)."""
        batch = x.shape[0]
        if self.frozen_expert_idx is not None:
            frozen = self.frozen_expert_idx
            if isinstance(frozen, int):
                experts = torch.arange(frozen, frozen + self.top_k, device=x.device) % self.num_experts
                return experts.expand(batch, self.top_k).contiguous(), None
            if frozen.shape != (batch, self.top_k):
                raise ValueError(
                    f"frozen routing has shape {tuple(frozen.shape)}, expected (B, top_k) = ({batch}, {self.top_k})"
                )
            return frozen.to(device=x.device, dtype=torch.int64), None
        if routing is None:
            if self.router is None:
                raise RuntimeError(
                    "SparseMoEConv2d has no router: pass routing=Routing(...) from a model-level router, "
                    "construct it with router='per_layer', or use advmoe.nn.frozen_routing"
                )
            routing = top_k_routing(self.router(x), self.top_k, score=self.gate_score)
            report_routing(self, router=routing)
        if routing.expert_idx.shape != (batch, self.top_k):
            raise ValueError(
                f"routing.expert_idx has shape {tuple(routing.expert_idx.shape)}, expected (B, top_k) = "
                f"({batch}, {self.top_k})"
            )
        return routing.expert_idx, routing.gate

    def forward(self, x: torch.Tensor, routing: Routing | None = None) -> torch.Tensor:
        """Sparse MoE convolution.

        Args:
            x: (B, C_in, H, W) input.
            routing: decisions of a model-level router (expert_idx (B, k), gate (B, k)), or None to use
                the layer's own router. Its cached ``RoutingPlan`` (``routing.plan()``) is shared with every
                other layer it drives.

        Returns:
            (B, out_channels, H_out, W_out); channels [j*w, (j+1)*w) hold the sample's j-th expert.
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"x must be a (B, C, H, W) tensor, got {getattr(x, 'shape', type(x).__name__)}")
        expert_idx, gate = self.route(x, routing)
        report_routing(self, expert_idx=expert_idx)
        if self.track_usage:
            with torch.no_grad():
                ones = torch.ones(1, dtype=torch.int64, device=x.device).expand(expert_idx.numel())
                self.expert_counts.index_add_(0, expert_idx.reshape(-1).to(self.expert_counts.device), ones)
        return run_sparse_conv(self, x, expert_idx, gate, plan=self.shared_plan(x, routing, expert_idx))

    def extra_repr(self) -> str:
        s = (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, stride={self.stride}, "
            f"num_experts={self.num_experts}, top_k={self.top_k}, expert_width={self.expert_width}"
        )
        if self.padding != (0, 0):
            s += f", padding={self.padding}"
        if self.dilation != (1, 1):
            s += f", dilation={self.dilation}"
        if self.bias is None:
            s += ", bias=False"
        if self.padding_mode != "zeros":
            s += f", padding_mode={self.padding_mode}"
        if self.backend != "auto":
            s += f", backend={self.backend!r}"
        return s


def _check_int(value: object, name: str, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise ValueError(f"{name} must be an int >= {low}, got {value!r}")
