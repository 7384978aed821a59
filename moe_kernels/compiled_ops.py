"""Backend wrappers of the compiled ops ``torch.ops.moe_kernels_C.sparse_moe_conv2d_fwd`` / ``_bwd``.

One schema (csrc/sparse_moe_conv2d.cpp, built into ``moe_kernels._C``) with a kernel per dispatch key: the
C++ CPU kernel (``cpu`` backend) and the CUDA kernel of ``moe_kernels._C_cuda`` (``cuda`` backend). The
dispatcher picks the kernel from the tensors' device, so both backends share these wrappers, which give
the ops the backend signatures (``moe_kernels.call``). The C++ side checks every argument again, so
calling the ops directly with bad input raises instead of reading out of bounds.
"""

from __future__ import annotations

import torch

from moe_kernels.call import ConvCall
from moe_kernels.geometry import needed_grads


def _detached(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Detached views: the compiled op has no autograd kernel (gradients come from the registered backward
    op), and without this its autograd fallback rejects inference-mode inputs next to parameters."""
    return [None if t is None else t.detach() for t in tensors]


def _conv_lists(call: ConvCall) -> tuple[list[int], list[int], list[int]]:
    """stride, padding, dilation as the lists the compiled ops' schema takes."""
    return list(call.stride), list(call.padding), list(call.dilation)


def forward(call: ConvCall) -> torch.Tensor:
    """Forward of the op call: x (B, C_in, H, W) fp16/bf16/fp32/fp64, expert_idx (B, k) int64 (or int32) in
    ``[0, E)`` (checked again by the kernel) -> (B, k * w, H_out, W_out).

    The compiled kernels sort the routing slots themselves; ``call.plan`` is not used (the CUDA kernel's own
    grouping is unchanged, see docs/op.md).
    """
    x, weight, gate, bias = _detached(call.x, call.weight, call.gate, call.bias)
    return torch.ops.moe_kernels_C.sparse_moe_conv2d_fwd(
        x, weight, call.expert_idx, gate, bias, call.num_experts, *_conv_lists(call)
    )


def backward(
    grad_out: torch.Tensor, call: ConvCall, needs: tuple[bool, bool, bool, bool]
) -> tuple[torch.Tensor | None, ...]:
    """Gradients for (x, weight, bias, gate), None where ``needs`` is False (or the input is None).

    Args:
        grad_out: (B, k * w, H_out, W_out) gradient of the output.
        call: the op call (``call.plan`` is not used).
        needs: which of (x, weight, bias, gate) need a gradient.

    Returns:
        (grad_x (B, C_in, H, W), grad_weight (E*w, C_in, kh, kw), grad_bias (E*w,), grad_gate (B, k)).
    """
    needs = needed_grads(needs, call.bias, call.gate)
    grad_out, x, weight, gate, bias = _detached(grad_out, call.x, call.weight, call.gate, call.bias)
    grads = torch.ops.moe_kernels_C.sparse_moe_conv2d_bwd(
        grad_out, x, weight, call.expert_idx, gate, bias, call.num_experts, *_conv_lists(call), list(needs)
    )
    return tuple(g if n else None for g, n in zip(grads, needs, strict=True))
