"""The ``slices`` backend: one library convolution (cuDNN on a GPU, oneDNN on CPU) per expert over the
routing plan, on contiguous slices of the batch where the layout allows.

For each expert with slots, the plan says (in ONE host read per plan, cached: ``RoutingPlan.host_groups``)
where its run of sorted slots starts and ends, and whether those slots are consecutive samples with one
slot position (a batch already grouped by expert, B = 1, or E = 1). Then the expert's input is the slice
``x[s0:s1]`` and its output is written straight into ``y[s0:s1, j*w:(j+1)*w]``: no gather, no scatter.
Otherwise the expert's samples are gathered (``gather_rows``: ``index_select`` that keeps channels_last) and
its output rows written with one ``index_copy_``. The gate multiplies the expert's output on the way into
the output (one pass).

The one host read is what drives the per-expert library calls; with a shared plan it happens once per
forward, not once per layer. The backward runs the same grouping (``aten.convolution_backward`` per expert;
gate gradient by the adjoint identity, as in the reference). Runs on CPU and CUDA tensors; GPU speed is
unmeasured.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from moe_kernels.call import ConvCall
from moe_kernels.geometry import gather_rows, needed_grads, output_memory_format
from moe_kernels.reference import expert_grads


def forward(call: ConvCall) -> torch.Tensor:
    """Forward of the op call (validated by the op; see ``moe_kernels.reference.sparse_moe_conv2d_ref``).

    Returns:
        (B, k*w, H_out, W_out), in x's memory format.
    """
    x, weight, bias, gate = call.x, call.weight, call.bias, call.gate
    plan = call.routing_plan()
    batch, top_k, width = call.batch, call.top_k, call.width
    h_out, w_out = call.out_hw
    out = torch.empty(
        batch,
        top_k * width,
        h_out,
        w_out,
        dtype=x.dtype,
        device=x.device,
        memory_format=output_memory_format(x) if top_k == 1 else torch.contiguous_format,
    )
    out_slots = out.view(batch * top_k, width, h_out, w_out) if top_k > 1 else out  # k = 1: slot index = sample
    gate_sorted = None if gate is None else gate.reshape(-1)[plan.sample * top_k + plan.slot]
    for e, start, end, first_sample, slot in plan.host_groups():
        rows = slice(e * width, (e + 1) * width)
        n = end - start
        x_e = x[first_sample : first_sample + n] if first_sample >= 0 else gather_rows(x, plan.sample[start:end])
        y_e = F.conv2d(
            x_e, weight[rows], None if bias is None else bias[rows], call.stride, call.padding, call.dilation
        )
        if gate_sorted is not None:
            y_e = y_e * gate_sorted[start:end, None, None, None].to(y_e.dtype)
        if first_sample >= 0:
            out[first_sample : first_sample + n, slot * width : (slot + 1) * width].copy_(y_e)
        else:
            out_slots.index_copy_(0, plan.sample[start:end] * top_k + plan.slot[start:end], y_e)
    return out


def backward(
    grad_out: torch.Tensor, call: ConvCall, needs: tuple[bool, bool, bool, bool]
) -> tuple[torch.Tensor | None, ...]:
    """Gradients for (x, weight, bias, gate), None where not needed; the per-expert step is the reference's
    ``expert_grads``.

    Args:
        grad_out: (B, k*w, H_out, W_out) gradient of the output.
        call: the op call; needs: which of (x, weight, bias, gate) need a gradient.

    Returns:
        (grad_x (B, C_in, H, W), grad_weight (E*w, C_in, kh, kw), grad_bias (E*w,), grad_gate (B, k)).
    """
    need_x, need_w, need_b, need_g = needed_grads(needs, call.bias, call.gate)
    x, gate = call.x, call.gate
    plan = call.routing_plan()
    batch, top_k, width = call.batch, call.top_k, call.width
    grad_x, grad_w, grad_b, grad_g = call.zero_grads(needs)
    grad_g_flat = None if grad_g is None else grad_g.view(-1)
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
            x_e = gather_rows(x, plan.sample[start:end])
            g = gather_rows(grad_slots, flat_slots)
        gate_e = None if gate is None else gate.reshape(-1)[flat_slots].to(g.dtype)[:, None, None, None]
        gx, gw, gb, gate_dot = expert_grads(call, rows, g, x_e, gate_e, need_x, need_w, need_b, need_g)
        if need_w:
            grad_w[rows] += gw
        if need_b:
            grad_b[rows] += gb
        if need_g:
            grad_g_flat.index_copy_(0, flat_slots, gate_dot.to(grad_g.dtype))
        if need_x and first_sample >= 0:
            grad_x[first_sample : first_sample + n] += gx
        elif need_x:
            grad_x.index_add_(0, plan.sample[start:end], gx)
    return grad_x, grad_w, grad_b, grad_g


def load():
    """Returns ``(forward, backward)``; the backend needs only torch."""
    return forward, backward
