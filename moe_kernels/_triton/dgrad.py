"""Input-gradient kernel (and the gate gradient's main term) with the forward's expert-tile schedule.

Rows are the INPUT pixels of slots sorted by expert, columns the input channels, and the reduction runs
over ``w * kh * kw``: for input pixel (ih, iw) and tap (ki, kj) the output pixel is
``oh = (ih + pad - ki * dil) / stride`` when that division is exact and in range (a col2im-free
transposed convolution, correct for any stride and dilation). The unscaled slot gradient ``acc`` gives

* ``grad_x[b] += gate[b, j] * acc`` -- stored directly when k = 1 (each input pixel belongs to one slot),
  else into a per-slot buffer (B, k, C_in, H, W) that the launcher sums over k (deterministic);
* ``grad_gate[b, j] += sum(acc * x[b])`` -- the adjoint identity <g, conv(x, W)> = <conv_T(g, W), x>,
  accumulated with fp32 atomics (one scalar atomic per program when its tile lies in one slot).
"""

from __future__ import annotations

import triton
import triton.language as tl

from moe_kernels._triton.common import decode_rows


# grad_out: (B, k*WIDTH, H_out, W_out); w: (E*WIDTH, C_in, KH, KW); x: (B, C_in, H, W); gate: (B, k)
# gx: (B, C_in, H, W) when DIRECT else (B, k, C_in, H, W) buffer (strides sxo*: b, j, c, h, w); gg: (B*k,) acc
# schedule rows_per_slot = H*W. grid: (T, cdiv(C_in, BLOCK_N))
@triton.jit
def moe_conv_dgrad_kernel(
    go_ptr, w_ptr, x_ptr, gate_ptr, gx_ptr, gg_ptr,
    sample_ptr, slot_ptr, tile_expert_ptr, tile_start_ptr, tile_end_ptr,
    C_in, H, W, H_out, W_out, WIDTH, TOP_K,
    sgob, sgoc, sgoh, sgow,
    swo, swc, swh, sww,
    sxb, sxc, sxh, sxw,
    sgb, sgk,
    sob, soj, soc, soh, sow,
    stride_h, stride_w, pad_h, pad_w, dil_h, dil_w,
    KH: tl.constexpr, KW: tl.constexpr, TAP_MAJOR: tl.constexpr,
    HAS_GATE: tl.constexpr, NEED_X: tl.constexpr, NEED_GATE: tl.constexpr,
    ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):  # fmt: skip
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    start = tl.load(tile_start_ptr + pid_m).to(tl.int32)
    end = tl.load(tile_end_ptr + pid_m).to(tl.int32)
    if start >= end:
        return
    expert = tl.load(tile_expert_ptr + pid_m).to(tl.int64)

    rows = start + tl.arange(0, BLOCK_M)
    row_mask = rows < end
    b, j, ih, iw = decode_rows(rows, row_mask, H * W, W, sample_ptr, slot_ptr)
    go_row = go_ptr + b * sgob + (j * WIDTH) * sgoc  # (BLOCK_M,) pointers to each row's slot block
    ohn0 = ih + pad_h
    own0 = iw + pad_w

    c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    c_mask = c < C_in
    w_exp = w_ptr + expert * WIDTH * swo

    K = WIDTH * KH * KW
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
    for k0 in range(0, K, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        k_mask = kk < K
        if TAP_MAJOR:  # K ordered (tap, n): contiguous channels for a channels_last grad_out
            tap = kk // WIDTH
            n = kk % WIDTH
        else:
            n = kk // (KH * KW)
            tap = kk % (KH * KW)
        ki = tap // KW
        kj = tap % KW
        ohn = ohn0[:, None] - (ki * dil_h)[None, :]
        own = own0[:, None] - (kj * dil_w)[None, :]
        oh = ohn // stride_h
        ow = own // stride_w
        valid = (ohn >= 0) & (own >= 0) & (ohn == oh * stride_h) & (own == ow * stride_w)
        valid = valid & (oh < H_out) & (ow < W_out) & row_mask[:, None] & k_mask[None, :]
        a = tl.load(go_row[:, None] + (n * sgoc)[None, :] + oh * sgoh + ow * sgow, mask=valid, other=0.0)
        w_off = (n * swo + ki * swh + kj * sww)[:, None] + (c * swc)[None, :]
        wt = tl.load(w_exp + w_off, mask=k_mask[:, None] & c_mask[None, :], other=0.0)
        if UPCAST:
            a = a.to(ACC_DTYPE)
            wt = wt.to(ACC_DTYPE)
        acc += tl.dot(a, wt, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)

    mask = row_mask[:, None] & c_mask[None, :]
    if NEED_GATE:
        xv = tl.load(x_ptr + (b * sxb + ih * sxh + iw * sxw)[:, None] + (c * sxc)[None, :], mask=mask, other=0.0)
        part = tl.sum(acc * xv.to(ACC_DTYPE), axis=1)  # (BLOCK_M,)
        slot_id = b * TOP_K + j
        first = start // (H * W)
        last = (end - 1) // (H * W)
        if first == last:  # the whole tile is one slot: one atomic
            tl.atomic_add(gg_ptr + tl.max(slot_id, axis=0), tl.sum(part, axis=0))
        else:
            tl.atomic_add(gg_ptr + slot_id, part, mask=row_mask)
    if NEED_X:
        if HAS_GATE:
            g = tl.load(gate_ptr + b * sgb + j * sgk, mask=row_mask, other=0.0)
            acc *= g.to(ACC_DTYPE)[:, None]
        out_off = b * sob + j * soj + ih * soh + iw * sow
        out_ptrs = gx_ptr + out_off[:, None] + (c * soc)[None, :]
        tl.store(out_ptrs, acc.to(gx_ptr.dtype.element_ty), mask=mask)


def launch_dgrad(grad_out, weight, x, gate, grad_x, grad_gate, groups, schedule, width, top_k, stride, padding,
                 dilation, dot, blocks):  # fmt: skip
    """Launches the input-gradient kernel (arguments prepared by ``moe_kernels.backends.triton``).

    Args:
        grad_out: (B, k*w, H_out, W_out); weight: (E*w, C_in, kh, kw); x: (B, C_in, H, W); gate: (B, k) or None.
        grad_x: None, (B, C_in, H, W) (k = 1: written directly) or (B, k, C_in, H, W) per-slot buffer.
        grad_gate: None or (B*k,) zeroed accumulation buffer for sum(acc * x) per slot.
        groups, schedule (rows_per_slot = H*W), width, top_k, stride, padding, dilation, dot, blocks: as named.
    """
    sample, slot = groups
    if grad_x is None:
        out_strides = (0, 0, 0, 0, 0)
    elif grad_x.dim() == 4:
        sb, sc, sh, sw = grad_x.stride()
        out_strides = (sb, 0, sc, sh, sw)
    else:
        out_strides = grad_x.stride()
    grid = (schedule.num_tiles, triton.cdiv(x.shape[1], blocks.block_n))
    moe_conv_dgrad_kernel[grid](
        grad_out, weight, x, gate if gate is not None else x,
        grad_x if grad_x is not None else x, grad_gate if grad_gate is not None else x,
        sample, slot, schedule.tile_expert, schedule.tile_start, schedule.tile_end,
        x.shape[1], x.shape[2], x.shape[3], grad_out.shape[2], grad_out.shape[3], width, top_k,
        *grad_out.stride(), *weight.stride(), *x.stride(), *(gate.stride() if gate is not None else (0, 0)),
        *out_strides,
        stride[0], stride[1], padding[0], padding[1], dilation[0], dilation[1],
        KH=weight.shape[2], KW=weight.shape[3], TAP_MAJOR=grad_out.stride(1) == 1 and width > 1,
        HAS_GATE=gate is not None, NEED_X=grad_x is not None,
        NEED_GATE=grad_gate is not None,
        ACC_DTYPE=dot.acc_dtype, UPCAST=dot.upcast, INPUT_PRECISION=dot.input_precision,
        BLOCK_M=blocks.block_m, BLOCK_N=blocks.block_n, BLOCK_K=blocks.block_k,
        num_warps=blocks.num_warps, num_stages=blocks.num_stages,
    )  # fmt: skip
