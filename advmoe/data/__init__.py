"""Datasets without torchvision: ``build_dataset(name, root, split, **kwargs)``.

Every dataset yields ``(x (C, H, W) float32 in [0, 1], y int64)``. ``digits`` (scikit-learn, embedded)
and ``synthetic`` need no files; ``cifar10``, ``cifar100``, ``tinyimagenet`` and ``imagenet`` read their
standard layouts from disk and never download (a missing folder says what to fetch and where to put it).
Augmentation (random crop, flip) runs on batches: ``advmoe.train.data.augment_batch``.
"""

from advmoe.data import cifar, digits, imagenet, synthetic, tinyimagenet  # noqa: F401  (register the datasets)
from advmoe.data.base import FileImageDataset, TensorImageDataset
from advmoe.data.registry import (
    DatasetInfo,
    build_dataset,
    dataset_info,
    default_root,
    list_datasets,
    register_dataset,
)

__all__ = [
    "DatasetInfo",
    "FileImageDataset",
    "TensorImageDataset",
    "build_dataset",
    "dataset_info",
    "default_root",
    "list_datasets",
    "register_dataset",
]
