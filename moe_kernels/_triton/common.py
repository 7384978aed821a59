"""Shared pieces of the Triton kernels: launch settings per device and dtype, and jit helpers.

Under ``TRITON_INTERPRET=1`` (CPU tests) every kernel runs with one small fixed configuration and
computes its dots in the accumulator precision (the interpreter's low-precision ``tl.dot`` is not
trustworthy). On a GPU the blocks are tensor-core sized and fp16/bf16 dots run natively with fp32
accumulation; fp32 dots use TF32 when ``torch.backends.cudnn.allow_tf32`` is on, like ``F.conv2d``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import triton
import triton.language as tl


def interpreted() -> bool:
    """True when the kernels run in the Triton interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


@dataclass(frozen=True)
class DotSettings:
    """How the kernels multiply for one input dtype.

    Attributes:
        acc_dtype: the accumulator (fp32, or fp64 for fp64 inputs).
        upcast: convert the loaded operands to ``acc_dtype`` before ``tl.dot``.
        input_precision: ``tl.dot`` precision for fp32 operands ("tf32" or "ieee").
    """

    acc_dtype: tl.dtype
    upcast: bool
    input_precision: str


def dot_settings(dtype: torch.dtype) -> DotSettings:
    """Accumulator and dot precision for inputs of ``dtype``."""
    if dtype == torch.float64:
        return DotSettings(tl.float64, True, "ieee")
    if interpreted():
        return DotSettings(tl.float32, True, "ieee")
    tf32 = dtype == torch.float32 and torch.backends.cudnn.allow_tf32
    return DotSettings(tl.float32, False, "tf32" if tf32 else "ieee")


def acc_torch_dtype(dtype: torch.dtype) -> torch.dtype:
    """The torch dtype of the accumulation buffers (atomics, partial sums) for inputs of ``dtype``."""
    return torch.float64 if dtype == torch.float64 else torch.float32


# Blocks under the interpreter: large, because it pays per program and per op, not per element.
# Tests shrink them (monkeypatch) to cover many tiles, column blocks and K steps on small shapes.
INTERPRETER_BLOCKS = {"block_m": 64, "block_n": 32, "block_k": 32, "wgrad_programs": 8}


@dataclass(frozen=True)
class Blocks:
    """Block sizes and launch settings of one kernel launch."""

    block_m: int
    block_n: int
    block_k: int
    num_warps: int = 4
    num_stages: int = 2


def _interpreter_blocks() -> Blocks:
    cfg = INTERPRETER_BLOCKS
    return Blocks(cfg["block_m"], cfg["block_n"], cfg["block_k"], num_warps=1, num_stages=1)


def _cols_block(cols: int, cap: int) -> int:
    """Smallest power of two >= cols, clamped to [16, cap] (tl.dot needs at least 16)."""
    return max(16, min(cap, triton.next_power_of_2(max(cols, 1))))


def gemm_blocks(
    cols: int, dtype: torch.dtype, total_rows: int | None = None, device: torch.device | None = None
) -> Blocks:
    """Blocks of an implicit GEMM with ``cols`` output columns (expert width or C_in).

    Rows are ``block_m`` high (the tile schedule is built for that height): 128 (64 for 128-wide
    columns), halved down to 32 while the grid would give fewer than 2 programs per SM (small
    images, small batches).
    """
    if interpreted():
        return _interpreter_blocks()
    wide = dtype in (torch.float16, torch.bfloat16)
    block_n = _cols_block(cols, 128 if wide else 64)
    block_k = 64 if wide else 32
    block_m = 64 if block_n >= 128 else 128
    if total_rows is not None and device is not None and device.type == "cuda":
        col_blocks = triton.cdiv(cols, block_n)
        while block_m > 32 and triton.cdiv(total_rows, block_m) * col_blocks < 2 * _sm_count(device):
            block_m //= 2
    return Blocks(block_m, block_n, block_k, num_warps=4 if block_n <= 64 else 8, num_stages=3)


def wgrad_blocks(width: int, dtype: torch.dtype) -> Blocks:
    """Blocks of the weight-gradient GEMM: ``block_n`` over the expert width, ``block_k`` over
    C_in * kh * kw, ``block_m`` is the reduction step over rows."""
    if interpreted():
        return _interpreter_blocks()
    wide = dtype in (torch.float16, torch.bfloat16)
    return Blocks(64 if wide else 32, _cols_block(width, 64), 64, num_warps=4, num_stages=3)


def wgrad_chunk(total_rows: int, block_m: int, col_programs: int, device: torch.device) -> int:
    """Rows reduced by one weight-gradient program (a multiple of ``block_m``, at most 64 steps of it).

    Each row chunk adds a full partial gradient of its expert with atomics, so chunks are made as
    long as possible while the grid (chunks x ``col_programs`` column blocks) still fills the GPU
    with about 4 programs per SM. Under the interpreter the chunk count is
    ``INTERPRETER_BLOCKS["wgrad_programs"]``.
    """
    if interpreted():
        chunks = INTERPRETER_BLOCKS["wgrad_programs"]
    else:
        chunks = max(1, 4 * _sm_count(device) // max(col_programs, 1))
    per = triton.cdiv(max(total_rows, 1), chunks)
    steps = min(64, max(1, triton.cdiv(per, block_m)))
    return steps * block_m


_SM_COUNTS: dict[int, int] = {}


def _sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (cached; 132 on an H100 SXM)."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _SM_COUNTS:
        _SM_COUNTS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _SM_COUNTS[index]


@triton.jit
def decode_rows(rows, row_mask, rows_per_slot, width_pix, sample_ptr, slot_ptr):
    """Sorted GEMM rows -> (sample b, slot j, pixel row, pixel column) of each row.

    rows: (BLOCK_M,) sorted row indices; a row is (sorted slot rows // P, pixel rows % P).
    """
    sorted_slot = rows // rows_per_slot
    pix = rows % rows_per_slot
    b = tl.load(sample_ptr + sorted_slot, mask=row_mask, other=0).to(tl.int64)
    j = tl.load(slot_ptr + sorted_slot, mask=row_mask, other=0).to(tl.int64)
    return b, j, pix // width_pix, pix % width_pix
