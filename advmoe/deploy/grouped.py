"""``GroupedMoE``: the grouped deployment form of a top-1 MoE model with one model-level router.

router -> sort the batch by expert (one argsort, one host read of the E counts) -> ONE network whose MoE
layers (``GroupedExpertConv2d``) run each expert's ``conv2d`` on its contiguous slice of the sorted batch
-> un-permute the logits. Dense layers (stem, shortcuts, head, folded BatchNorms) do not care about the
order, so they run once on the full batch: full-batch convolutions instead of E half-batch networks.

Under torch.export / torch.compile and while a CUDA graph is captured the counts cannot be read on the host;
the MoE layers then run every expert on the whole batch and keep each sample's own (E times the MoE FLOPs,
exact logits) until a sync-free grouped kernel (the routing plan) takes that path over.
"""

from __future__ import annotations

import torch
from torch import nn

from advmoe.deploy.layers import GroupRanges
from advmoe.deploy.routed_once import RoutedOnce
from advmoe.nn import Router
from moe_kernels.geometry import gather_rows


class GroupedMoE(RoutedOnce):
    """Deployed top-1 MoE: route once, permute once, one network in grouped order, un-permute once.

    Args:
        normalize: the input normalisation module, or None.
        router: the model-level router, (B, C, H, W) normalised images -> (B, E) scores.
        network: the MoE network without normalisation and router, whose MoE layers are
            ``GroupedExpertConv2d`` sharing ``groups``; takes normalised, expert-sorted input.
        groups: the ``GroupRanges`` object shared by the network's MoE layers.
        num_experts: E.
    """

    def __init__(
        self, normalize: nn.Module | None, router: Router, network: nn.Module, groups: GroupRanges, num_experts: int
    ):
        super().__init__(normalize, router)
        self.network = network
        self.groups = groups
        self.num_experts = num_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, num_classes) for images x (B, C, H, W) in [0, 1]."""
        x, choice = self.normalize_and_route(x)
        capturing = x.is_cuda and torch.cuda.is_current_stream_capturing()
        if capturing or torch.compiler.is_compiling() or torch.jit.is_tracing():
            # No host read of the counts allowed: every expert on the whole batch, each sample keeps its own.
            self.groups.choice = choice
            try:
                return self.network(x)
            finally:
                self.groups.choice = None
        self.groups.choice = None
        counts = torch.bincount(choice, minlength=self.num_experts).tolist()  # the one host sync per forward
        if x.shape[0] == 0 or max(counts) == x.shape[0]:
            self.groups.counts = counts
            return self.network(x)  # one expert has the whole batch (always so at B = 1): no permutation
        order = torch.argsort(choice, stable=True)
        self.groups.counts = counts
        logits = self.network(gather_rows(x, order))
        return torch.empty_like(logits).index_copy_(0, order, logits)
