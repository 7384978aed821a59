"""Forward v2: channels_last implicit GEMM over the tile table, persistent grid, fused epilogue.

GEMM view: rows are the output pixels of the routing slots sorted by expert (a tile of the table is
a run of rows of ONE expert), columns the expert's w output channels, K = (tap, input channel). x is
read as NHWC (channel stride 1): a K step is BLOCK_K contiguous channels of one tap, so the A operand
is ``row_base[:, None] + channel[None, :]`` -- the row offsets (sample, input row, input column of each
pixel, padding mask) are computed once per K step as BLOCK_M-vectors (once per tap when
C_in <= BLOCK_K), the channel loads are contiguous (``multiple_of`` / ``max_contiguous`` hints) and
need no mask when C_in % BLOCK_K == 0 (``EVEN_K``). B is the expert's slice of the "fwd" weight pack
(E, kh*kw*C_in, w) (``packing.py``).

Persistent grid: ``programs`` programs walk the (tile, column block) pairs with a stride of
``programs``; spare tiles of the upper-bound table are skipped. Epilogue (fused into the store):
``out = act(gate * (acc + bias) + residual)`` cast to the output dtype, written either scattered into
``y[b, j*w + n, oh, ow]`` (any strides) or in grouped order ``y_grouped[row, n]`` (rows of the table).
"""

from __future__ import annotations

import triton
import triton.language as tl

from moe_kernels._triton.kernel_parts import k_step, load_operands, mma, slot_rows, tile_of_item
from moe_kernels._triton.spec import conv_args, gate_strides, launch, nhwc_strides
from moe_kernels.geometry import conv_output_size


# x: (B, H, W, C_in) NHWC view, channel stride 1; wp: (E, KH*KW*C_in, WP_COLS >= WIDTH) packed weight;
# bias: (E*WIDTH,); gate: (B, k); res, y: scattered (B, k*WIDTH, H_out, W_out) with strides (s*b, s*c, s*h, s*w),
# or grouped (rows, WIDTH) with strides (s*b = row stride, s*c = column stride);
# sample, slot: (B*k,) sorted slots; tile_*: (T,) tile table, rows_per_slot = H_out*W_out.
# grid: (programs,), persistent over T * cdiv(WIDTH, BLOCK_N) work items.
@triton.jit
def moe_conv_fwd_nhwc_kernel(
    x_ptr,
    wp_ptr,
    w_desc,
    bias_ptr,
    gate_ptr,
    res_ptr,
    y_ptr,
    sample_ptr,
    slot_ptr,
    tile_expert_ptr,
    tile_start_ptr,
    tile_end_ptr,
    num_tiles,
    C_in,
    H,
    W,
    H_out,
    W_out,
    WIDTH,
    WP_COLS,
    sxb,
    sxh,
    sxw,
    sgb,
    sgk,
    syb,
    syc,
    syh,
    syw,
    srb,
    src,
    srh,
    srw,
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
    USE_TMA: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    HAS_GATE: tl.constexpr,
    HAS_RES: tl.constexpr,
    RELU: tl.constexpr,
    GROUPED_OUT: tl.constexpr,
    ACC_DTYPE: tl.constexpr,
    UPCAST: tl.constexpr,
    INPUT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
):
    n_blocks = tl.cdiv(WIDTH, BLOCK_N)
    c_blocks = tl.cdiv(C_in, BLOCK_K)
    k_steps = KH * KW * c_blocks
    rows_per_slot = H_out * W_out
    ck = tl.max_contiguous(tl.multiple_of(tl.arange(0, BLOCK_K), BLOCK_K), BLOCK_K)
    for item in range(tl.program_id(0), num_tiles * n_blocks, tl.num_programs(0)):
        tile, pid_n, start, end = tile_of_item(item, n_blocks, tile_start_ptr, tile_end_ptr)
        if start < end:  # spare tiles of the upper-bound table are empty
            expert = tl.load(tile_expert_ptr + tile).to(tl.int64)
            rows, row_mask, b, j, oh, ow = slot_rows(start, end, sample_ptr, slot_ptr, rows_per_slot, W_out, BLOCK_M)
            ih0 = oh * stride_h - pad_h
            iw0 = ow * stride_w - pad_w
            x_b = x_ptr + b * sxb  # (BLOCK_M,) each row's sample

            n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
            n_mask = n < WIDTH
            w_e = wp_ptr + expert * (KH * KW * C_in) * WP_COLS

            acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=ACC_DTYPE)
            for step in range(0, k_steps):
                tap, c0, ki, kj = k_step(step, c_blocks, KW, BLOCK_K)
                ih = ih0 + ki * dil_h
                iw = iw0 + kj * dil_w
                row_ok = row_mask & (ih >= 0) & (ih < H) & (iw >= 0) & (iw < W)
                a_ptrs = (x_b + ih * sxh + iw * sxw)[:, None] + (c0 + ck)[None, :]
                w_ptrs = w_e + (tap * C_in + c0 + ck).to(tl.int64)[:, None] * WP_COLS + n[None, :]
                if USE_TMA:  # (EVEN_K and EVEN_N) the (BLOCK_K, BLOCK_N) weight block through a TMA descriptor
                    a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
                    wt = w_desc.load([(expert * (KH * KW * C_in) + tap * C_in + c0).to(tl.int32), pid_n * BLOCK_N])
                else:
                    a, wt = load_operands(a_ptrs, w_ptrs, row_ok, (c0 + ck) < C_in, n_mask, EVEN_K, EVEN_N)
                acc = mma(acc, a, wt, ACC_DTYPE, UPCAST, INPUT_PRECISION)

            if HAS_BIAS:
                bias = tl.load(bias_ptr + expert * WIDTH + n, mask=n_mask, other=0.0)
                acc += bias.to(ACC_DTYPE)[None, :]
            if HAS_GATE:
                g = tl.load(gate_ptr + b * sgb + j * sgk, mask=row_mask, other=0.0)
                acc *= g.to(ACC_DTYPE)[:, None]
            if GROUPED_OUT:
                y_row = rows.to(tl.int64) * syb
                r_row = rows.to(tl.int64) * srb
            else:
                y_row = b * syb + (j * WIDTH) * syc + oh * syh + ow * syw
                r_row = b * srb + (j * WIDTH) * src + oh * srh + ow * srw
            mask = row_mask[:, None] & n_mask[None, :]
            if HAS_RES:
                r = tl.load(res_ptr + r_row[:, None] + (n * src)[None, :], mask=mask, other=0.0)
                acc += r.to(ACC_DTYPE)
            if RELU:
                acc = tl.maximum(acc, 0.0)
            tl.store(y_ptr + y_row[:, None] + (n * syc)[None, :], acc.to(y_ptr.dtype.element_ty), mask=mask)


def launch_forward_nhwc(
    x_nhwc,
    packed,
    bias,
    gate,
    residual,
    y,
    sorted_slots,
    schedule,
    width,
    stride,
    padding,
    dilation,
    kernel_size,
    relu,
    grouped_out,
    dot,
    config,
    programs,
):
    """Launches the forward v2 kernel (arguments prepared by the launcher in ``moe_kernels.backends.triton``).

    Args:
        x_nhwc: (B, H, W, C_in) with channel stride 1 (``x.permute(0, 2, 3, 1)`` of a channels_last x).
        packed: (E, kh*kw*C_in, w) "fwd" weight pack; bias: (E*w,) or None; gate: (B, k) or None.
        residual: None, or a tensor laid out like ``y`` (added after the gate, before the ReLU).
        y: scattered (B, k*w, H_out, W_out) any strides, or grouped (B*k*H_out*W_out, w) when ``grouped_out``.
        sorted_slots: (sample, slot) int64 (B*k,) each; schedule: ``TileSchedule`` with rows_per_slot =
        H_out*W_out and block_rows = config.block_m. width: w; stride, padding, dilation, kernel_size: pairs.
        relu: fuse a ReLU; dot: ``DotSettings``; config: ``KernelConfig``; programs: persistent grid size.
    """
    sample, slot = sorted_slots
    c_in = x_nhwc.shape[3]
    if grouped_out:  # y: (rows, w)
        h_out, w_out = (
            conv_output_size(x_nhwc.shape[1 + i], kernel_size[i], stride[i], padding[i], dilation[i]) for i in (0, 1)
        )
    else:
        h_out, w_out = y.shape[2], y.shape[3]

    def strides4(t):
        if t is None:
            return (0, 0, 0, 0)
        return (t.stride(0), t.stride(1), 0, 0) if grouped_out else t.stride()

    even_k, even_n = c_in % config.block_k == 0, packed.shape[2] % config.block_n == 0
    use_tma = config.tma and even_k and even_n
    w_desc = packed
    if use_tma:
        from triton.tools.tensor_descriptor import TensorDescriptor

        w_desc = TensorDescriptor.from_tensor(packed.view(-1, packed.shape[2]), [config.block_k, config.block_n])
    args = dict(
        x_ptr=x_nhwc,
        wp_ptr=packed,
        w_desc=w_desc,
        bias_ptr=bias if bias is not None else packed,
        gate_ptr=gate if gate is not None else packed,
        res_ptr=residual if residual is not None else y,
        y_ptr=y,
        sample_ptr=sample,
        slot_ptr=slot,
        tile_expert_ptr=schedule.tile_expert,
        tile_start_ptr=schedule.tile_start,
        tile_end_ptr=schedule.tile_end,
        num_tiles=schedule.num_tiles,
        C_in=c_in,
        H=x_nhwc.shape[1],
        W=x_nhwc.shape[2],
        H_out=h_out,
        W_out=w_out,
        WIDTH=width,
        WP_COLS=packed.shape[2],
        **nhwc_strides("sx", x_nhwc),
        **gate_strides(gate),
        **dict(zip(("syb", "syc", "syh", "syw"), strides4(y), strict=True)),
        **dict(zip(("srb", "src", "srh", "srw"), strides4(residual), strict=True)),
        **conv_args(stride, padding, dilation),
    )
    consts = dict(
        KH=kernel_size[0],
        KW=kernel_size[1],
        EVEN_K=even_k,
        EVEN_N=even_n,
        USE_TMA=use_tma,
        HAS_BIAS=bias is not None,
        HAS_GATE=gate is not None,
        HAS_RES=residual is not None,
        RELU=relu,
        GROUPED_OUT=grouped_out,
        ACC_DTYPE=dot.acc_dtype,
        UPCAST=dot.upcast,
        INPUT_PRECISION=dot.input_precision,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_K=config.block_k,
    )
    options = dict(num_warps=config.num_warps, num_stages=config.num_stages)
    launch(moe_conv_fwd_nhwc_kernel, (programs,), args, consts, options)
