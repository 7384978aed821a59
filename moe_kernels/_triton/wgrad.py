"""Weight- and bias-gradient kernel: a per-expert reduction over that expert's rows, split into chunks.

The schedule's tiles are chunks of one expert's sorted rows (output pixels of its slots). A program
owns one chunk, one block of the expert's output channels and one block of K = C_in * kh * kw; it
reduces ``(gate * grad_out)^T @ im2col(x)`` over the chunk and adds the partial result into an fp32
(fp64 for fp64 inputs) buffer with atomics. Chunks balance the work even when one expert takes all
samples. The bias gradient (the row sum of ``gate * grad_out``) comes from the programs of the first
K block.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moe_kernels._triton.common import decode_rows


# grad_out: (B, k*WIDTH, H_out, W_out); x: (B, C_in, H, W); gate: (B, k)
# gw: (E*WIDTH, C_in*KH*KW) accumulation buffer; gb: (E*WIDTH,) accumulation buffer
# schedule rows_per_slot = H_out*W_out, block_rows = chunk. grid: (T, cdiv(WIDTH, BLOCK_N), cdiv(K, BLOCK_K))
@triton.jit
def moe_conv_wgrad_kernel(
    go_ptr, x_ptr, gate_ptr, gw_ptr, gb_ptr,
    sample_ptr, slot_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr,
    C_in, H, W, H_out, W_out, WIDTH,
    sgob, sgoc, sgoh, sgow,
    sxb, sxc, sxh, sxw,
    sgb, sgk,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, TAP_MAJOR: tl.constexpr,
    HAS_GATE: tl.constexpr, NEED_W: tl.constexpr, NEED_BIAS: tl.constexpr,
    ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_t = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    start = tl.load(tile_start_ptr + pid_t).to(tl.int32)
    end = tl.load(tile_end_ptr + pid_t).to(tl.int32)
    if start >= end:
        return
    expert = tl.load(tile_expert_ptr + pid_t).to(tl.int64)

    n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = n < WIDTH
    K = C_in * KH * KW
    kk = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    k_mask = kk < K
    if TAP_MAJOR:  # K ordered (tap, c): contiguous channels for a channels_last x
        tap = kk // C_in
        c = kk % C_in
    else:
        c = kk // (KH * KW)
        tap = kk % (KH * KW)
    ki = tap // KW
    kj = tap % KW

    acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=ACC_DTYPE)
    acc_b = tl.zeros((BLOCK_N,), dtype=ACC_DTYPE)
    for m0 in range(start, end, BLOCK_M):
        rows = m0 + tl.arange(0, BLOCK_M)
        row_mask = rows < end
        b, j, oh, ow = decode_rows(rows, row_mask, H_out * W_out, W_out, sample_ptr, slot_ptr)
        go_off = b * sgob + oh * sgoh + ow * sgow + (j * WIDTH) * sgoc
        g = tl.load(go_ptr + go_off[None, :] + (n * sgoc)[:, None], mask=n_mask[:, None] & row_mask[None, :], other=0.0)
        if HAS_GATE:
            gv = tl.load(gate_ptr + b * sgb + j * sgk, mask=row_mask, other=0.0)
            g = (g.to(ACC_DTYPE) * gv.to(ACC_DTYPE)[None, :]).to(go_ptr.dtype.element_ty)
        if NEED_BIAS:  # noqa: SIM102 (a constexpr branch around a runtime one)
            if pid_k == 0:
                acc_b += tl.sum(g.to(ACC_DTYPE), axis=1)
        if NEED_W:
            ih = (oh * stride_h - pad_h)[:, None] + (ki * dil_h)[None, :]
            iw = (ow * stride_w - pad_w)[:, None] + (kj * dil_w)[None, :]
            a_mask = row_mask[:, None] & k_mask[None, :] & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
            xv = tl.load(x_ptr + (b * sxb)[:, None] + (c * sxc)[None, :] + ih * sxh + iw * sxw, mask=a_mask, other=0.0)
            if UPCAST:
                acc += tl.dot(g.to(ACC_DTYPE), xv.to(ACC_DTYPE), input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)
            else:
                acc += tl.dot(g, xv, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)

    w_rows = expert * WIDTH + n
    if NEED_W:
        tl.atomic_add(
            gw_ptr + (w_rows * K)[:, None] + (c * (KH * KW) + tap)[None, :], acc, mask=n_mask[:, None] & k_mask[None, :]
        )
    if NEED_BIAS:  # noqa: SIM102 (a constexpr branch around a runtime one)
        if pid_k == 0:
            tl.atomic_add(gb_ptr + w_rows, acc_b, mask=n_mask)


def launch_wgrad(grad_out, x, gate, grad_w, grad_b, groups, schedule, width, kernel_size, stride, padding, dilation,
                 dot, blocks):  # fmt: skip
    """Launches the weight/bias-gradient kernel (arguments prepared by ``moe_kernels.backends.triton``).

    Args:
        grad_out: (B, k*w, H_out, W_out); x: (B, C_in, H, W); gate: (B, k) or None.
        grad_w: None or zeroed (E*w, C_in*kh*kw) accumulation buffer; grad_b: None or zeroed (E*w,) buffer.
        groups, schedule (rows_per_slot = H_out*W_out, block_rows = the chunk), width, kernel_size (kh, kw),
        stride, padding, dilation, dot, blocks: as named.
    """
    sample, slot = groups
    kh, kw = kernel_size
    num_k = triton.cdiv(x.shape[1] * kh * kw, blocks.block_k) if grad_w is not None else 1
    grid = (schedule.num_tiles, triton.cdiv(width, blocks.block_n), num_k)
    buf = grad_w if grad_w is not None else grad_b
    moe_conv_wgrad_kernel[grid](
        grad_out, x, gate if gate is not None else x, grad_w if grad_w is not None else buf,
        grad_b if grad_b is not None else buf,
        sample, slot, schedule.tile_expert, schedule.tile_start, schedule.tile_end,
        x.shape[1], x.shape[2], x.shape[3], grad_out.shape[2], grad_out.shape[3], width,
        *grad_out.stride(), *x.stride(), *(gate.stride() if gate is not None else (0, 0)),
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        KH=kh, KW=kw, TAP_MAJOR=x.stride(1) == 1 and x.shape[1] > 1,
        HAS_GATE=gate is not None, NEED_W=grad_w is not None, NEED_BIAS=grad_b is not None,
        ACC_DTYPE=dot.acc_dtype, UPCAST=dot.upcast, INPUT_PRECISION=dot.input_precision,
        BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, BLOCK_K=blocks.block_k,
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )  # fmt: skip
