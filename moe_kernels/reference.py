"""Reference backend of ``sparse_moe_conv2d``: pure PyTorch, obviously correct, always available.

It sorts the routing slots by expert, runs one dense convolution per expert on that expert's samples
and scatters the results into the compact output. Every other backend is tested against it, and it is
the fallback when no compiled backend is present. ``sparse_moe_conv2d_ref`` /
``sparse_moe_conv2d_backward_ref`` take the op's arguments one by one; ``forward`` / ``backward`` are the
backend entry points on a ``ConvCall``; ``expert_grads`` is the per-expert backward step, shared with the
``slices`` backend.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_kernels.call import ConvCall
from moe_kernels.geometry import needed_grads
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
    return forward(ConvCall(x, weight, expert_idx, num_experts, gate, bias, stride, padding, dilation, plan))


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
    call = ConvCall(x, weight, expert_idx, num_experts, gate, bias, stride, padding, dilation, plan)
    return backward(grad_out, call, needs)


def forward(call: ConvCall) -> torch.Tensor:
    """Backend forward (see ``sparse_moe_conv2d_ref``): (B, k * w, H_out, W_out)."""
    x, weight, bias = call.x, call.weight, call.bias
    batch, top_k, width = call.batch, call.top_k, call.width
    groups = call.routing_plan()
    h_out, w_out = call.out_hw
    out = x.new_zeros(batch, top_k, width, h_out, w_out)
    for e, start, end in groups.ranges():
        rows = slice(e * width, (e + 1) * width)
        sample, slot = groups.sample[start:end], groups.slot[start:end]
        y = F.conv2d(
            x[sample], weight[rows], None if bias is None else bias[rows], call.stride, call.padding, call.dilation
        )
        out = out.index_put((sample, slot), y)
    if call.gate is not None:
        out = out * call.gate.to(out.dtype)[:, :, None, None, None]
    return out.reshape(batch, top_k * width, h_out, w_out)


def backward(
    grad_out: torch.Tensor, call: ConvCall, needs: tuple[bool, bool, bool, bool]
) -> tuple[torch.Tensor | None, ...]:
    """Backend backward (see ``sparse_moe_conv2d_backward_ref``): (grad_x, grad_weight, grad_bias, grad_gate)."""
    need_x, need_w, need_b, need_g = needed_grads(needs, call.bias, call.gate)
    batch, top_k, width = call.batch, call.top_k, call.width
    grad_slots = grad_out.reshape(batch, top_k, width, *grad_out.shape[2:])
    groups = call.routing_plan()
    grad_x, grad_w, grad_b, grad_g = call.zero_grads(needs)
    for e, start, end in groups.ranges():
        rows = slice(e * width, (e + 1) * width)
        sample, slot = groups.sample[start:end], groups.slot[start:end]
        g = grad_slots[sample, slot]  # (n_e, w, H_out, W_out)
        gate_e = None if call.gate is None else call.gate[sample, slot].to(g.dtype)[:, None, None, None]
        gx, gw, gb, gate_dot = expert_grads(call, rows, g, call.x[sample], gate_e, need_x, need_w, need_b, need_g)
        if need_w:
            grad_w[rows] += gw
        if need_b:
            grad_b[rows] += gb
        if need_g:
            grad_g[sample, slot] = gate_dot.to(grad_g.dtype)
        if need_x:
            grad_x.index_add_(0, sample, gx)
    return grad_x, grad_w, grad_b, grad_g


def expert_grads(
    call: ConvCall,
    rows: slice,
    g: torch.Tensor,
    x_e: torch.Tensor,
    gate_e: torch.Tensor | None,
    need_x: bool,
    need_w: bool,
    need_b: bool,
    need_g: bool,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients from one expert's run of n routing slots (``aten.convolution_backward``, adjoint gate gradient).

    Args:
        call: the op call (weight, bias, stride, padding, dilation are used).
        rows: the expert's rows of weight and bias.
        g: (n, w, H_out, W_out) gradient of the run's outputs, not scaled by the gate.
        x_e: (n, C_in, H, W) the run's samples.
        gate_e: (n, 1, 1, 1) the run's gates in g's dtype, or None.
        need_x, need_w, need_b, need_g: which gradients to compute.

    Returns:
        (grad_x_e (n, C_in, H, W) gate-scaled, grad_weight_e (w, C_in, kh, kw), grad_bias_e (w,),
        grad_gate_e (n,) in fp32, fp64 for fp64 inputs), None where not needed.
    """
    w_e = call.weight[rows]
    conv = (call.stride, call.padding, call.dilation, False, [0, 0], 1)
    gx = gw = gb = gate_dot = None
    if need_w or need_b:
        g_scaled = g if gate_e is None else g * gate_e
        _, gw, gb = torch.ops.aten.convolution_backward(
            g_scaled, x_e, w_e, [w_e.shape[0]], *conv, [False, need_w, need_b]
        )
    if need_x or need_g:
        gx = torch.ops.aten.convolution_backward(g, x_e, w_e, None, *conv, [True, False, False])[0]
        if need_g:
            acc = torch.float64 if call.x.dtype == torch.float64 else torch.float32
            gate_dot = (gx.to(acc) * x_e.to(acc)).sum((1, 2, 3))
            if call.bias is not None:
                gate_dot = gate_dot + (g.to(acc).sum((2, 3)) * call.bias[rows].to(acc)).sum(1)
        if gate_e is not None and need_x:
            gx = gx * gate_e.to(gx.dtype)
    return (gx if need_x else None), gw, gb, gate_dot
