"""Routing helpers: group the (sample, slot) pairs of a batch by expert, and expert usage shares.

The grouping itself lives in ``moe_kernels.plan.RoutingPlan`` (the one slot-sorting routine of the
package); ``group_by_expert`` is its functional spelling and ``ExpertGroups`` its old name.
"""

from __future__ import annotations

import torch

from moe_kernels.plan import RoutingPlan

ExpertGroups = RoutingPlan  # the name this record had before it became the shared routing plan


def group_by_expert(expert_idx: torch.Tensor, num_experts: int) -> RoutingPlan:
    """Sorts the routing slots of ``expert_idx`` (B, k) by expert (stable, so samples stay in order).

    Args:
        expert_idx: (B, k) integer tensor with values in ``[0, num_experts)``.
        num_experts: E.

    Returns:
        A ``RoutingPlan``; its ``sample``/``slot``/``counts``/``offsets`` list, for each expert, the
        (sample, slot) pairs it serves, and ``ranges()`` the non-empty runs.
    """
    return RoutingPlan.build(expert_idx, num_experts)


def expert_usage(expert_idx: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(E,) share of the B*k routing slots that each expert received (sums to 1; zeros if B = 0)."""
    flat = expert_idx.reshape(-1).to(torch.int64)
    counts = torch.zeros(num_experts, dtype=torch.float64, device=flat.device)
    counts.scatter_add_(0, flat, torch.ones_like(flat, dtype=torch.float64))
    return counts / counts.sum().clamp_min(1.0)
