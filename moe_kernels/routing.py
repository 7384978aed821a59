"""Routing helpers shared by the backends: group the (sample, slot) pairs of a batch by expert."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class ExpertGroups:
    """The B*k routing slots of a batch, sorted by expert.

    Attributes:
        sample: (B*k,) int64 sample index b of each sorted slot.
        slot: (B*k,) int64 slot index j (position among the sample's k choices) of each sorted slot.
        counts: (E,) int64 number of slots routed to each expert.
        offsets: (E + 1,) int64 start of each expert's run in the sorted order (offsets[E] = B*k).
    """

    sample: torch.Tensor
    slot: torch.Tensor
    counts: torch.Tensor
    offsets: torch.Tensor

    def ranges(self) -> list[tuple[int, int, int]]:
        """``[(expert, start, end), ...]`` for the experts that received at least one slot."""
        offs = self.offsets.tolist()
        return [(e, offs[e], offs[e + 1]) for e in range(len(offs) - 1) if offs[e + 1] > offs[e]]


def group_by_expert(expert_idx: torch.Tensor, num_experts: int) -> ExpertGroups:
    """Sorts the routing slots of ``expert_idx`` (B, k) by expert (stable, so samples stay in order).

    Args:
        expert_idx: (B, k) integer tensor with values in ``[0, num_experts)``.
        num_experts: E.

    Returns:
        An ``ExpertGroups`` whose runs list, for each expert, the (sample, slot) pairs it serves.
    """
    batch, top_k = expert_idx.shape
    flat = expert_idx.reshape(-1).to(torch.int64)
    order = torch.argsort(flat, stable=True)
    counts = torch.bincount(flat, minlength=num_experts)
    offsets = torch.zeros(num_experts + 1, dtype=torch.int64, device=flat.device)
    torch.cumsum(counts, 0, out=offsets[1:])
    return ExpertGroups(sample=order // top_k, slot=order % top_k, counts=counts, offsets=offsets)


def expert_usage(expert_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(E,) share of the B*k routing slots that each expert received (sums to 1; zeros if B = 0)."""
    counts = torch.bincount(expert_idx.reshape(-1).to(torch.int64), minlength=num_experts).double()
    total = counts.sum()
    return counts / total if total > 0 else counts
