"""Input gradient v2 (and the gate gradient's main term) on the forward v2's structure.

GEMM view: rows are the INPUT pixels of the slots sorted by expert (tile table with rows_per_slot =
H*W), columns the C_in input channels, K = (tap, output channel of the expert). For input pixel
(ih, iw) and tap (ki, kj) the contributing output pixel is ``oh = (ih + pad - ki*dil) / stride`` when the
division is exact and in range (a transposed convolution without col2im). grad_out is read as NHWC
(channel stride 1): a K step is BLOCK_K contiguous output channels of one slot's pixel, one row offset
per pixel per step. B is the expert's slice of the "dgrad" weight pack (E, kh*kw*w, C_in).

With the unscaled slot gradient ``acc`` of a tile:

* grad_x rows get ``gate[b, j] * acc`` -- stored straight into grad_x when k = 1 (an input pixel belongs
  to one slot), else into a per-slot buffer (B, k, H, W, C_in) that the launcher sums over k;
* the gate gradient's main term ``sum(acc * x)`` (adjoint identity ``<g, conv(x, W)> = <conv_T(g, W), x>``)
  is reduced per row and stored to ``gate_part[column block, row]`` -- no atomics; the launcher sums the
  partials in a fixed order, so the gate gradient is deterministic.
"""

from __future__ import annotations

import triton
import triton.language as tl

from moe_kernels._triton.kernel_parts import k_step, load_operands, mma, slot_rows, tile_of_item
from moe_kernels._triton.spec import conv_args, gate_strides, launch, nhwc_strides


# go: (B, H_out, W_out, k*WIDTH) NHWC view, channel stride 1; wp: (E, KH*KW*WIDTH, WP_COLS >= C_in) packed weight;
# x: (B, H, W, C_in) NHWC view (channel stride 1); gate: (B, k);
# gx: (B, H, W, C_in) view (k = 1) or (B, k, H, W, C_in) buffer, strides (sob, soj, soh, sow), channel stride 1;
# gate_part: (cdiv(C_in, BLOCK_N), rows) partial sums. grid: (programs,), persistent over T * cdiv(C_in, BLOCK_N).
@triton.jit
def moe_conv_dgrad_nhwc_kernel(
    go_ptr,
    wp_ptr,
    x_ptr,
    gate_ptr,
    gx_ptr,
    gpart_ptr,
    sample_ptr,
    slot_ptr,
    tile_expert_ptr,
    tile_start_ptr,
    tile_end_ptr,
    num_tiles,
    total_rows,
    C_in,
    H,
    W,
    H_out,
    W_out,
    WIDTH,
    WP_COLS,
    sgob,
    sgoh,
    sgow,
    sxb,
    sxh,
    sxw,
    sgb,
    sgk,
    sob,
    soj,
    soh,
    sow,
    stride_h,
    stride_w,
    pad_h,
    pad_w,
    dil_h,
    dil_w,
    KH: tl.constexpr,
    KW: tl.constexpr,
    EVEN_K: tl.constexpr,
    EVEN_N: tl.constexpr,
    HAS_GATE: tl.constexpr,
    NEED_X: tl.constexpr,
    NEED_GATE: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    n_blocks = tl.cdiv(C_in, BLOCK_N)
    k_blocks = tl.cdiv(WIDTH, BLOCK_K)
    k_steps = KH * KW * k_blocks
    rows_per_slot = H * W
    ck = tl.max_contiguous(tl.multiple_of(tl.arange(0, BLOCK_K), BLOCK_K), BLOCK_K)
    for item in range(tl.program_id(0), num_tiles * n_blocks, tl.num_programs(0)):
        tile, pid_n, start, end = tile_of_item(item, n_blocks, tile_start_ptr, tile_end_ptr)
        if start < end:
            expert = tl.load(tile_expert_ptr + tile).to(tl.int64)
            rows, row_mask, b, j, ih, iw = slot_rows(start, end, sample_ptr, slot_ptr, rows_per_slot, W, BLOCK_M)
            go_b = go_ptr + b * sgob + j * WIDTH  # (BLOCK_M,) each row's slot block
            ohn0 = ih + pad_h
            own0 = iw + pad_w

            c = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            c_mask = c < C_in
            w_e = wp_ptr + expert * (KH * KW * WIDTH) * WP_COLS

            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
            for step in range(0, k_steps):
                tap, n0, ki, kj = k_step(step, k_blocks, KW, BLOCK_K)
                ohn = ohn0 - ki * dil_h
                own = own0 - kj * dil_w
                oh = ohn // stride_h
                ow = own // stride_w
                row_ok = row_mask & (ohn >= 0) & (own >= 0) & (ohn == oh * stride_h) & (own == ow * stride_w)
                row_ok = row_ok & (oh < H_out) & (ow < W_out)
                a_ptrs = (go_b + oh * sgoh + ow * sgow)[:, None] + (n0 + ck)[None, :]
                w_ptrs = w_e + (tap * WIDTH + n0 + ck).to(tl.int64)[:, None] * WP_COLS + c[None, :]
                a, wt = load_operands(a_ptrs, w_ptrs, row_ok, (n0 + ck) < WIDTH, c_mask, EVEN_K, EVEN_N)
                acc = mma(acc, a, wt, ACC_DTYPE, UPCAST, INPUT_PRECISION)

            mask = row_mask[:, None] & c_mask[None, :]
            if NEED_GATE:
                x_row = b * sxb + ih * sxh + iw * sxw
                xv = tl.load(x_ptr + x_row[:, None] + c[None, :], mask=mask, other=0.0)
                part = tl.sum(acc * xv.to(ACC_DTYPE), axis=1)  # (BLOCK_M,)
                tl.store(gpart_ptr + pid_n.to(tl.int64) * total_rows + rows, part, mask=row_mask)
            if NEED_X:
                if HAS_GATE:
                    g = tl.load(gate_ptr + b * sgb + j * sgk, mask=row_mask, other=0.0)
                    acc *= g.to(ACC_DTYPE)[:, None]
                out_row = b * sob + j * soj + ih * soh + iw * sow
                tl.store(gx_ptr + out_row[:, None] + c[None, :], acc.to(gx_ptr.dtype.element_ty), mask=mask)


def launch_dgrad_nhwc(
    go_nhwc,
    packed,
    x_nhwc,
    c_in,
    gate,
    grad_x,
    gate_part,
    sorted_slots,
    schedule,
    width,
    stride,
    padding,
    dilation,
    kernel_size,
    dot,
    config,
    programs,
):
    """Launches the input-gradient v2 kernel (arguments prepared by ``moe_kernels.backends.triton``).

    Args:
        go_nhwc: (B, H_out, W_out, k*w) channel stride 1 (w: the ``width`` argument, possibly zero-padded);
        packed: (E, kh*kw*w, >= C_in) "dgrad" pack; x_nhwc: (B, H, W, >= C_in) channel stride 1; c_in: C_in;
        gate: (B, k) or None.
        grad_x: None, (B, H, W, C_in) channel stride 1 (k = 1, written directly) or (B, k, H, W, C_in) buffer.
        gate_part: None or (cdiv(C_in, block_n), B*k*H*W) buffer of per-row partial gate-gradient sums.
        sorted_slots, schedule (rows_per_slot = H*W, block_rows = config.block_m), width, stride, padding,
        dilation, kernel_size, dot, config, programs: as in ``launch_forward_nhwc``.
    """
    sample, slot = sorted_slots
    batch, height, wid, _ = x_nhwc.shape  # x_nhwc may carry zero-padded channels
    if grad_x is None:
        out_strides = (0, 0, 0, 0)
    elif grad_x.dim() == 4:
        out_strides = (grad_x.stride(0), 0, grad_x.stride(1), grad_x.stride(2))
    else:
        out_strides = (grad_x.stride(0), grad_x.stride(1), grad_x.stride(2), grad_x.stride(3))
    args = dict(
        go_ptr=go_nhwc,
        wp_ptr=packed,
        x_ptr=x_nhwc,
        gate_ptr=gate if gate is not None else packed,
        gx_ptr=grad_x if grad_x is not None else packed,
        gpart_ptr=gate_part if gate_part is not None else packed,
        sample_ptr=sample,
        slot_ptr=slot,
        tile_expert_ptr=schedule.tile_expert,
        tile_start_ptr=schedule.tile_start,
        tile_end_ptr=schedule.tile_end,
        num_tiles=schedule.num_tiles,
        total_rows=sample.shape[0] * height * wid,
        C_in=c_in,
        H=height,
        W=wid,
        H_out=go_nhwc.shape[1],
        W_out=go_nhwc.shape[2],
        WIDTH=width,
        WP_COLS=packed.shape[2],
        **nhwc_strides("sgo", go_nhwc),
        **nhwc_strides("sx", x_nhwc),
        **gate_strides(gate),
        **dict(zip(("sob", "soj", "soh", "sow"), out_strides, strict=True)),
        **conv_args(stride, padding, dilation),
    )
    consts = dict(
        KH=kernel_size[0],
        KW=kernel_size[1],
        EVEN_K=width % config.block_k == 0,
        EVEN_N=packed.shape[2] % config.block_n == 0,
        HAS_GATE=gate is not None,
        NEED_X=grad_x is not None,
        NEED_GATE=gate_part is not None,
        ACC_DTYPE=dot.acc_dtype,
        UPCAST=dot.upcast,
        INPUT_PRECISION=dot.input_precision,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
    )
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    launch(moe_conv_dgrad_nhwc_kernel, (programs,), args, consts, options)
