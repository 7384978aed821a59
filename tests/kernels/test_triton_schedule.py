"""The Triton tile schedule: tiles cover each expert's sorted rows exactly once, never straddle an
expert boundary, are padded only there, and the grid bound is never exceeded."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from moe_kernels._triton.schedule import build_tile_schedule, max_tiles


def _check(counts: list[int], rows_per_slot: int, block_rows: int) -> None:
    counts_t = torch.tensor(counts, dtype=torch.int64)
    num_slots = sum(counts)
    sched = build_tile_schedule(counts_t, num_slots, rows_per_slot, block_rows)
    experts = len(counts)
    assert sched.num_tiles == max_tiles(num_slots * rows_per_slot, experts, block_rows)
    assert sched.block_rows == block_rows
    covered = torch.zeros(num_slots * rows_per_slot, dtype=torch.int64)
    expert_of_row = torch.repeat_interleave(torch.arange(experts), counts_t * rows_per_slot)
    used = 0
    for e, start, end in zip(
        sched.tile_expert.tolist(), sched.tile_start.tolist(), sched.tile_end.tolist(), strict=True
    ):
        if e == experts:
            assert start == end == 0, "spare tiles must be empty"
            continue
        assert 0 < end - start <= block_rows
        assert (expert_of_row[start:end] == e).all(), f"tile [{start}, {end}) crosses an expert boundary"
        covered[start:end] += 1
        used += 1
    assert (covered == 1).all(), "every row must be in exactly one tile"
    # Padding only at expert boundaries: exactly cdiv(rows_e, block_rows) tiles per expert.
    expected = sum(-(-c * rows_per_slot // block_rows) for c in counts)
    assert used == expected
    # Spare tiles come after all real tiles, and real tiles are in row order.
    real = sched.tile_expert < experts
    assert not (real[1:] & ~real[:-1]).any()
    starts = sched.tile_start[real]
    assert (starts[1:] > starts[:-1]).all()


@pytest.mark.parametrize(
    "counts,rows_per_slot,block_rows",
    [
        ([3, 0, 2], 42, 16),  # an expert with no slot
        ([0, 0, 5], 7, 64),  # all slots on the last expert, tile larger than the rows
        ([4, 4], 16, 16),  # rows a multiple of the block
        ([1], 1, 1),
        ([0, 0], 9, 16),  # no slot at all: only spare tiles
        ([7, 1, 0, 3], 1, 4),
    ],
)
def test_schedule_cases(counts, rows_per_slot, block_rows):
    _check(counts, rows_per_slot, block_rows)


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(0, 9), min_size=1, max_size=6),
    rows_per_slot=st.integers(1, 40),
    block_rows=st.sampled_from([1, 3, 16, 64, 128]),
)
def test_schedule_property(counts, rows_per_slot, block_rows):
    _check(counts, rows_per_slot, block_rows)


def test_schedule_dtypes_and_device():
    sched = build_tile_schedule(torch.tensor([2, 3]), 5, 10, 16)
    assert sched.tile_expert.dtype == torch.int32
    assert sched.tile_start.dtype == sched.tile_end.dtype == torch.int64
    assert sched.tile_start.device == sched.tile_expert.device


@pytest.mark.parametrize(
    "kwargs,match",
    [
        ({"num_slots": -1}, "num_slots"),
        ({"rows_per_slot": 0}, "rows_per_slot"),
        ({"block_rows": 0}, "block_rows"),
    ],
)
def test_schedule_rejects_bad_arguments(kwargs, match):
    args = {"counts": torch.tensor([1, 1]), "num_slots": 2, "rows_per_slot": 4, "block_rows": 16}
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        build_tile_schedule(**args)
