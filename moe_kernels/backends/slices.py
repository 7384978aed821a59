"""The ``slices`` backend: one library convolution (cuDNN on a GPU, oneDNN on CPU) per expert over the
routing plan, on contiguous slices of the batch where the layout allows.

For each expert with slots, the plan says (in ONE host read per plan, cached: ``RoutingPlan.host_groups``)
where its run of sorted slots starts and ends, and whether those slots are consecutive samples with one
slot position (a batch already grouped by expert, B = 1, or E = 1). Then the expert's input is the slice
``x[s0:s1]`` and its output is written straight into ``y[s0:s1, j*w:(j+1)*w]``: no gather, no scatter.
Otherwise the expert's samples are gathered (``index_select``) and its output rows written with one
``index_copy_``. The gate multiplies the expert's output on the way into the output (one pass).

The one host read is what drives the per-expert library calls; with a shared plan it happens once per
forward, not once per layer. The backward runs the same grouping (``aten.convolution_backward`` per expert;
gate gradient by the adjoint identity, as in the reference). Runs on CPU and CUDA tensors; GPU speed is
unmeasured.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_kernels.geometry import needed_grads, output_hw, output_memory_format
from moe_kernels.plan import RoutingPlan

Pair = tuple[int, int]


def forward(
    x: torch.Tensor,
    weight: torch.Tensor,
    expert_idx: torch.Tensor,
    num_experts: int,
    gate: torch.Tensor | None,
    bias: torch.Tensor | None,
    stride: Pair,
    padding: Pair,
    dilation: Pair,
    plan: RoutingPlan | None = None,
) -> torch.Tensor:
    """Forward (arguments validated by the op; see ``moe_kernels.reference.sparse_moe_conv2d_ref``).

    Args:
        x: (B, C_in, H, W); weight: (E*w, C_in, kh, kw); expert_idx: (B, k); num_experts: E;
        gate: (B, k) or None; bias: (E*w,) or None; stride, padding, dilation: int pairs.
        plan: the ``RoutingPlan`` of expert_idx, or None to build one.

    Returns:
        (B, k*w, H_out, W_out), in x's memory format.
    """
    plan = plan if plan is not None else RoutingPlan.build(expert_idx, num_experts)
    batch, top_k = expert_idx.shape
    width = weight.shape[0] // num_experts
    h_out, w_out = output_hw(x, weight, stride, padding, dilation)
    out = torch.empty(batch, top_k * width, h_out, w_out, dtype=x.dtype, device=x.device,
                      memory_format=output_memory_format(x) if top_k == 1 else torch.contiguous_format)  # fmt: skip
    out_slots = out.view(batch * top_k, width, h_out, w_out) if top_k > 1 else out  # k = 1: slot index = sample
    gate_sorted = None if gate is None else gate.reshape(-1)[plan.sample * top_k + plan.slot]
    for e, start, end, first_sample, slot in plan.host_groups():
        rows = slice(e * width, (e + 1) * width)
        n = end - start
        x_e = x[first_sample : first_sample + n] if first_sample >= 0 else x.index_select(0, plan.sample[start:end])
        y_e = F.conv2d(x_e, weight[rows], None if bias is None else bias[rows], stride, padding, dilation)
        if gate_sorted is not None:
            y_e = y_e * gate_sorted[start:end, None, None, None].to(y_e.dtype)
        if first_sample >= 0:
            out[first_sample : first_sample + n, slot * width : (slot + 1) * width].copy_(y_e)
        else:
            out_slots.index_copy_(0, plan.sample[start:end] * top_k + plan.slot[start:end], y_e)
    return out


def backward(
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
    """Gradients for (x, weight, bias, gate), None where not needed (arguments as in ``forward``).

    Returns:
        (grad_x (B, C_in, H, W), grad_weight (E*w, C_in, kh, kw), grad_bias (E*w,), grad_gate (B, k)).
    """
    need_x, need_w, need_b, need_g = needed_grads(needs, bias, gate)
    plan = plan if plan is not None else RoutingPlan.build(expert_idx, num_experts)
    batch, top_k = expert_idx.shape
    width = weight.shape[0] // num_experts
    grad_x = torch.zeros_like(x, memory_format=torch.contiguous_format) if need_x else None
    grad_w = torch.zeros_like(weight, memory_format=torch.contiguous_format) if need_w else None
    grad_b = torch.zeros_like(bias) if need_b else None
    grad_g = torch.zeros(batch * top_k, dtype=gate.dtype, device=x.device) if need_g else None
    grad_slots = None
    for e, start, end, first_sample, slot in plan.host_groups():
        rows = slice(e * width, (e + 1) * width)
        n = end - start
        flat_slots = plan.sample[start:end] * top_k + plan.slot[start:end]
        if first_sample >= 0:
            x_e = x[first_sample : first_sample + n]
            g = grad_out[first_sample : first_sample + n, slot * width : (slot + 1) * width]
        else:
            if grad_slots is None:
                grad_slots = grad_out.reshape(batch * top_k, width, *grad_out.shape[2:])
            x_e = x.index_select(0, plan.sample[start:end])
            g = grad_slots.index_select(0, flat_slots)
        w_e = weight[rows]
        gate_e = None if gate is None else gate.reshape(-1)[flat_slots].to(g.dtype)[:, None, None, None]
        if need_w or need_b:
            g_scaled = g if gate_e is None else g * gate_e
            _, gw, gb = torch.ops.aten.convolution_backward(
                g_scaled, x_e, w_e, [width], stride, padding, dilation, False, [0, 0], 1, [False, need_w, need_b]
            )
            if need_w:
                grad_w[rows] += gw
            if need_b:
                grad_b[rows] += gb
        if need_x or need_g:
            gx = torch.ops.aten.convolution_backward(
                g, x_e, w_e, None, stride, padding, dilation, False, [0, 0], 1, [True, False, False]
            )[0]
            if need_g:
                acc = torch.float64 if x.dtype == torch.float64 else torch.float32
                dot = (gx.to(acc) * x_e.to(acc)).sum((1, 2, 3))
                if bias is not None:
                    dot = dot + (g.to(acc).sum((2, 3)) * bias[rows].to(acc)).sum(1)
                grad_g.index_copy_(0, flat_slots, dot.to(grad_g.dtype))
            if need_x:
                if gate_e is not None:
                    gx = gx * gate_e
                if first_sample >= 0:
                    grad_x[first_sample : first_sample + n] += gx
                else:
                    grad_x.index_add_(0, plan.sample[start:end], gx)
    return grad_x, grad_w, grad_b, None if grad_g is None else grad_g.reshape(batch, top_k)


def load():
    """Returns ``(forward, backward)``; the backend needs only torch."""
    return forward, backward
