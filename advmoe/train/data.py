"""Deterministic, resumable, shardable batching for training and evaluation.

Epoch ``e`` visits the samples in the order ``randperm(n, seed=(seed, e))``: the order depends only on
the seed and the epoch, never on what ran before, so a run resumed in the middle of an epoch replays the
exact remaining batches. Under ``torchrun`` the permutation is padded (by wrapping) to a multiple of the
world size and rank ``r`` takes every ``world``-th index, like ``torch.utils.data.DistributedSampler``;
every rank gets the same number of batches. Augmentation (random crop with zero padding, horizontal
flip) runs on whole batches with a generator seeded per step.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset, Sampler

__all__ = ["EpochBatchSampler", "augment_batch", "eval_batches", "mix_seed", "train_loader"]


def mix_seed(*parts: int) -> int:
    """A 63-bit seed from several integers (splitmix-style mixing), e.g. ``(seed, epoch, step, rank)``."""
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & 0xFFFFFFFFFFFFFFFF)) * 0xBF58476D1CE4E5B9 & 0xFFFFFFFFFFFFFFFF
        h ^= h >> 31
    return h & 0x7FFFFFFFFFFFFFFF


class EpochBatchSampler(Sampler[list[int]]):
    """Batches of dataset indices for one epoch of one rank, optionally skipping the first batches.

    Args:
        num_samples: dataset length n.
        batch_size: per-rank batch size.
        seed: run seed.
        epoch: epoch number (selects the permutation).
        rank: this process's rank.
        world_size: number of processes.
        shuffle: permute (training) or keep order (evaluation).
        drop_last: drop the last incomplete batch (training; avoids size-1 batch-norm batches).
        start_batch: number of batches of this epoch already done (mid-epoch resume).
    """

    def __init__(
        self,
        num_samples: int,
        batch_size: int,
        seed: int = 0,
        epoch: int = 0,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        drop_last: bool = True,
        start_batch: int = 0,
    ) -> None:
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
        if shuffle:
            gen = torch.Generator().manual_seed(mix_seed(seed, epoch))
            order = torch.randperm(num_samples, generator=gen)
        else:
            order = torch.arange(num_samples)
        if shuffle and num_samples % world_size:  # pad by wrapping so every rank has the same count
            pad = world_size - num_samples % world_size
            order = torch.cat([order, order[:pad]])
        own = order[rank::world_size].tolist()
        if drop_last and len(own) >= batch_size:
            own = own[: len(own) // batch_size * batch_size]
        self.batches = [own[i : i + batch_size] for i in range(0, len(own), batch_size)]
        if not 0 <= start_batch <= len(self.batches):
            raise ValueError(f"start_batch must be in [0, {len(self.batches)}], got {start_batch}")
        self.start_batch = start_batch

    @property
    def num_batches(self) -> int:
        """Batches in the whole epoch (including skipped ones)."""
        return len(self.batches)

    def __iter__(self) -> Iterator[list[int]]:
        return iter(self.batches[self.start_batch :])

    def __len__(self) -> int:
        return len(self.batches) - self.start_batch


def train_loader(dataset: Dataset, sampler: EpochBatchSampler, num_workers: int = 0) -> DataLoader:
    """DataLoader over the batches of ``sampler`` (default collate: (B, C, H, W) float, (B,) int64)."""
    return DataLoader(dataset, batch_sampler=sampler, num_workers=num_workers)


def eval_batches(
    dataset: Dataset,
    batch_size: int,
    max_samples: int | None = None,
    rank: int = 0,
    world_size: int = 1,
    num_workers: int = 0,
) -> DataLoader:
    """Loader over the first ``max_samples`` samples in order, sharded by rank (no padding, no repeats)."""
    n = len(dataset) if max_samples is None else min(len(dataset), max_samples)
    own = list(range(rank, n, world_size))
    batches = [own[i : i + batch_size] for i in range(0, len(own), batch_size)]
    return DataLoader(dataset, batch_sampler=batches, num_workers=num_workers)


def augment_batch(x: torch.Tensor, padding: int, flip: bool, generator: torch.Generator | None = None) -> torch.Tensor:
    """Random crop with zero padding and random horizontal flip, per sample, on a whole batch.

    Args:
        x: (B, C, H, W) images.
        padding: pixels of zero padding on each side before cropping back to (H, W) (0: no crop).
        flip: flip each image left-right with probability 1/2.
        generator: CPU generator for the random offsets and flips.

    Returns:
        (B, C, H, W) augmented images (a new tensor).
    """
    if x.dim() != 4:
        raise ValueError(f"x must be (B, C, H, W), got shape {tuple(x.shape)}")
    b, _, h, w = x.shape
    if b == 0:
        return x.clone()
    out = x
    if padding > 0:
        padded = F.pad(x, (padding, padding, padding, padding))
        oy = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
        ox = torch.randint(0, 2 * padding + 1, (b,), generator=generator).to(x.device)
        rows = (oy[:, None] + torch.arange(h, device=x.device))[:, :, None]  # (B, H, 1)
        cols = (ox[:, None] + torch.arange(w, device=x.device))[:, None, :]  # (B, 1, W)
        bidx = torch.arange(b, device=x.device)[:, None, None]
        out = padded.permute(0, 2, 3, 1)[bidx, rows, cols].permute(0, 3, 1, 2).contiguous()  # (B, C, H, W)
    if flip:
        do_flip = (torch.rand(b, generator=generator) < 0.5).to(x.device)
        out = torch.where(do_flip[:, None, None, None], out.flip(3), out)
    return out if out is not x else x.clone()
