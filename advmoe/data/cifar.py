"""CIFAR-10 and CIFAR-100 from the standard python-pickle folders (no torchvision).

Layouts (as extracted from the official archives)::

    <root>/cifar-10-batches-py/{data_batch_1..5, test_batch, batches.meta}
    <root>/cifar-100-python/{train, test, meta}

``root`` may also be the inner folder itself. The pickles are read with an unpickler that only accepts
numpy arrays, lists, dicts and strings, so a tampered file cannot run code.
"""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import torch

from advmoe.data.base import TensorImageDataset
from advmoe.data.registry import DatasetInfo, find_folder, missing, register_dataset

__all__ = ["cifar10_dataset", "cifar100_dataset", "read_cifar_batch"]

CIFAR10_URL = "https://www.cs.toronto.edu/~kriz/cifar-10-python.tar.gz"
CIFAR100_URL = "https://www.cs.toronto.edu/~kriz/cifar-100-python.tar.gz"
CIFAR10_MEAN, CIFAR10_STD = (0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)
CIFAR100_MEAN, CIFAR100_STD = (0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)

_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"),
    ("numpy._core.multiarray", "_reconstruct"),
    ("numpy.core.multiarray", "scalar"),
    ("numpy._core.multiarray", "scalar"),
    ("numpy", "ndarray"),
    ("numpy", "dtype"),
    ("_codecs", "encode"),
}


class _SafeUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        raise pickle.UnpicklingError(f"CIFAR file refers to {module}.{name}, which a CIFAR batch never needs")


def read_cifar_batch(path: Path, label_key: str) -> tuple[np.ndarray, np.ndarray]:
    """Reads one CIFAR pickle batch.

    Args:
        path: batch file.
        label_key: ``"labels"`` (CIFAR-10), ``"fine_labels"`` or ``"coarse_labels"`` (CIFAR-100).

    Returns:
        (images (N, 3, 32, 32) uint8, labels (N,) int64).
    """
    with open(path, "rb") as f:
        d = _SafeUnpickler(f, encoding="bytes").load()
    d = {(k.decode() if isinstance(k, bytes) else k): v for k, v in d.items()}
    if "data" not in d or label_key not in d:
        raise ValueError(f"{path}: not a CIFAR batch with keys 'data' and {label_key!r} (found {sorted(d)})")
    data = np.asarray(d["data"], dtype=np.uint8)
    labels = np.asarray(d[label_key], dtype=np.int64)
    if data.ndim != 2 or data.shape[1] != 3072 or data.shape[0] != labels.shape[0]:
        raise ValueError(f"{path}: expected data (N, 3072) and N labels, got {data.shape} and {labels.shape}")
    return data.reshape(-1, 3, 32, 32), labels


def _build(root, split, folder, files, label_key, url, num_classes, name):
    marker = files["train"][0]
    base = find_folder(root, folder, marker)
    if base is None:
        layout = f"  <root>/{folder}/" + ", ".join(files["train"] + files["test"])
        raise missing(name, root, folder, url, layout)
    parts = [read_cifar_batch(base / f, label_key) for f in files[split]]
    images = torch.from_numpy(np.concatenate([p[0] for p in parts]))
    labels = torch.from_numpy(np.concatenate([p[1] for p in parts]))
    if labels.numel() and (labels.min() < 0 or labels.max() >= num_classes):
        raise ValueError(f"{name} labels outside [0, {num_classes}) in {base}")
    return TensorImageDataset(images, labels)


_C10 = {"train": [f"data_batch_{i}" for i in range(1, 6)], "test": ["test_batch"]}
_C100 = {"train": ["train"], "test": ["test"]}


def cifar10_dataset(root: Path | None = None, split: str = "train") -> TensorImageDataset:
    """CIFAR-10: 50000 train / 10000 test images, 3x32x32, 10 classes."""
    return _build(root, split, "cifar-10-batches-py", _C10, "labels", CIFAR10_URL, 10, "CIFAR-10")


def cifar100_dataset(root: Path | None = None, split: str = "train", label_type: str = "fine") -> TensorImageDataset:
    """CIFAR-100: 50000 train / 10000 test images, 3x32x32; ``label_type`` ``fine`` (100) or ``coarse`` (20)."""
    if label_type not in ("fine", "coarse"):
        raise ValueError(f"label_type must be 'fine' or 'coarse', got {label_type!r}")
    n = 100 if label_type == "fine" else 20
    return _build(root, split, "cifar-100-python", _C100, f"{label_type}_labels", CIFAR100_URL, n, "CIFAR-100")


def _info10() -> DatasetInfo:
    return DatasetInfo(10, 3, 32, CIFAR10_MEAN, CIFAR10_STD)


def _info100(label_type: str = "fine") -> DatasetInfo:
    if label_type not in ("fine", "coarse"):
        raise ValueError(f"label_type must be 'fine' or 'coarse', got {label_type!r}")
    return DatasetInfo(100 if label_type == "fine" else 20, 3, 32, CIFAR100_MEAN, CIFAR100_STD)


register_dataset("cifar10", cifar10_dataset, _info10)
register_dataset("cifar100", cifar100_dataset, _info100)
