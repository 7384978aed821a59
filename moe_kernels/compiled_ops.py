"""Backend wrappers of the compiled ops ``torch.ops.moe_kernels_C.sparse_moe_conv2d_fwd`` / ``_bwd``.

One schema (csrc/sparse_moe_conv2d.cpp, built into ``moe_kernels._C``) with a kernel per dispatch key: the
C++ CPU kernel (``cpu`` backend) and the CUDA kernel of ``moe_kernels._C_cuda`` (``cuda`` backend). The
dispatcher picks the kernel from the tensors' device, so both backends share these wrappers, which give
the ops the backend signatures of ``moe_kernels.reference``. The C++ side checks every argument again, so
calling the ops directly with bad input raises instead of reading out of bounds.
"""

from __future__ import annotations

import torch

from moe_kernels.geometry import needed_grads

Pair = tuple[int, int]


def _detached(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Detached views: the compiled op has no autograd kernel (gradients come from the registered backward
    op), and without this its autograd fallback rejects inference-mode inputs next to parameters."""
    return [None if t is None else t.detach() for t in tensors]


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
    plan=None,
) -> torch.Tensor:
    """Forward; arguments as in ``moe_kernels.reference.sparse_moe_conv2d_ref``.

    The compiled kernels sort the routing slots themselves; ``plan`` is accepted for the backend signature and
    not used (the CUDA kernel's own grouping is unchanged, see docs/op.md).

    Args:
        x: (B, C_in, H, W) fp16/bf16/fp32/fp64.
        weight: (E * w, C_in, kh, kw).
        expert_idx: (B, k) int64 (or int32) in ``[0, E)``; checked again by the kernel.
        num_experts: E.
        gate: (B, k) or None.
        bias: (E * w,) or None.
        stride, padding, dilation: int pairs.

    Returns:
        (B, k * w, H_out, W_out).
    """
    x, weight, gate, bias = _detached(x, weight, gate, bias)
    return torch.ops.moe_kernels_C.sparse_moe_conv2d_fwd(
        x, weight, expert_idx, gate, bias, num_experts, list(stride), list(padding), list(dilation)
    )


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
    plan=None,
) -> tuple[torch.Tensor | None, ...]:
    """Gradients for (x, weight, bias, gate), None where ``needs`` is False (or the input is None).

    ``plan`` is accepted for the backend signature and not used.

    Args:
        grad_out: (B, k * w, H_out, W_out) gradient of the output.
        x, weight, expert_idx, num_experts, gate, bias, stride, padding, dilation: as in ``forward``.
        needs: which of (x, weight, bias, gate) need a gradient.

    Returns:
        (grad_x (B, C_in, H, W), grad_weight (E*w, C_in, kh, kw), grad_bias (E*w,), grad_gate (B, k)).
    """
    needs = needed_grads(needs, bias, gate)
    grad_out, x, weight, gate, bias = _detached(grad_out, x, weight, gate, bias)
    grads = torch.ops.moe_kernels_C.sparse_moe_conv2d_bwd(
        grad_out, x, weight, expert_idx, gate, bias, num_experts, list(stride), list(padding), list(dilation),
        list(needs),
    )  # fmt: skip
    return tuple(g if n else None for g, n in zip(grads, needs, strict=True))
