"""Weight/bias gradient v2: per-expert reduction with fp32 partials and one deterministic reduce.

Pass 1 (``moe_conv_wgrad_partial_kernel``): the tile table cuts each expert's rows (output pixels of
its slots, sorted) into chunks. A program owns one chunk, one block of the expert's output channels
and one (tap, channel block) of K; it reduces ``(gate * grad_out)^T @ x_tap`` over the chunk's rows
(both operands read NHWC with contiguous channels) and STORES its partial into
``part[chunk, n, tap*C_in + c]`` (fp32, fp64 for fp64 inputs); the programs of the first K block also
store the bias partial ``sum_rows(gate * grad_out)`` into ``bias_part[chunk, n]``.

Pass 2 (``moe_conv_wgrad_reduce_kernel``): for each expert, sums its chunks' partials in table order
(the chunks of expert e are the contiguous table range ``[first[e], first[e+1])``) and writes the
result in the output dtype. No atomics anywhere: two runs give bitwise-identical gradients.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from moe_kernels._triton.kernel_parts import mma, slot_rows
from moe_kernels._triton.spec import conv_args, gate_strides, launch, nhwc_strides


# go: (B, H_out, W_out, k*WIDTH) NHWC view; x: (B, H, W, C_in) NHWC view; gate: (B, k)
# part: (T, WIDTH, KH*KW*C_in); bias_part: (T, WIDTH). Table rows_per_slot = H_out*W_out, block_rows = chunk.
# grid: (T, cdiv(WIDTH, BLOCK_N), KH*KW*cdiv(C_in, BLOCK_K))
@triton.jit
def moe_conv_wgrad_partial_kernel(
    go_ptr,
    x_ptr,
    gate_ptr,
    part_ptr,
    bpart_ptr,
    sample_ptr,
    slot_ptr,
    tile_start_ptr,
    tile_end_ptr,
    C_in,
    H,
    W,
    H_out,
    W_out,
    WIDTH,
    sgob,
    sgoh,
    sgow,
    sxb,
    sxh,
    sxw,
    sgb,
    sgk,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    dil_h,
    dil_w,
    KH: tl.constexpr,
    KW: tl.constexpr,
    EVEN_K: tl.constexpr,
    HAS_GATE: tl.constexpr,
    NEED_W: tl.constexpr,
    NEED_BIAS: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    tile = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    start = tl.load(tile_start_ptr + tile).to(tl.int32)
    end = tl.load(tile_end_ptr + tile).to(tl.int32)
    if start >= end:  # spare tile: its partials are never read
        return
    c_blocks = tl.cdiv(C_in, BLOCK_K)
    tap = pid_k // c_blocks
    ki = tap // KW
    kj = tap % KW
    c = (pid_k % c_blocks) * BLOCK_K + tl.max_contiguous(tl.multiple_of(tl.arange(0, BLOCK_K), BLOCK_K), BLOCK_K)
    c_mask = c < C_in
    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < WIDTH
    rows_per_slot = H_out * W_out

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC_DTYPE)
    acc_b = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    for m0 in range(start, end, BLOCK_M):
        _, row_mask, b, j, oh, ow = slot_rows(m0, end, sample_ptr, slot_ptr, rows_per_slot, W_out, BLOCK_M)
        go_row = b * sgob + oh * sgoh + ow * sgow + j * WIDTH
        g = tl.load(go_ptr + go_row[:, None] + n[None, :], mask=row_mask[:, None] & n_mask[None, :], other=0.0)
        if HAS_GATE:
            gv = tl.load(gate_ptr + b * sgb + j * sgk, mask=row_mask, other=0.0)
            g = g.to(ACC_DTYPE) * gv.to(ACC_DTYPE)[:, None]
            if not UPCAST:  # tensor-core operand in the input dtype
                g = g.to(go_ptr.dtype.element_ty)
        if NEED_BIAS:  # noqa: SIM102 (a constexpr branch around a runtime one)
            if pid_k == 0:
                acc_b += tl.sum(g.to(ACC_DTYPE), axis=0)
        if NEED_W:
            ih = oh * stride_h - pad_h + ki * dil_h
            iw = ow * stride_w - pad_w + kj * dil_w
            row_ok = row_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            x_ptrs = x_ptr + (b * sxb + ih * sxh + iw * sxw)[:, None] + c[None, :]
            if EVEN_K:
                xv = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
            else:
                xv = tl.load(x_ptrs, mask=row_ok[:, None] & c_mask[None, :], other=0.0)
            acc = mma(acc, tl.trans(g), xv, ACC_DTYPE, UPCAST, INPUT_PRECISION)

    K = KH * KW * C_in
    if NEED_W:
        p_ptrs = part_ptr + (tile.to(tl.int64) * WIDTH + n)[:, None] * K + (tap * C_in + c)[None, :]
        tl.store(p_ptrs, acc, mask=n_mask[:, None] & c_mask[None, :])
    if NEED_BIAS:  # noqa: SIM102
        if pid_k == 0:
            tl.store(bpart_ptr + tile.to(tl.int64) * WIDTH + n, acc_b, mask=n_mask)


# part: (T, L) partials; first: (E + 1,) first table entry of each expert; out: (E, L) in the output dtype.
# grid: (E, cdiv(L, BLOCK))
@triton.jit
def moe_conv_wgrad_reduce_kernel(part_ptr, first_ptr, out_ptr, L, ACC_DTYPE: tl.constexpr, BLOCK: tl.constexpr):
    expert = tl.program_id(0)
    offs = tl.program_id(1) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < L
    lo = tl.load(first_ptr + expert)
    hi = tl.load(first_ptr + expert + 1)
    total = tl.zeros((BLOCK,), dtype=ACC_DTYPE)
    for t in range(lo, hi):  # fixed order: deterministic
        total += tl.load(part_ptr + t * L + offs, mask=mask, other=0.0)
    tl.store(out_ptr + expert.to(tl.int64) * L + offs, total.to(out_ptr.dtype.element_ty), mask=mask)


def expert_first_tile(schedule, num_experts: int) -> torch.Tensor:
    """(E + 1,) int64: the table range of expert e is ``[first[e], first[e+1])`` (device ops, no sync)."""
    experts = torch.arange(num_experts + 1, device=schedule.tile_expert.device, dtype=torch.int32)
    return torch.searchsorted(schedule.tile_expert.contiguous(), experts).to(torch.int64)


def launch_wgrad_nhwc(
    go_nhwc,
    x_nhwc,
    gate,
    need_w,
    need_b,
    sorted_slots,
    schedule,
    num_experts,
    width,
    stride,
    padding,
    dilation,
    kernel_size,
    acc_dtype,
    out_dtype,
    dot,
    config,
    reduce_block=1024,
):
    """Weight and bias gradients of all experts (two launches, no atomics).

    Args:
        go_nhwc: (B, H_out, W_out, k*w) channel stride 1; x_nhwc: (B, H, W, C_in) channel stride 1.
        gate: (B, k) or None; need_w, need_b: which gradients to compute.
        sorted_slots: (sample, slot); schedule: ``TileSchedule`` with rows_per_slot = H_out*W_out (any chunk).
        num_experts, width, stride, padding, dilation, kernel_size: of the op.
        acc_dtype: torch dtype of the partials; out_dtype: of the results; dot, config: launch settings.

    Returns:
        (grad_w (E, w, kh, kw, C_in) or None, grad_b (E*w,) or None), in ``out_dtype``.
    """
    sample, slot = sorted_slots
    c_in = x_nhwc.shape[3]
    kh, kw = kernel_size
    k_total = kh * kw * c_in
    num_tiles = schedule.num_tiles
    device = x_nhwc.device
    part = torch.empty(num_tiles, width, k_total, dtype=acc_dtype, device=device) if need_w else None
    bias_part = torch.empty(num_tiles, width, dtype=acc_dtype, device=device) if need_b else None
    dummy = part if part is not None else bias_part
    k_programs = kh * kw * triton.cdiv(c_in, config.block_k) if need_w else 1
    grid = (num_tiles, triton.cdiv(width, config.block_n), k_programs)
    args = dict(
        go_ptr=go_nhwc,
        x_ptr=x_nhwc,
        gate_ptr=gate if gate is not None else dummy,
        part_ptr=dummy if part is None else part,
        bpart_ptr=dummy if bias_part is None else bias_part,
        sample_ptr=sample,
        slot_ptr=slot,
        tile_start_ptr=schedule.tile_start,
        tile_end_ptr=schedule.tile_end,
        C_in=c_in,
        H=x_nhwc.shape[1],
        W=x_nhwc.shape[2],
        H_out=go_nhwc.shape[1],
        W_out=go_nhwc.shape[2],
        WIDTH=width,
        **nhwc_strides("sgo", go_nhwc),
        **nhwc_strides("sx", x_nhwc),
        **gate_strides(gate),
        **conv_args(stride, padding, dilation),
    )
    consts = dict(
        KH=kh,
        KW=kw,
        EVEN_K=c_in % config.block_k == 0,
        HAS_GATE=gate is not None,
        NEED_W=need_w,
        NEED_BIAS=need_b,
        ACC_DTYPE=dot.acc_dtype,
        UPCAST=dot.upcast,
        INPUT_PRECISION=dot.input_precision,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
    )
    launch(
        moe_conv_wgrad_partial_kernel,
        grid,
        args,
        consts,
        dict(num_warps=config.num_warps, num_stages=config.num_stages),
    )
    first = expert_first_tile(schedule, num_experts)
    acc_tl = dot.acc_dtype
    grad_w = grad_b = None
    if need_w:
        grad_w = torch.empty(num_experts, width, k_total, dtype=out_dtype, device=device)
        length = width * k_total
        launch(
            moe_conv_wgrad_reduce_kernel,
            (num_experts, triton.cdiv(length, reduce_block)),
            dict(part_ptr=part, first_ptr=first, out_ptr=grad_w, L=length),
            dict(ACC_DTYPE=acc_tl, BLOCK=reduce_block),
            {},
        )
        grad_w = grad_w.view(num_experts, width, kh, kw, c_in)
    if need_b:
        grad_b = torch.empty(num_experts, width, dtype=out_dtype, device=device)
        launch(
            moe_conv_wgrad_reduce_kernel,
            (num_experts, triton.cdiv(width, reduce_block)),
            dict(part_ptr=bias_part, first_ptr=first, out_ptr=grad_b, L=width),
            dict(ACC_DTYPE=acc_tl, BLOCK=reduce_block),
            {},
        )
        grad_b = grad_b.reshape(-1)
    return grad_w, grad_b
