"""``RoutedOnce``: the base of the deployed forms that route a whole batch once with a model-level router."""

from __future__ import annotations

import torch
from torch import nn

from advmoe.nn import Router


class RoutedOnce(nn.Module):
    """Normalises the input and picks each sample's expert (= pathway, top-1) with the model-level router.

    ``PathwayMoE`` and ``GroupedMoE`` derive from it and differ only in how they run the chosen experts.

    Args:
        normalize: the input normalisation module, or None.
        router: the model-level router, (B, C, H, W) normalised images -> (B, E) scores.
    """

    def __init__(self, normalize: nn.Module | None, router: Router):
        super().__init__()
        self.normalize = normalize
        self.router = router

    def route(self, x: torch.Tensor) -> torch.Tensor:
        """(B,) int64 expert (= pathway) of each sample of the raw input x (B, C, H, W)."""
        return self.normalize_and_route(x)[1]

    def normalize_and_route(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(normalised x (B, C, H, W), (B,) int64 expert of each sample) for images x (B, C, H, W) in [0, 1].

        Raises:
            ValueError: x is not a 4-D tensor.
        """
        if not isinstance(x, torch.Tensor) or x.dim() != 4:
            raise ValueError(f"input must be a (B, C, H, W) image tensor, got {getattr(x, 'shape', type(x))}")
        if self.normalize is not None:
            x = self.normalize(x)
        return x, self.router(x).argmax(dim=1)
