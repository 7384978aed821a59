"""scikit-learn's handwritten digits (embedded, no download): the default dataset for demos and tests.

1797 grayscale 8x8 images of the digits 0-9 (values 0..16), scaled to [0, 1], resized bilinearly to
``size`` x ``size`` (default 32, a CIFAR-sized input) and replicated to ``channels`` channels (default 3,
so CIFAR models run unchanged). The train/test split is a fixed, seeded, stratified 80/20 split.
"""

from __future__ import annotations

from functools import lru_cache

import torch
import torch.nn.functional as F

from advmoe.data.base import TensorImageDataset
from advmoe.data.registry import DatasetInfo, check_int, register_dataset

__all__ = ["digits_dataset", "digits_info"]

TEST_FRACTION = 0.2


def _check(size: int, channels: int, seed: int) -> None:
    check_int(size, "size", 1)
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels!r}")
    check_int(seed, "seed", 0)


@lru_cache(maxsize=8)
def _load(size: int, seed: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(images (N, 1, size, size) float32 in [0, 1], labels (N,), test mask (N,) bool)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    images = torch.as_tensor(data.images, dtype=torch.float32).div_(16.0).unsqueeze(1)  # (N, 1, 8, 8)
    if size != 8:
        images = F.interpolate(images, size=(size, size), mode="bilinear", align_corners=False)
    images = images.clamp_(0.0, 1.0)
    labels = torch.as_tensor(data.target, dtype=torch.long)
    idx = list(range(len(labels)))
    _, test_idx = train_test_split(idx, test_size=TEST_FRACTION, stratify=data.target, random_state=seed)
    test = torch.zeros(len(labels), dtype=torch.bool)
    test[torch.as_tensor(sorted(test_idx))] = True
    return images, labels, test


def digits_dataset(root=None, split: str = "train", size: int = 32, channels: int = 3, seed: int = 0):
    """The digits dataset.

    Args:
        root: ignored (the data ships with scikit-learn).
        split: ``"train"`` (1437 images) or ``"test"`` (360 images).
        size: output side in pixels (8 = the original resolution).
        channels: 1 (grayscale) or 3 (gray replicated to RGB).
        seed: seed of the stratified split (0 everywhere in advmoe).

    Returns:
        TensorImageDataset of ``(x (channels, size, size) float32 in [0, 1], y int64 in [0, 10))``.
    """
    _check(size, channels, seed)
    images, labels, test = _load(size, seed)
    keep = test if split == "test" else ~test
    x = images[keep]
    if channels == 3:
        x = x.expand(-1, 3, -1, -1)
    return TensorImageDataset(x.contiguous(), labels[keep], classes=[str(i) for i in range(10)])


@lru_cache(maxsize=8)
def _stats(size: int, seed: int) -> tuple[float, float]:
    images, _, test = _load(size, seed)
    train = images[~test]
    return float(train.mean()), float(train.std())


def digits_info(size: int = 32, channels: int = 3, seed: int = 0) -> DatasetInfo:
    """Digits facts; mean/std are those of the training split at this size (computed once, cached)."""
    _check(size, channels, seed)
    mean, std = _stats(size, seed)
    return DatasetInfo(10, channels, size, (mean,) * channels, (std,) * channels)


register_dataset("digits", digits_dataset, digits_info)
