"""Tile schedule of the Triton kernels: which rows of which expert each program computes.

The kernels see the routing slots sorted by expert (``group_by_expert``). Each slot contributes
``rows_per_slot`` GEMM rows (its output pixels in the forward and wgrad, its input pixels in the
dgrad), so expert e owns the contiguous row range ``[offsets[e] * P, offsets[e+1] * P)`` of the sorted
row space. A tile is a run of at most ``block_rows`` rows of ONE expert: tiles are padded only at expert
boundaries, and the total work is proportional to the routed rows (cost scales with k / E).

The schedule is built with torch ops on the device of ``counts``, with no host synchronisation: the
number of tiles is the upper bound ``cdiv(total_rows, block_rows) + E``, and the spare tiles at the
end are empty (``start == end``), so their programs exit at once.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class TileSchedule:
    """Tile -> (expert, row range) map of one kernel launch.

    Attributes:
        tile_expert: (T,) int32 expert of each tile; ``E`` for spare (empty) tiles.
        tile_start: (T,) int64 first sorted row of each tile.
        tile_end: (T,) int64 one past the tile's last row (never beyond its expert's last row);
            equal to ``tile_start`` for spare tiles.
        block_rows: the tile height the schedule was built for.
    """

    tile_expert: torch.Tensor
    tile_start: torch.Tensor
    tile_end: torch.Tensor
    block_rows: int

    @property
    def num_tiles(self) -> int:
        """T, the number of programs to launch along the row axis (an upper bound of the non-empty tiles)."""
        return self.tile_expert.shape[0]


def max_tiles(total_rows: int, num_experts: int, block_rows: int) -> int:
    """Upper bound of the tiles needed for ``total_rows`` rows split among ``num_experts`` experts."""
    return -(-total_rows // block_rows) + num_experts


def build_tile_schedule(counts: torch.Tensor, num_slots: int, rows_per_slot: int, block_rows: int) -> TileSchedule:
    """Splits each expert's sorted rows into tiles of at most ``block_rows`` rows.

    Args:
        counts: (E,) int64 number of routing slots per expert (``ExpertGroups.counts``).
        num_slots: B * k, the sum of ``counts`` (passed in so that no device sync is needed).
        rows_per_slot: P, the GEMM rows of one slot (H_out * W_out, or H * W for the dgrad).
        block_rows: tile height (the kernel's BLOCK_M, or a multiple of it for split reductions).

    Returns:
        The schedule; its tiles list, in order, the row runs of expert 0, then expert 1, and so on.

    Raises:
        ValueError: ``num_slots`` < 0, ``rows_per_slot`` < 1 or ``block_rows`` < 1.
    """
    if num_slots < 0:
        raise ValueError(f"num_slots must be >= 0, got {num_slots}")
    if rows_per_slot < 1:
        raise ValueError(f"rows_per_slot must be >= 1, got {rows_per_slot}")
    if block_rows < 1:
        raise ValueError(f"block_rows must be >= 1, got {block_rows}")
    num_experts = counts.shape[0]
    device = counts.device
    rows = counts.to(torch.int64) * rows_per_slot  # (E,)
    expert_start = torch.cumsum(rows, 0) - rows  # (E,) first sorted row of each expert
    tiles = (rows + block_rows - 1) // block_rows  # (E,)
    tile_cum = torch.cumsum(tiles, 0)
    num_tiles = max_tiles(num_slots * rows_per_slot, num_experts, block_rows)
    t = torch.arange(num_tiles, device=device, dtype=torch.int64)
    expert = torch.searchsorted(tile_cum, t, right=True)  # (T,) in [0, E]
    valid = expert < num_experts
    e = expert.clamp(max=max(num_experts - 1, 0))
    local = t - (tile_cum - tiles)[e]  # index of the tile within its expert
    start = expert_start[e] + local * block_rows
    end = torch.minimum(start + block_rows, expert_start[e] + rows[e])
    zero = torch.zeros((), dtype=torch.int64, device=device)
    return TileSchedule(
        tile_expert=expert.to(torch.int32),
        tile_start=torch.where(valid, start, zero),
        tile_end=torch.where(valid, end, zero),
        block_rows=block_rows,
    )
