"""Pieces shared by the NHWC kernels (``@triton.jit`` helpers, inlined into each kernel): the persistent
grid's tile walk, the decoding of GEMM rows into (sample, slot, pixel), a K step's operand loads, the dot.

The kernels' GEMM rows are pixels of the routing slots sorted by expert: row ``r`` is pixel ``r % P`` of the
sorted slot ``r // P`` (P = pixels per slot), i.e. of sample ``sample[r // P]`` at slot position
``slot[r // P]``. A tile of the table is a run ``[start, end)`` of rows of one expert.
"""

from __future__ import annotations

import triton
import triton.language as tl


# tile_start, tile_end: (T,) tile table; item: a work item of a persistent grid over T * n_blocks.
@triton.jit
def tile_of_item(item, n_blocks, tile_start_ptr, tile_end_ptr):
    """(tile, column block, first row, end row) of a persistent-grid work item (empty tile: start >= end)."""
    tile = item // n_blocks
    pid_n = item % n_blocks
    start = tl.load(tile_start_ptr + tile).to(tl.int32)
    end = tl.load(tile_end_ptr + tile).to(tl.int32)
    return tile, pid_n, start, end


# sample, slot: (B*k,) sorted slots; rows_per_slot = P = pixel_rows * row_width.
@triton.jit
def slot_rows(first_row, end, sample_ptr, slot_ptr, rows_per_slot, row_width, BLOCK_M: tl.constexpr):
    """The BLOCK_M GEMM rows from ``first_row`` (masked at ``end``) as (rows, row_mask, b, j, y, x): sample b
    (int64), slot position j (int64) and pixel (y, x) of each row (pixels of ``row_width`` per image row)."""
    rows = first_row + tl.arange(0, BLOCK_M)
    row_mask = rows < end
    sorted_slot = rows // rows_per_slot
    pix = rows % rows_per_slot
    b = tl.load(sample_ptr + sorted_slot, mask=row_mask, other=0).to(tl.int64)
    j = tl.load(slot_ptr + sorted_slot, mask=row_mask, other=0).to(tl.int64)
    return rows, row_mask, b, j, pix // row_width, pix % row_width


# a_ptrs: (BLOCK_M, BLOCK_K) A operand (rows x K step); w_ptrs: (BLOCK_K, BLOCK_N) B operand (packed weight).
@triton.jit
def load_operands(a_ptrs, w_ptrs, row_ok, k_ok, col_mask, EVEN_K: tl.constexpr, EVEN_N: tl.constexpr):
    """The A and B blocks of one K step: rows masked by ``row_ok``, the K step by ``k_ok`` unless EVEN_K (full
    steps: unmasked, vectorised channel loads), the B columns by ``col_mask`` unless EVEN_N."""
    if EVEN_K:
        a = tl.load(a_ptrs, mask=row_ok[:, None], other=0.0)
        if EVEN_N:  # noqa: SIM108 (constexpr branch)
            wt = tl.load(w_ptrs)
        else:
            wt = tl.load(w_ptrs, mask=col_mask[None, :], other=0.0)
    else:
        a = tl.load(a_ptrs, mask=row_ok[:, None] & k_ok[None, :], other=0.0)
        wt = tl.load(w_ptrs, mask=k_ok[:, None] & col_mask[None, :], other=0.0)
    return a, wt


@triton.jit
def mma(acc, a, b, ACC_DTYPE: tl.constexpr, UPCAST: tl.constexpr, INPUT_PRECISION: tl.constexpr):
    """``acc + a @ b`` accumulated in ACC_DTYPE; UPCAST: the operands converted to ACC_DTYPE first."""
    if UPCAST:
        a = a.to(ACC_DTYPE)
        b = b.to(ACC_DTYPE)
    return acc + tl.dot(a, b, input_precision=INPUT_PRECISION, out_dtype=ACC_DTYPE)


# K = (tap, channel) with k_blocks blocks of BLOCK_K channels per tap; taps run over (KH, KW) row-major.
@triton.jit
def k_step(step, k_blocks, KW: tl.constexpr, BLOCK_K: tl.constexpr):
    """(tap, first channel of the block, kernel row ki, kernel column kj) of K step ``step``."""
    tap = step // k_blocks
    k0 = tl.multiple_of((step % k_blocks) * BLOCK_K, BLOCK_K)
    return tap, k0, tap // KW, tap % KW
