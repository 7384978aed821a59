"""A synthetic, learnable image dataset for benchmarks and smoke tests (no files, any size).

Each class has a smooth random prototype (a 4x4 pattern upsampled bilinearly); sample i is its class
prototype plus Gaussian noise, clipped to [0, 1]. Samples are generated on access from a generator seeded
by (seed, split, i), so the dataset is deterministic, costs no memory and can be as large as wanted.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from advmoe.data.registry import DatasetInfo, check_int, register_dataset

__all__ = ["SyntheticDataset"]

NOISE_STD = 0.15


class SyntheticDataset(Dataset):
    """Deterministic synthetic images.

    Args:
        num_samples: dataset length.
        num_classes: labels in [0, num_classes).
        image_size: side of the square images.
        channels: image channels.
        seed: seed of the prototypes and samples.
        split_offset: mixed into each sample's seed (train and test differ).
    """

    def __init__(
        self, num_samples: int, num_classes: int, image_size: int, channels: int, seed: int, split_offset: int
    ) -> None:
        self.num_samples = check_int(num_samples, "num_samples", 0)
        self.num_classes = check_int(num_classes, "num_classes", 1)
        self.image_size = check_int(image_size, "image_size", 1)
        self.channels = check_int(channels, "channels", 1)
        self.seed = check_int(seed, "seed", 0)
        self.split_offset = split_offset
        gen = torch.Generator().manual_seed(self.seed)
        coarse = torch.rand(num_classes, channels, 4, 4, generator=gen)
        self.prototypes = F.interpolate(coarse, size=(image_size, image_size), mode="bilinear", align_corners=False)
        self.targets = torch.arange(num_samples, dtype=torch.long) % num_classes

    def __len__(self) -> int:
        return self.num_samples

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not -self.num_samples <= index < self.num_samples:
            raise IndexError(f"index {index} out of range for a dataset of {self.num_samples}")
        index %= self.num_samples
        gen = torch.Generator().manual_seed(self.seed * 1_000_003 + self.split_offset * 7_919 + index)
        y = self.targets[index]
        noise = torch.randn(self.prototypes.shape[1:], generator=gen) * NOISE_STD
        return (self.prototypes[y] + noise).clamp_(0.0, 1.0), y


def synthetic_dataset(
    root=None,
    split: str = "train",
    num_samples: int | None = None,
    num_classes: int = 10,
    size: int = 32,
    channels: int = 3,
    seed: int = 0,
) -> SyntheticDataset:
    """The synthetic dataset.

    Args:
        root: ignored.
        split: ``"train"`` or ``"test"`` (different samples, same prototypes).
        num_samples: length (None: 1024 for train, 256 for test).
        num_classes: number of classes.
        size: image side.
        channels: image channels.
        seed: seed.

    Returns:
        SyntheticDataset of ``(x (channels, size, size) float32 in [0, 1], y int64)``.
    """
    if num_samples is None:
        num_samples = 1024 if split == "train" else 256
    return SyntheticDataset(num_samples, num_classes, size, channels, seed, 0 if split == "train" else 1)


def _info(num_samples: int | None = None, num_classes: int = 10, size: int = 32, channels: int = 3, seed: int = 0):
    check_int(num_classes, "num_classes", 1)
    check_int(size, "size", 1)
    check_int(channels, "channels", 1)
    return DatasetInfo(num_classes, channels, size, (0.5,) * channels, (0.25,) * channels)


register_dataset("synthetic", synthetic_dataset, _info)
