"""Argument checks for ``sparse_moe_conv2d``: every bad input raises a clear Python exception.

The compiled backends rely on these checks having run: nothing that reaches a C++ or CUDA kernel can
index outside its tensors.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from moe_kernels.geometry import output_hw

if TYPE_CHECKING:
    from moe_kernels.call import ConvCall

_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def pair(value: int | Sequence[int], name: str) -> tuple[int, int]:
    """Normalises an int or a 2-sequence of ints (stride, padding, dilation) to a pair."""
    if isinstance(value, bool):
        raise TypeError(f"{name} must be an int or a pair of ints, got a bool")
    if isinstance(value, int):
        return (value, value)
    if isinstance(value, torch.SymInt):
        return (value, value)
    try:
        items = tuple(value)
    except TypeError:
        raise TypeError(f"{name} must be an int or a pair of ints, got {type(value).__name__}") from None
    if len(items) != 2 or not all(isinstance(v, (int, torch.SymInt)) and not isinstance(v, bool) for v in items):
        raise TypeError(f"{name} must be an int or a pair of ints, got {value!r}")
    return (items[0], items[1])


def check_sparse_moe_conv2d_args(call: ConvCall) -> tuple[int, int]:
    """Validates the op's arguments and returns the output spatial size ``(H_out, W_out)``.

    Args:
        call: the arguments (``plan`` is not looked at): x (B, C_in, H, W) floating point; weight
            (E * w, C_in, kh, kw) in x's dtype; expert_idx (B, k) int64 (or int32); num_experts E, a positive
            int that divides ``weight.shape[0]``; gate (B, k) floating point or None; bias (E * w,) in x's
            dtype or None; stride, padding, dilation pairs of ints.

    Only shapes, dtypes and devices are checked here, so the check traces under torch.compile and
    torch.export; the index values are checked by ``moe_kernels.plan.check_expert_idx_values`` when the plan is built
    (or inside the op for the compiled backends).

    Raises:
        TypeError: an argument has the wrong type or dtype.
        ValueError: an argument has the wrong shape or value, or tensors sit on different devices.
    """
    x, weight, expert_idx, num_experts, gate, bias = (
        call.x,
        call.weight,
        call.expert_idx,
        call.num_experts,
        call.gate,
        call.bias,
    )
    stride, padding, dilation = call.stride, call.padding, call.dilation
    for name, t in (("x", x), ("weight", weight), ("expert_idx", expert_idx)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if x.dim() != 4:
        raise ValueError(f"x must have shape (B, C_in, H, W), got {x.dim()} dims: {tuple(x.shape)}")
    if weight.dim() != 4:
        raise ValueError(
            f"weight must have shape (E * w, C_in, kh, kw), got {weight.dim()} dims: {tuple(weight.shape)}"
        )
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"x must be a floating point tensor (fp16/bf16/fp32/fp64), got {x.dtype}")
    if weight.dtype != x.dtype:
        raise TypeError(f"weight dtype {weight.dtype} does not match x dtype {x.dtype}")
    if isinstance(num_experts, bool) or not isinstance(num_experts, int):
        raise TypeError(f"num_experts must be an int, got {type(num_experts).__name__}")
    if num_experts < 1:
        raise ValueError(f"num_experts must be >= 1, got {num_experts}")
    rows = weight.shape[0]
    if rows == 0 or rows % num_experts != 0:
        raise ValueError(f"weight has {rows} output rows, which does not divide into num_experts={num_experts} experts")
    if weight.shape[1] != x.shape[1]:
        raise ValueError(f"weight expects C_in={weight.shape[1]} input channels but x has {x.shape[1]}")
    if expert_idx.dim() != 2:
        raise ValueError(f"expert_idx must have shape (B, k), got {tuple(expert_idx.shape)}")
    if expert_idx.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"expert_idx must be an int64 (or int32) tensor, got {expert_idx.dtype}")
    batch, top_k = expert_idx.shape
    if batch != x.shape[0]:
        raise ValueError(f"expert_idx has batch {batch} but x has batch {x.shape[0]}")
    if top_k < 1:
        raise ValueError("expert_idx must select at least one expert per sample (k >= 1)")
    devices = {"x": x.device, "weight": weight.device, "expert_idx": expert_idx.device}
    if gate is not None:
        if not isinstance(gate, torch.Tensor):
            raise TypeError(f"gate must be a torch.Tensor or None, got {type(gate).__name__}")
        if tuple(gate.shape) != (batch, top_k):
            raise ValueError(f"gate must have shape (B, k) = {(batch, top_k)}, got {tuple(gate.shape)}")
        if gate.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"gate must be a floating point tensor, got {gate.dtype}")
        devices["gate"] = gate.device
    if bias is not None:
        if not isinstance(bias, torch.Tensor):
            raise TypeError(f"bias must be a torch.Tensor or None, got {type(bias).__name__}")
        if tuple(bias.shape) != (rows,):
            raise ValueError(f"bias must have shape (E * w,) = ({rows},), got {tuple(bias.shape)}")
        if bias.dtype != x.dtype:
            raise TypeError(f"bias dtype {bias.dtype} does not match x dtype {x.dtype}")
        devices["bias"] = bias.device
    if len(set(devices.values())) > 1:
        listed = ", ".join(f"{k} on {v}" for k, v in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listed}")
    for name, (a, b) in (("stride", stride), ("dilation", dilation)):
        if a < 1 or b < 1:
            raise ValueError(f"{name} must be >= 1, got {(a, b)}")
    if padding[0] < 0 or padding[1] < 0:
        raise ValueError(f"padding must be >= 0, got {padding}")
    h_out, w_out = output_hw(x, weight, stride, padding, dilation)
    if h_out < 1 or w_out < 1:
        raise ValueError(
            f"output size would be {h_out}x{w_out} for input {tuple(x.shape[2:])}, kernel "
            f"{tuple(weight.shape[2:])}, stride {stride}, padding {padding}, dilation {dilation}; it must be >= 1"
        )
    return h_out, w_out
