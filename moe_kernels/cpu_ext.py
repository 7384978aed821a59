"""The ``cpu`` backend: the C++ extension ``moe_kernels._C`` (csrc/cpu/sparse_moe_conv2d_kernel.cpp).

The kernels are registered as ``torch.ops.moe_kernels_C.sparse_moe_conv2d_fwd`` and
``torch.ops.moe_kernels_C.sparse_moe_conv2d_bwd`` for the CPU dispatch key; this module wraps them in the
backend signatures of ``moe_kernels.reference``. The C++ side checks every argument again, so calling the
torch ops directly with bad input raises a RuntimeError instead of reading out of bounds.
"""

from __future__ import annotations

import torch

from moe_kernels.backends import BackendUnavailable

Pair = tuple[int, int]


def _detached(*tensors: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Detached views: the compiled op has no autograd kernel (gradients come from the registered backward
    op), and without this its autograd fallback rejects inference-mode inputs next to parameters."""
    return [None if t is None else t.detach() for t in tensors]


def _forward(
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
    """(B, C_in, H, W) -> (B, k*w, H_out, W_out); see ``moe_kernels.reference.sparse_moe_conv2d_ref``."""
    x, weight, gate, bias = _detached(x, weight, gate, bias)
    return torch.ops.moe_kernels_C.sparse_moe_conv2d_fwd(
        x, weight, expert_idx, gate, bias, num_experts, list(stride), list(padding), list(dilation)
    )


def _backward(
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
    """Gradients of (x, weight, bias, gate), None where ``needs`` is False (or the input is None)."""
    needs = tuple(bool(n) for n in needs)
    grad_out, x, weight, gate, bias = _detached(grad_out, x, weight, gate, bias)
    grads = torch.ops.moe_kernels_C.sparse_moe_conv2d_bwd(
        grad_out, x, weight, expert_idx, gate, bias, num_experts, list(stride), list(padding), list(dilation),
        list(needs),
    )  # fmt: skip
    present = (True, True, bias is not None, gate is not None)
    return tuple(g if (n and p) else None for g, n, p in zip(grads, needs, present, strict=True))


def load():
    """Returns ``(forward, backward)`` of the C++ CPU backend, or raises BackendUnavailable with a how-to."""
    try:
        from moe_kernels import _C  # noqa: F401  (registers torch.ops.moe_kernels_C.*)
    except ImportError as err:
        raise BackendUnavailable(
            f"the C++ CPU backend is not built ({err}). Build it with "
            "`pip install --no-build-isolation -e .` from the repository root (torch must be installed first)."
        ) from None
    if not hasattr(torch.ops.moe_kernels_C, "sparse_moe_conv2d_fwd"):
        raise BackendUnavailable(
            "moe_kernels._C was built without the CPU kernels; reinstall with `pip install --no-build-isolation -e .`"
        )
    return _forward, _backward
