"""The ``triton`` backend of ``sparse_moe_conv2d``: entry points over the NHWC kernels in ``moe_kernels._triton``.

Design (docs/triton.md): the B*k routing slots are sorted by expert (the ``RoutingPlan``, shared by the layers
of one routing, or sorted here); every GEMM row (an output pixel of a slot in the forward and the weight
gradient, an input pixel in the input gradient) then belongs to one expert, and the plan's tile table cuts
each expert's rows into tiles padded only at expert boundaries. The forward and the input gradient are
channels_last implicit GEMMs over that tile table on a persistent grid, with the epilogue (bias, gate,
residual, ReLU, cast) fused into the store; the weight gradient is a per-expert reduction into fp32 partials
plus one deterministic reduce. Nothing synchronises with the host. NCHW inputs are converted to channels_last
once per call.

Calls the kernels cannot serve (fp64 on a GPU, more than 2**31 - 1 GEMM rows) run on the reference backend
after a one-time warning that names the reason.
"""

from __future__ import annotations

import importlib

import torch

from moe_kernels.backends.errors import BackendUnavailable
from moe_kernels.call import ConvCall
from moe_kernels.reference import backward as reference_backward
from moe_kernels.reference import forward as reference_forward

Pair = tuple[int, int]


def _fallback_reason(call: ConvCall, pixels: int) -> str | None:
    from moe_kernels._triton.launcher import unsupported_reason

    return unsupported_reason(call.x, call.expert_idx.numel(), pixels)


def forward(call: ConvCall) -> torch.Tensor:
    """Forward of the op call on the Triton kernels (arguments validated by the op).

    Args:
        call: the op call; ``call.plan`` is the ``RoutingPlan`` of expert_idx (sorted slots, cached tile
            tables), or None to sort here.

    Returns:
        y: (B, k*w, H_out, W_out) in x's dtype, channels_last when x is.
    """
    return forward_fused(call)


def forward_fused(
    call: ConvCall, residual: torch.Tensor | None = None, relu: bool = False, grouped_out: bool = False
) -> torch.Tensor:
    """Inference forward with the fused epilogue ``relu?(gate * (conv + bias) + residual)`` (no autograd).

    Args:
        call: as in ``forward``; for folded BatchNorm pass the scaled weight and the folded bias.
        residual: None or a tensor of the output's shape (any strides; grouped: (B*k*H_out*W_out, w)).
        relu: fuse a ReLU after the residual add.
        grouped_out: return (B*k*H_out*W_out, w) rows in expert-sorted slot order
            (``moe_kernels._triton.launcher.sorted_slots``, the same order as ``RoutingPlan``) instead of
            (B, k*w, H_out, W_out).

    Returns:
        The output in x's dtype (scattered: x's memory format).
    """
    from moe_kernels._triton.launcher import conv_forward, warn_fallback_once

    h_out, w_out = call.out_hw
    reason = _fallback_reason(call, h_out * w_out)
    if reason is None:
        return conv_forward(call, residual=residual, relu=relu, grouped_out=grouped_out)
    warn_fallback_once(reason)
    if grouped_out:
        raise ValueError(f"grouped_out=True needs the Triton kernels, which cannot run this call: {reason}")
    y = reference_forward(call)
    y = y + residual if residual is not None else y
    return torch.relu(y) if relu else y


def backward(
    grad_out: torch.Tensor, call: ConvCall, needs: tuple[bool, bool, bool, bool]
) -> tuple[torch.Tensor | None, ...]:
    """Backward of the op call on the Triton kernels (weight, bias and gate gradients deterministic).

    Args:
        grad_out: (B, k*w, H_out, W_out) gradient of the output (any strides).
        call: as in ``forward``.
        needs: which of (x, weight, bias, gate) need a gradient.

    Returns:
        (grad_x (B, C_in, H, W), grad_weight (E*w, C_in, kh, kw), grad_bias (E*w,), grad_gate (B, k)),
        None where not needed.
    """
    from moe_kernels._triton.launcher import conv_backward, warn_fallback_once

    x = call.x
    pixels = max(x.shape[2] * x.shape[3], grad_out.shape[2] * grad_out.shape[3])
    reason = _fallback_reason(call, pixels)
    if reason is None:
        return conv_backward(grad_out, call, needs)
    warn_fallback_once(reason)
    return reference_backward(grad_out, call, needs)


def auto_choice(
    x: torch.Tensor, weight: torch.Tensor, num_experts: int, stride: Pair, available: tuple[str, ...]
) -> tuple[str, str]:
    """Which GPU backend ``backend="auto"`` should use for this call, and why (see ``tuning.choose_backend``).

    Args:
        x: (B, C_in, H, W); weight: (E*w, C_in, kh, kw); num_experts: E; stride: pair;
        available: present backends in the device's default order of preference.

    Returns:
        (backend name, reason in words).
    """
    from moe_kernels._triton.tuning import choose_backend

    width = weight.shape[0] // num_experts
    return choose_backend(x.dtype, x.shape[1], width, tuple(weight.shape[2:]), tuple(stride), x.device, available)


def load():
    """Returns ``(forward, backward)`` of the Triton backend, or raises BackendUnavailable with a how-to.

    Needs triton and either a CUDA device or ``TRITON_INTERPRET=1`` (CPU, for tests).
    """
    try:
        import triton  # noqa: F401
    except ImportError as err:
        raise BackendUnavailable(
            f"the Triton backend needs the `triton` package ({err}); install it with `pip install triton` "
            "(it ships with CUDA builds of torch)"
        ) from None
    from moe_kernels.backends import triton_interpreter_enabled  # the registry, loaded by now

    if not torch.cuda.is_available() and not triton_interpreter_enabled():
        raise BackendUnavailable(
            "the Triton backend needs a CUDA GPU (or TRITON_INTERPRET=1 to run its kernels on CPU, for tests only)"
        )
    try:
        for name in ("forward_nhwc", "dgrad_nhwc", "wgrad_reduce", "launcher"):
            importlib.import_module(f"moe_kernels._triton.{name}")
    except Exception as err:  # a broken triton install fails at jit-decoration time
        raise BackendUnavailable(f"the Triton kernels could not be loaded: {type(err).__name__}: {err}") from None
    return forward, backward
