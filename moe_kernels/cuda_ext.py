"""The ``cuda`` backend: the C++/CUDA extension ``moe_kernels._C_cuda`` (csrc/cuda/).

The extension registers the CUDA kernels of ``torch.ops.moe_kernels_C.sparse_moe_conv2d_fwd`` and
``..._bwd`` (schema in csrc/sparse_moe_conv2d.cpp, built into ``moe_kernels._C``). Its design: a stable
sort of the routing slots by expert on the device, a gather of each expert's samples, one cuDNN
convolution per expert on its weight slice, and fused CUDA kernels for the epilogue (bias, gate, scatter
into the compact output), the input-gradient scatter and the gate gradient.
"""

from __future__ import annotations

import torch

from moe_kernels.backends import BackendUnavailable
from moe_kernels.cpu_ext import _detached

_HOW_TO = (
    "the CUDA backend needs a CUDA build of torch and nvcc; reinstall with "
    "`ADVMOE_CUDA=1 pip install --no-build-isolation -e .` (set TORCH_CUDA_ARCH_LIST, e.g. 9.0, for your GPU)"
)

Pair = tuple[int, int]


def load():
    """Returns ``(forward, backward)`` of the CUDA backend, or raises BackendUnavailable with a how-to."""
    if torch.version.cuda is None:
        raise BackendUnavailable(f"torch {torch.__version__} is a CPU-only build: {_HOW_TO}")
    if not torch.cuda.is_available():
        raise BackendUnavailable("the CUDA backend needs a GPU, and torch sees none (torch.cuda.is_available())")
    try:
        # _C defines the torch.ops.moe_kernels_C schema, _C_cuda registers its CUDA kernels.
        from moe_kernels import _C, _C_cuda  # noqa: F401
    except ImportError as err:
        raise BackendUnavailable(f"the CUDA extension is not built ({err}); {_HOW_TO}") from None
    return forward, backward


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
) -> torch.Tensor:
    """Forward on CUDA tensors; arguments as in ``sparse_moe_conv2d_ref``.

    Args:
        x: (B, C_in, H, W) fp16/bf16/fp32/fp64 CUDA tensor.
        weight: (E * w, C_in, kh, kw).
        expert_idx: (B, k) int64 (or int32) in ``[0, E)``; checked again on the device.
        num_experts: E (at most 1024 on this backend).
        gate: (B, k) or None.
        bias: (E * w,) or None.
        stride, padding, dilation: int pairs.

    Returns:
        (B, k * w, H_out, W_out), contiguous.
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
) -> tuple[torch.Tensor | None, ...]:
    """Gradients for (x, weight, bias, gate), None where ``needs`` is False (or the input is None).

    Args:
        grad_out: (B, k * w, H_out, W_out) gradient of the output.
        x, weight, expert_idx, num_experts, gate, bias, stride, padding, dilation: as in ``forward``.
        needs: which of (x, weight, bias, gate) need a gradient.

    Returns:
        (grad_x (B, C_in, H, W), grad_weight (E*w, C_in, kh, kw), grad_bias (E*w,), grad_gate (B, k)).
    """
    needs = tuple(bool(n) for n in needs)
    needs = (needs[0], needs[1], needs[2] and bias is not None, needs[3] and gate is not None)
    grad_out, x, weight, gate, bias = _detached(grad_out, x, weight, gate, bias)
    grads = torch.ops.moe_kernels_C.sparse_moe_conv2d_bwd(
        grad_out, x, weight, expert_idx, gate, bias, num_experts, list(stride), list(padding), list(dilation),
        list(needs),
    )  # fmt: skip
    return tuple(g if n else None for g, n in zip(grads, needs, strict=True))
