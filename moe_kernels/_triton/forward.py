"""Forward kernel: implicit GEMM over tiles of one expert, bias and gate fused in the epilogue.

A program owns one tile of the schedule (rows = output pixels of slots routed to ONE expert e) and one
block of that expert's output channels. It gathers the im2col operand straight from x (any strides,
so NCHW, channels_last and non-contiguous inputs need no copy), multiplies it by the expert's weight
slice and writes ``gate * (acc + bias)`` into ``y[b, j*w + n, oh, ow]``.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moe_kernels._triton.common import decode_rows


# x: (B, C_in, H, W); w: (E*WIDTH, C_in, KH, KW); bias: (E*WIDTH,); gate: (B, k); y: (B, k*WIDTH, H_out, W_out)
# sample, slot: (B*k,) sorted slots; tile_expert/start/end: (T,) schedule with rows_per_slot = H_out*W_out.
# grid: (T, cdiv(WIDTH, BLOCK_N))
@triton.jit
def moe_conv_fwd_kernel(
    x_ptr, w_ptr, bias_ptr, gate_ptr, y_ptr,
    sample_ptr, slot_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr,
    C_in, H, W, H_out, W_out, WIDTH,
    sxb, sxc, sxh, sxw,
    swo, swc, swh, sww,
    syb, syc, syh, syw,
    sgb, sgk,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, TAP_MAJOR: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_GATE: tl.constexpr,
    ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    start = tl.load(tile_start_ptr + pid_m).to(tl.int32)
    end = tl.load(tile_end_ptr + pid_m).to(tl.int32)
    if start >= end:  # spare tile of the upper-bound grid
        return
    expert = tl.load(tile_expert_ptr + pid_m).to(tl.int64)

    rows = start + tl.arange(0, BLOCK_M)
    row_mask = rows < end
    b, j, oh, ow = decode_rows(rows, row_mask, H_out * W_out, W_out, sample_ptr, slot_ptr)
    ih0 = oh * stride_h - pad_h
    iw0 = ow * stride_w - pad_w
    x_row = x_ptr + b * sxb  # (BLOCK_M,) pointers to each row's sample

    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < WIDTH
    w_col = w_ptr + (expert * WIDTH + n) * swo  # (BLOCK_N,) pointers to the expert's filters

    K = C_in * KH * KW
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_mask = kk < K
        if TAP_MAJOR:  # K ordered (tap, c): contiguous channels for a channels_last x
            tap = kk // C_in
            c = kk % C_in
        else:  # K ordered (c, tap), the weight's own order
            c = kk // (KH * KW)
            tap = kk % (KH * KW)
        ki = tap // KW
        kj = tap % KW
        ih = ih0[:, None] + (ki * dil_h)[None, :]
        iw = iw0[:, None] + (kj * dil_w)[None, :]
        a_mask = row_mask[:, None] & k_mask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
        a = tl.load(x_row[:, None] + (c * sxc)[None, :] + ih * sxh + iw * sxw, mask=a_mask, other=0.0)
        w_off = (c * swc + ki * swh + kj * sww)[:, None]
        wt = tl.load(w_col[None, :] + w_off, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
        if UPCAST:
            a = a.to(ACC_DTYPE)
            wt = wt.to(ACC_DTYPE)
        acc += tl.dot(a, wt, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)

    if HAS_BIAS:
        bias = tl.load(bias_ptr + expert * WIDTH + n, mask=n_mask, other=0.0)
        acc += bias.to(ACC_DTYPE)[None, :]
    if HAS_GATE:
        g = tl.load(gate_ptr + b * sgb + j * sgk, mask=row_mask, other=0.0)
        acc *= g.to(ACC_DTYPE)[:, None]
    y_off = b * syb + oh * syh + ow * syw
    y_ptrs = y_ptr + y_off[:, None] + ((j * WIDTH)[:, None] + n[None, :]) * syc
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


def launch_forward(x, weight, bias, gate, y, groups, schedule, width, stride, padding, dilation, dot, blocks):
    """Launches the forward kernel (arguments prepared by ``moe_kernels.backends.triton``).

    Args:
        x: (B, C_in, H, W); weight: (E*w, C_in, kh, kw); bias: (E*w,) or None; gate: (B, k) or None.
        y: (B, k*w, H_out, W_out) output, any strides; every element is written.
        groups: (sample, slot) sorted slots; schedule: ``TileSchedule`` with rows_per_slot = H_out*W_out.
        width: expert width w; stride, padding, dilation: pairs; dot: ``DotSettings``; blocks: ``Blocks``.
    """
    sample, slot = groups
    grid = (schedule.num_tiles, triton.cdiv(width, blocks.block_n))
    gate_strides = gate.stride() if gate is not None else (0, 0)
    moe_conv_fwd_kernel[grid](
        x, weight, bias if bias is not None else x, gate if gate is not None else x, y,
        sample, slot, schedule.tile_expert, schedule.tile_start, schedule.tile_end,
        x.shape[1], x.shape[2], x.shape[3], y.shape[2], y.shape[3], width,
        *x.stride(), *weight.stride(), *y.stride(), *gate_strides,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        KH=weight.shape[2], KW=weight.shape[3], TAP_MAJOR=x.stride(1) == 1 and x.shape[1] > 1,
        HAS_BIAS=bias is not None, HAS_GATE=gate is not None,
        ACC_DTYPE=dot.acc_dtype, UPCAST=dot.upcast, INPUT_PRECISION=dot.input_precision,
        BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, BLOCK_K=blocks.block_k,
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )  # fmt: skip
