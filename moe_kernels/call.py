"""One call of ``sparse_moe_conv2d`` as every backend receives it: the validated arguments in one object, and
what the backends derive from them (batch, top-k, expert width, output size, routing plan, zero gradients).

A backend is ``forward(call) -> y`` and ``backward(grad_out, call, needs) -> (grad_x, grad_weight, grad_bias,
grad_gate)``; the op builds the ``ConvCall`` once from its arguments (``moe_kernels.op``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from moe_kernels.geometry import needed_grads, output_hw
from moe_kernels.plan import RoutingPlan

Pair = tuple[int, int]


@dataclass(frozen=True)
class ConvCall:
    """The arguments of one op call, as ``sparse_moe_conv2d`` documents them (validated there).

    Attributes:
        x: (B, C_in, H, W); weight: (E*w, C_in, kh, kw), rows ``[e*w, (e+1)*w)`` of expert e; expert_idx: (B, k)
            in ``[0, E)``; num_experts: E; gate: (B, k) or None (all ones); bias: (E*w,) or None.
        stride, padding, dilation: int pairs.
        plan: the ``RoutingPlan`` of expert_idx, or None (``routing_plan()`` then builds one).
    """

    x: torch.Tensor
    weight: torch.Tensor
    expert_idx: torch.Tensor
    num_experts: int
    gate: torch.Tensor | None = None
    bias: torch.Tensor | None = None
    stride: Pair = (1, 1)
    padding: Pair = (0, 0)
    dilation: Pair = (1, 1)
    plan: RoutingPlan | None = None

    @property
    def batch(self) -> int:
        """B."""
        return self.expert_idx.shape[0]

    @property
    def top_k(self) -> int:
        """k, the routing slots per sample."""
        return self.expert_idx.shape[1]

    @property
    def width(self) -> int:
        """w, the output channels of one expert."""
        return self.weight.shape[0] // self.num_experts

    @property
    def out_hw(self) -> Pair:
        """(H_out, W_out)."""
        return output_hw(self.x, self.weight, self.stride, self.padding, self.dilation)

    def routing_plan(self) -> RoutingPlan:
        """The plan passed with the call, or one built here from expert_idx."""
        return self.plan if self.plan is not None else RoutingPlan.build(self.expert_idx, self.num_experts)

    def zero_grads(
        self, needs: tuple[bool, bool, bool, bool]
    ) -> tuple[torch.Tensor | None, torch.Tensor | None, torch.Tensor | None, torch.Tensor | None]:
        """Zero gradients to accumulate into, None where not needed (bias/gate also when absent).

        Returns:
            (grad_x (B, C_in, H, W), grad_weight (E*w, C_in, kh, kw), grad_bias (E*w,), grad_gate (B, k)),
            contiguous.
        """
        need_x, need_w, need_b, need_g = needed_grads(needs, self.bias, self.gate)
        x, weight = self.x, self.weight
        return (
            torch.zeros_like(x, memory_format=torch.contiguous_format) if need_x else None,
            torch.zeros_like(weight, memory_format=torch.contiguous_format) if need_w else None,
            torch.zeros_like(self.bias) if need_b else None,
            torch.zeros(self.batch, self.top_k, dtype=self.gate.dtype, device=x.device) if need_g else None,
        )
