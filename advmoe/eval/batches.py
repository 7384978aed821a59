"""Batches for evaluation from whatever the user has: tensors, a ``Dataset``, or a loader."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["iter_batches", "model_device"]

Batch = tuple[torch.Tensor, torch.Tensor]


def iter_batches(data: Any, batch_size: int, max_samples: int | None = None) -> tuple[Iterator[Batch], int | None]:
    """Batches of (x (B, C, H, W), y (B,)) from a dataset, a loader, or a pair of tensors.

    Args:
        data: a ``(x, y)`` pair of tensors, a map-style ``Dataset`` of ``(x, y)`` samples (batched here in
            order), or any iterable of ``(x, y)`` batches (e.g. a ``DataLoader``).
        batch_size: batch size used for tensors and datasets.
        max_samples: stop after this many samples (None: all).

    Returns:
        (iterator over batches truncated to ``max_samples``, number of batches if known else None).
    """
    if isinstance(data, tuple | list) and len(data) == 2 and all(isinstance(t, torch.Tensor) for t in data):
        x, y = data
        if x.shape[0] != y.shape[0]:
            raise ValueError(f"data: x has {x.shape[0]} samples but y has {y.shape[0]}")
        n = x.shape[0] if max_samples is None else min(x.shape[0], max_samples)
        batches = [(x[i : i + batch_size], y[i : i + batch_size]) for i in range(0, n, batch_size)]
        return iter(batches), len(batches)
    if isinstance(data, Dataset) and not isinstance(data, torch.utils.data.IterableDataset):
        n = len(data) if max_samples is None else min(len(data), max_samples)
        order = list(range(n))
        index_batches = [order[i : i + batch_size] for i in range(0, n, batch_size)]
        return iter(DataLoader(data, batch_sampler=index_batches)), len(index_batches)
    if not isinstance(data, Iterable):
        raise TypeError(f"data must be (x, y) tensors, a Dataset or an iterable of batches, got {type(data).__name__}")
    total = len(data) if isinstance(data, DataLoader | list | tuple) else None

    def truncated() -> Iterator[Batch]:
        seen = 0
        for x, y in data:
            if max_samples is not None:
                if seen >= max_samples:
                    return
                x, y = x[: max_samples - seen], y[: max_samples - seen]
            seen += x.shape[0]
            yield x, y

    return truncated(), total


def model_device(model: nn.Module) -> torch.device:
    """Device of the model's first parameter (or buffer); CPU for a model with neither."""
    for t in model.parameters():
        return t.device
    for t in model.buffers():
        return t.device
    return torch.device("cpu")
