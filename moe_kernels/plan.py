"""The routing plan: the B*k routing slots of a batch grouped by expert, built once per forward on the device.

One router usually drives every MoE layer of a model (the research ResNet-18 has 16), so the grouping it
implies is computed once and shared: ``RoutingPlan.build(expert_idx, E)`` sorts the slots by expert
(stable), counts them per expert and keeps, per kernel geometry, the tile table of the Triton kernels.
Every layer that receives the same routing takes the same plan (``sparse_moe_conv2d(..., plan=plan)``;
``advmoe.nn.Routing.plan()`` caches one on the routing record).

Host reads: building a plan never reads device memory on the host. The sort is ``torch.sort``, the
counts a ``scatter_add_`` into a fixed-size (E,) tensor, the offsets a ``cumsum``, the tile tables are
sized by an upper bound (``moe_kernels._triton.schedule``). The index check is
``torch._assert_async`` on a device bool (no sync; an out-of-range index is a device-side assertion)
except on CPU tensors, where reading the values costs nothing and gives a ``ValueError``. The
environment variable ``MOE_KERNELS_INDEX_CHECK`` (or the ``check=`` argument) overrides the choice:
``"host"`` checks on the host everywhere (one sync on a GPU, a clear ValueError; for debugging),
``"device"`` uses the device assertion everywhere. The only host read a plan offers is
``host_groups()`` (and ``host_offsets()`` from the same read), for backends that launch one library call per
expert (reference, slices); it is made once per plan, i.e. once per forward when the plan is shared, and
cached.

On a GPU the plan is built with torch device ops (about ten small launches), not a dedicated Triton
kernel; none of them synchronises with the host.
"""

from __future__ import annotations

import os
import weakref

import torch

from moe_kernels._triton.schedule import TileSchedule, build_tile_schedule

_CHECK_MODES = ("auto", "host", "device")
INDEX_CHECK_ENV = "MOE_KERNELS_INDEX_CHECK"

# id(plan.counts) -> plan, so that the op, which receives the plan's tensors (a custom op takes no Python
# objects), finds the plan object again and shares its cached tile tables and host offsets across layers.
# The plan holds its counts tensor, so an id cannot be reused while its entry is alive.
_LIVE_PLANS: weakref.WeakValueDictionary[int, RoutingPlan] = weakref.WeakValueDictionary()


def index_check_mode(check: str | None, device: torch.device) -> str:
    """Resolves the index-check policy to "host" or "device".

    Args:
        check: "auto", "host", "device", or None for the ``MOE_KERNELS_INDEX_CHECK`` environment variable
            (default "auto"). "auto" is "host" on CPU tensors and "device" elsewhere; under torch.compile /
            torch.export it is always "device" (a host read would break the graph).
        device: where the expert indices live.

    Raises:
        ValueError: an unknown mode (argument or environment variable).
    """
    mode = check if check is not None else os.environ.get(INDEX_CHECK_ENV, "auto")
    if mode not in _CHECK_MODES:
        source = "check" if check is not None else f"environment variable {INDEX_CHECK_ENV}"
        raise ValueError(f"{source} must be one of {_CHECK_MODES}, got {mode!r}")
    if mode == "auto":
        mode = "host" if device.type == "cpu" and not torch.compiler.is_compiling() else "device"
    return mode


def check_expert_idx_values(expert_idx: torch.Tensor, num_experts: int, check: str | None = None) -> None:
    """Checks that every entry of ``expert_idx`` (B, k) lies in ``[0, num_experts)``.

    Args:
        expert_idx: (B, k) integer tensor.
        num_experts: E.
        check: the policy (see ``index_check_mode``).

    Raises:
        ValueError: (host check) an index out of range; the message gives the range found.
        RuntimeError: (device check, CPU tensors) the same, from ``torch._assert_async``; on a GPU the
            device-side assertion fires asynchronously.
    """
    if expert_idx.numel() == 0:
        return
    if index_check_mode(check, expert_idx.device) == "host":
        lo, hi = torch.aminmax(expert_idx)
        lo, hi = int(lo), int(hi)
        if lo < 0 or hi >= num_experts:
            raise ValueError(f"expert_idx values must be in [0, {num_experts}), got values in [{lo}, {hi}]")
        return
    in_range = ((expert_idx >= 0) & (expert_idx < num_experts)).all()
    torch._assert_async(in_range, f"expert_idx values must be in [0, {num_experts})")


def sort_slots(expert_idx: torch.Tensor, num_experts: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The B*k routing slots sorted by expert (stable) and counted per expert, on the device, no host read.

    Args:
        expert_idx: (B, k) integer expert indices in ``[0, num_experts)`` (not checked here).
        num_experts: E.

    Returns:
        order (B*k,) int64 flat slot indices ``b*k + j`` in expert order, counts (E,) int64.
    """
    flat = expert_idx.reshape(-1).to(torch.int64)
    order = torch.sort(flat, stable=True).indices
    counts = torch.zeros(num_experts, dtype=torch.int64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat))  # bincount would read its max on the host
    return order, counts


class RoutingPlan:
    """The routing slots of one batch grouped by expert, with everything the backends derive from it.

    Slot ``s = b * k + j`` is sample b's j-th choice. Build with ``RoutingPlan.build``.

    Attributes:
        batch: B.
        top_k: k.
        num_experts: E.
        device: where the tensors live.
        order: (B*k,) int64 slots sorted by expert, stable (samples in order within an expert).
        sample: (B*k,) int64 ``order // k``, the sample of each sorted slot.
        slot: (B*k,) int64 ``order % k``, the position of each sorted slot among its sample's choices.
        counts: (E,) int64 slots per expert.
        offsets: (E + 1,) int64 start of each expert's run in ``order`` (``offsets[E] = B*k``).
        source: the expert_idx tensor the plan was built from (None for plans rebuilt inside the op).
    """

    def __init__(self, batch, top_k, num_experts, order, sample, slot, counts, offsets, source=None):
        self.batch, self.top_k, self.num_experts = batch, top_k, num_experts
        self.device = counts.device
        self.order, self.sample, self.slot, self.counts, self.offsets = order, sample, slot, counts, offsets
        self.source = source
        self._tiles: dict[tuple[int, int], TileSchedule] = {}
        self._host_offsets: list[int] | None = None
        self._host_groups: list[tuple[int, int, int, int, int]] | None = None
        if not torch.compiler.is_compiling():
            _LIVE_PLANS[id(counts)] = self

    @classmethod
    def build(cls, expert_idx: torch.Tensor, num_experts: int, check: str | None = None) -> RoutingPlan:
        """Groups the routing slots of ``expert_idx`` by expert, on its device, without a host read.

        Args:
            expert_idx: (B, k) int64 (or int32) expert indices in ``[0, num_experts)``.
            num_experts: E >= 1.
            check: index-check policy, "auto" (default), "host" or "device" (see ``index_check_mode``).

        Returns:
            The plan.

        Raises:
            TypeError, ValueError: expert_idx not a (B, k) integer tensor, num_experts < 1, or (host check)
                an index out of range.
        """
        if not isinstance(expert_idx, torch.Tensor) or expert_idx.dim() != 2:
            raise ValueError(f"expert_idx must be a (B, k) tensor, got {getattr(expert_idx, 'shape', expert_idx)}")
        if expert_idx.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"expert_idx must be an int64 (or int32) tensor, got {expert_idx.dtype}")
        if isinstance(num_experts, bool) or not isinstance(num_experts, int) or num_experts < 1:
            raise ValueError(f"num_experts must be an int >= 1, got {num_experts!r}")
        check_expert_idx_values(expert_idx, num_experts, check)
        batch, top_k = expert_idx.shape
        order, counts = sort_slots(expert_idx, num_experts)
        offsets = torch.cat([counts.new_zeros(1), torch.cumsum(counts, 0)])
        return cls(batch, top_k, num_experts, order, order // top_k, order % top_k, counts, offsets, expert_idx)

    def tensors(self) -> list[torch.Tensor]:
        """[sample, slot, counts, offsets]: what the registered op receives in place of the plan object."""
        return [self.sample, self.slot, self.counts, self.offsets]

    @classmethod
    def from_tensors(cls, tensors: list[torch.Tensor], batch: int, top_k: int) -> RoutingPlan:
        """The plan whose ``tensors()`` these are: the live plan object when there is one (sharing its cached
        tile tables), else a new plan around the same tensors (nothing recomputed but caches)."""
        sample, slot, counts, offsets = tensors
        live = _LIVE_PLANS.get(id(counts))
        if live is not None and live.counts is counts and live.sample is sample and live.slot is slot:
            return live
        return cls(batch, top_k, counts.shape[0], None, sample, slot, counts, offsets)

    def check_matches(self, batch: int, top_k: int, num_experts: int, device: torch.device) -> None:
        """Raises ValueError unless the plan was built for this batch size, k, E and device (a stale plan)."""
        want = {"batch size": batch, "k": top_k, "num_experts": num_experts, "device": torch.device(device)}
        have = {"batch size": self.batch, "k": self.top_k, "num_experts": self.num_experts, "device": self.device}
        for name, value in want.items():
            if have[name] != value:
                raise ValueError(
                    f"plan was built for {name} {have[name]} but the call has {name} {value}: a stale routing "
                    "plan; build a new one with RoutingPlan.build(expert_idx, num_experts)"
                )

    def tile_schedule(self, rows_per_slot: int, block_rows: int) -> TileSchedule:
        """The Triton tile table for ``rows_per_slot`` GEMM rows per slot and tiles of ``block_rows`` rows,
        built on first use (on the device, no host read; T = cdiv(B*k*P, block_rows) + E tiles, spare ones
        empty) and cached, so layers of the same geometry share it."""
        key = (rows_per_slot, block_rows)
        if key not in self._tiles:
            self._tiles[key] = build_tile_schedule(self.counts, self.batch * self.top_k, rows_per_slot, block_rows)
        return self._tiles[key]

    def host_groups(self) -> list[tuple[int, int, int, int, int]]:
        """``[(expert, start, end, first_sample, slot), ...]`` of the experts with slots, from ONE device-to-host
        read per plan (cached; shared with ``host_offsets``). ``first_sample >= 0`` when the expert's sorted
        slots are consecutive samples ``first_sample, first_sample + 1, ...`` all at position ``slot`` (so the
        expert's input and output are contiguous slices of the batch); else -1."""
        if self._host_groups is None:
            num_slots = self.sample.shape[0]
            starts, ends = self.offsets[:-1], self.offsets[1:]
            if num_slots > 0:
                breaks = (self.sample[1:] - self.sample[:-1] != 1) | (self.slot[1:] != self.slot[:-1])
                prefix = torch.cat([breaks.new_zeros(1, dtype=torch.int64), torch.cumsum(breaks.to(torch.int64), 0)])
                first = starts.clamp(max=num_slots - 1)
                last = (ends - 1).clamp(min=0, max=num_slots - 1)
                info = [prefix[last] - prefix[first], self.sample[first], self.slot[first]]
            else:
                info = [torch.zeros_like(starts)] * 3
            table = torch.stack([starts, ends, *info]).tolist()  # the one host read
            self._host_offsets = table[0] + table[1][-1:]
            self._host_groups = [
                (e, start, end, first_sample if run_breaks == 0 else -1, slot)
                for e, (start, end, run_breaks, first_sample, slot) in enumerate(zip(*table, strict=True))
                if end > start
            ]
        return self._host_groups

    def host_offsets(self) -> list[int]:
        """``offsets`` as Python ints, from the one cached host read of ``host_groups``."""
        self.host_groups()
        return self._host_offsets

    def ranges(self) -> list[tuple[int, int, int]]:
        """``[(expert, start, end), ...]`` of the experts that received at least one slot (uses ``host_offsets``)."""
        offs = self.host_offsets()
        return [(e, offs[e], offs[e + 1]) for e in range(self.num_experts) if offs[e + 1] > offs[e]]

    def __repr__(self) -> str:
        return (
            f"RoutingPlan(batch={self.batch}, top_k={self.top_k}, num_experts={self.num_experts}, device={self.device})"
        )
