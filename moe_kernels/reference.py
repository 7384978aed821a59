"""Reference backend of ``sparse_moe_conv2d``: pure PyTorch, obviously correct, always available.

It sorts the routing slots by expert, runs one dense convolution per expert on that expert's samples
and scatters the results into the compact output. Every other backend is tested against it, and it is
the fallback when no compiled backend is present.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_kernels.geometry import needed_grads, output_hw
from moe_kernels.plan import RoutingPlan

Pair = tuple[int, int]


def sparse_moe_conv2d_ref(
    x: torch.Tensor,
    weight: torch.Tensor,
    expert_idx: torch.Tensor,
    num_experts: int,
    gate: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    stride: Pair = (1, 1),
    padding: Pair = (0, 0),
    dilation: Pair = (1, 1),
    plan: RoutingPlan | None = None,
) -> torch.Tensor:
    """Forward of the sparse MoE convolution, differentiable by plain autograd.

    Args:
        x: (B, C_in, H, W) input.
        weight: (E * w, C_in, kh, kw) expert weights; rows ``[e*w, (e+1)*w)`` are expert e.
        expert_idx: (B, k) expert indices in ``[0, E)``.
        num_experts: E.
        gate: (B, k) gates, or None for all ones.
        bias: (E * w,) bias, or None.
        stride, padding, dilation: pairs of ints, as in ``F.conv2d``.
        plan: the ``RoutingPlan`` of expert_idx, or None to build one. Its ``ranges()`` is a host read of
            the per-expert offsets, made once per plan.

    Returns:
        (B, k * w, H_out, W_out): ``y[b, j*w:(j+1)*w] = gate[b, j] * conv(x[b], expert expert_idx[b, j])``.
    """
    batch, top_k = expert_idx.shape
    width = weight.shape[0] // num_experts
    groups = plan if plan is not None else RoutingPlan.build(expert_idx, num_experts)
    h_out, w_out = output_hw(x, weight, stride, padding, dilation)
    out = x.new_zeros(batch, top_k, width, h_out, w_out)
    for e, start, end in groups.ranges():
        rows = slice(e * width, (e + 1) * width)
        sample, slot = groups.sample[start:end], groups.slot[start:end]
        y = F.conv2d(x[sample], weight[rows], None if bias is None else bias[rows], stride, padding, dilation)
        out = out.index_put((sample, slot), y)
    if gate is not None:
        out = out * gate.to(out.dtype)[:, :, None, None, None]
    return out.reshape(batch, top_k * width, h_out, w_out)


def sparse_moe_conv2d_backward_ref(
    grad_out: torch.Tensor,
    x: torch.Tensor,
    weight: torch.Tensor,
    expert_idx: torch.Tensor,
    num_experts: int,
    gate: torch.Tensor | None,
    bias: torch.Tensor | None,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    needs: tuple[bool, bool, bool, bool],
    plan: RoutingPlan | None = None,
) -> tuple[torch.Tensor | None, ...]:
    """Explicit backward: gradients for (x, weight, bias, gate), None where ``needs`` is False.

    The gate gradient uses the adjoint identity ``<g, conv(x, W)> = <conv_T(g, W), x>``: the
    unscaled input gradient of each slot, dotted with its sample, plus ``<sum_hw g, bias>``. No
    forward activation is stored or recomputed.

    Args:
        grad_out: (B, k * w, H_out, W_out) gradient of the output.
        x, weight, expert_idx, num_experts, gate, bias, stride, padding, dilation: as in the forward.
        needs: which of (x, weight, bias, gate) need a gradient.
        plan: the ``RoutingPlan`` of expert_idx, or None to build one.

    Returns:
        (grad_x (B, C_in, H, W), grad_weight (E*w, C_in, kh, kw), grad_bias (E*w,), grad_gate (B, k)).
    """
    need_x, need_w, need_b, need_g = needed_grads(needs, bias, gate)
    batch, top_k = expert_idx.shape
    width = weight.shape[0] // num_experts
    grad_slots = grad_out.reshape(batch, top_k, width, *grad_out.shape[2:])
    groups = plan if plan is not None else RoutingPlan.build(expert_idx, num_experts)
    grad_x = torch.zeros_like(x, memory_format=torch.contiguous_format) if need_x else None
    grad_w = torch.zeros_like(weight, memory_format=torch.contiguous_format) if need_w else None
    grad_b = torch.zeros_like(bias) if need_b else None
    grad_g = torch.zeros(batch, top_k, dtype=gate.dtype, device=x.device) if need_g else None
    for e, start, end in groups.ranges():
        rows = slice(e * width, (e + 1) * width)
        sample, slot = groups.sample[start:end], groups.slot[start:end]
        g = grad_slots[sample, slot]  # (n_e, w, H_out, W_out)
        x_e, w_e = x[sample], weight[rows]
        g_scaled = g if gate is None else g * gate[sample, slot].to(g.dtype)[:, None, None, None]
        if need_w or need_b:
            _, gw, gb = torch.ops.aten.convolution_backward(
                g_scaled, x_e, w_e, [width], stride, padding, dilation, False, [0, 0], 1, [False, need_w, need_b]
            )
            if need_w:
                grad_w[rows] += gw
            if need_b:
                grad_b[rows] += gb
        if need_x or need_g:
            gx_unscaled = torch.ops.aten.convolution_backward(
                g, x_e, w_e, None, stride, padding, dilation, False, [0, 0], 1, [True, False, False]
            )[0]
            if need_g:
                acc = torch.float64 if x.dtype == torch.float64 else torch.float32
                dot = (gx_unscaled.to(acc) * x_e.to(acc)).sum((1, 2, 3))
                if bias is not None:
                    dot = dot + (g.to(acc).sum((2, 3)) * bias[rows].to(acc)).sum(1)
                grad_g[sample, slot] = dot.to(grad_g.dtype)
            if need_x:
                if gate is not None:
                    gx_unscaled = gx_unscaled * gate[sample, slot].to(gx_unscaled.dtype)[:, None, None, None]
                grad_x.index_add_(0, sample, gx_unscaled)
    return grad_x, grad_w, grad_b, grad_g
