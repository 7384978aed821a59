"""The ``triton`` backend of ``sparse_moe_conv2d``: launchers of the kernels in ``moe_kernels._triton``.

Design: the B*k routing slots are sorted by expert; every GEMM row (an output pixel of a slot in the
forward and the weight gradient, an input pixel in the input gradient) then belongs to one expert. The
``RoutingPlan`` (shared by the layers of one routing) holds that order and, per geometry, the tile table
(``moe_kernels._triton.schedule.build_tile_schedule``) that cuts each expert's rows into tiles padded only
at expert boundaries. A program multiplies one tile by ONE expert's weight slice (implicit GEMM, im2col
gathered on the fly from any strides), so the work scales with k / E. Neither the forward nor the backward
synchronises with the
host: the grid size is an upper bound of the tiles, spare tiles exit at once.

Accumulation is fp32 (fp64 for fp64 inputs), results come back in the input dtype. The weight, bias
and gate gradients are accumulated with atomics, so their last bits may vary between runs.
"""

from __future__ import annotations

import importlib

import torch

from moe_kernels.backends.errors import BackendUnavailable
from moe_kernels.geometry import needed_grads, output_hw, output_memory_format
from moe_kernels.plan import RoutingPlan

Pair = tuple[int, int]


_MAX_ROWS = 2**31 - 1


def _check_rows(num_slots: int, rows_per_slot: int) -> None:
    """The kernels index GEMM rows with int32 (element offsets are int64): at most 2**31 - 1 rows."""
    if num_slots * rows_per_slot > _MAX_ROWS:
        raise ValueError(
            f"backend 'triton': B*k*pixels = {num_slots * rows_per_slot} exceeds 2**31 - 1 GEMM rows; "
            "split the batch or use backend='reference'"
        )


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
    """Forward of the op on the Triton kernels (arguments validated by the op).

    Args:
        x: (B, C_in, H, W); weight: (E*w, C_in, kh, kw); expert_idx: (B, k) int64; num_experts: E;
        gate: (B, k) or None; bias: (E*w,) or None; stride, padding, dilation: int pairs.
        plan: the ``RoutingPlan`` of expert_idx (its sorted slots and cached tile tables), or None to build one.

    Returns:
        y: (B, k*w, H_out, W_out) in x's dtype, channels_last when x is.
    """
    from moe_kernels._triton.common import dot_settings, gemm_blocks
    from moe_kernels._triton.forward import launch_forward

    batch, top_k = expert_idx.shape
    width = weight.shape[0] // num_experts
    h_out, w_out = output_hw(x, weight, stride, padding, dilation)
    y = torch.empty(batch, top_k * width, h_out, w_out, dtype=x.dtype, device=x.device,
                    memory_format=output_memory_format(x))  # fmt: skip
    if y.numel() == 0:
        return y
    _check_rows(batch * top_k, h_out * w_out)
    plan = plan if plan is not None else RoutingPlan.build(expert_idx, num_experts)
    blocks = gemm_blocks(width, x.dtype, batch * top_k * h_out * w_out, x.device)
    schedule = plan.tile_schedule(h_out * w_out, blocks.block_m)
    launch_forward(x, weight, bias, gate, y, (plan.sample, plan.slot), schedule, width, stride, padding, dilation,
                   dot_settings(x.dtype), blocks)  # fmt: skip
    return y


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
    """Backward of the op on the Triton kernels.

    Args:
        grad_out: (B, k*w, H_out, W_out) gradient of the output (any strides).
        x, weight, expert_idx, num_experts, gate, bias, stride, padding, dilation: as in ``forward``.
        needs: which of (x, weight, bias, gate) need a gradient.
        plan: the ``RoutingPlan`` of expert_idx, or None to build one.

    Returns:
        (grad_x (B, C_in, H, W), grad_weight (E*w, C_in, kh, kw), grad_bias (E*w,), grad_gate (B, k)),
        None where not needed.
    """
    import triton

    from moe_kernels._triton.common import acc_torch_dtype, dot_settings, gemm_blocks, wgrad_blocks, wgrad_chunk
    from moe_kernels._triton.dgrad import launch_dgrad
    from moe_kernels._triton.wgrad import launch_wgrad

    need_x, need_w, need_b, need_g = needed_grads(needs, bias, gate)
    batch, top_k = expert_idx.shape
    width = weight.shape[0] // num_experts
    c_in, height, wid = x.shape[1:]
    acc_dtype = acc_torch_dtype(x.dtype)
    dot = dot_settings(x.dtype)
    grad_x = None
    if need_x:  # with k = 1 the kernel writes every element of grad_x
        alloc = torch.empty_like if top_k == 1 and batch > 0 else torch.zeros_like
        grad_x = alloc(x, memory_format=torch.contiguous_format)
    grad_w = torch.zeros(weight.shape[0], weight[0].numel(), dtype=acc_dtype, device=x.device) if need_w else None
    grad_b = torch.zeros(weight.shape[0], dtype=acc_dtype, device=x.device) if need_b else None
    grad_g = torch.zeros(batch * top_k, dtype=acc_dtype, device=x.device) if need_g else None
    if batch * top_k > 0 and grad_out.numel() > 0 and x.numel() > 0:
        grad_out = grad_out.to(x.dtype)
        _check_rows(batch * top_k, max(height * wid, grad_out.shape[2] * grad_out.shape[3]))
        plan = plan if plan is not None else RoutingPlan.build(expert_idx, num_experts)
        if need_x or need_g:
            blocks = gemm_blocks(c_in, x.dtype, batch * top_k * height * wid, x.device)
            schedule = plan.tile_schedule(height * wid, blocks.block_m)
            direct = top_k == 1
            if not need_x:
                gx_target = None
            elif direct:
                gx_target = grad_x
            else:
                gx_target = torch.empty(batch, top_k, c_in, height, wid, dtype=acc_dtype, device=x.device)
            launch_dgrad(grad_out, weight, x, gate, gx_target, grad_g, (plan.sample, plan.slot), schedule, width, top_k,
                         stride, padding, dilation, dot, blocks)  # fmt: skip
            if need_x and not direct:
                grad_x = gx_target.sum(1).to(x.dtype)
        if need_w or need_b:
            blocks = wgrad_blocks(width, x.dtype)
            rows_per_slot = grad_out.shape[2] * grad_out.shape[3]
            col_programs = triton.cdiv(width, blocks.block_n) * triton.cdiv(weight[0].numel(), blocks.block_k)
            chunk = wgrad_chunk(batch * top_k * rows_per_slot, blocks.block_m, col_programs, x.device)
            schedule = plan.tile_schedule(rows_per_slot, chunk)
            launch_wgrad(grad_out, x, gate, grad_w, grad_b, (plan.sample, plan.slot), schedule, width, weight.shape[2:],
                         stride, padding, dilation, dot, blocks)  # fmt: skip
    if need_g and bias is not None:
        # <g, bias> term of the gate gradient: sum over the slot's channels of bias * spatial sum of g.
        gsum = grad_out.to(acc_dtype).sum((2, 3)).reshape(batch, top_k, width)
        bias_sel = bias.to(acc_dtype).reshape(num_experts, width)[expert_idx]  # (B, k, w)
        grad_g = grad_g + (gsum * bias_sel).sum(2).reshape(-1)
    return (
        grad_x,
        grad_w.reshape(weight.shape).to(weight.dtype) if need_w else None,
        grad_b.to(bias.dtype) if need_b else None,
        grad_g.reshape(batch, top_k).to(gate.dtype) if need_g else None,
    )


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
        for name in ("forward", "dgrad", "wgrad"):
            importlib.import_module(f"moe_kernels._triton.{name}")
    except Exception as err:  # a broken triton install fails at jit-decoration time
        raise BackendUnavailable(f"the Triton kernels could not be loaded: {type(err).__name__}: {err}") from None
    return forward, backward
