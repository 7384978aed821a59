"""MNIST and Fashion-MNIST from their standard idx files (gzipped or raw), for users who have them.

Files (the official names; each may end in ``.gz``)::

    train-images-idx3-ubyte  train-labels-idx1-ubyte  t10k-images-idx3-ubyte  t10k-labels-idx1-ubyte

searched in ``<root>``, ``<root>/<folder>`` and ``<root>/<folder>/raw`` (torchvision's layout), with
``<folder>`` one of ``mnist``/``MNIST`` or ``fashion_mnist``/``fashion-mnist``/``FashionMNIST``;
``root`` None means ``$ADVMOE_DATA`` (else ``./data``). Never downloads. Images are 1 x 28 x 28 in [0, 1].
"""

from __future__ import annotations

import gzip
from pathlib import Path

import numpy as np
import torch

from advmoe.data.base import TensorImageDataset
from advmoe.data.registry import DatasetInfo, default_root, missing, register_dataset

__all__ = ["IDX_FILES", "fashion_mnist_dataset", "mnist_dataset", "read_idx"]

IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_DTYPE = {0x08: np.uint8}
MNIST_URL = "https://yann.lecun.com/exdb/mnist/ (or a mirror, e.g. https://ossci-datasets.s3.amazonaws.com/mnist/)"
FASHION_URL = "https://github.com/zalandoresearch/fashion-mnist (data/fashion/*.gz)"
FASHION_CLASSES = ["T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt", "Sneaker", "Bag", "Boot"]


def read_idx(path: Path) -> np.ndarray:
    """Reads one idx file (``.gz`` decompressed transparently).

    Args:
        path: the file.

    Returns:
        The array with the file's shape (e.g. (N, 28, 28) images or (N,) labels), dtype uint8.

    Raises:
        ValueError: not an unsigned-byte idx file, or its size does not match its header.
    """
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "rb") as f:
        data = f.read()
    if len(data) < 4 or data[0] != 0 or data[1] != 0:
        raise ValueError(f"{path}: not an idx file (bad magic number)")
    if data[2] not in _DTYPE:
        raise ValueError(f"{path}: idx element type 0x{data[2]:02x} is not unsigned byte (0x08)")
    ndim = data[3]
    header = 4 + 4 * ndim
    if ndim < 1 or len(data) < header:
        raise ValueError(f"{path}: truncated idx header")
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    if len(data) - header != int(np.prod(shape)):
        raise ValueError(
            f"{path}: header says shape {shape} ({int(np.prod(shape))} bytes), file has {len(data) - header}"
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header).reshape(shape).copy()


def _find(base: Path, folders: tuple[str, ...], name: str) -> Path | None:
    for cand in [base] + [base / f for f in folders] + [base / f / "raw" for f in folders]:
        for fname in (name, name + ".gz"):
            if (cand / fname).is_file():
                return cand / fname
    return None


def _build(root, split, folders, name, url, classes) -> TensorImageDataset:
    base = default_root() if root is None else Path(root)
    img_name, lbl_name = IDX_FILES[split]
    img_path, lbl_path = _find(base, folders, img_name), _find(base, folders, lbl_name)
    if img_path is None or lbl_path is None:
        files = ", ".join(f"{n}[.gz]" for pair in IDX_FILES.values() for n in pair)
        raise missing(name, root, folders[0], url, f"  <root>/{folders[0]}/{{{files}}}")
    images, labels = read_idx(img_path), read_idx(lbl_path)
    if images.ndim != 3 or labels.ndim != 1 or images.shape[0] != labels.shape[0]:
        raise ValueError(f"{name}: images {images.shape} and labels {labels.shape} do not match ({img_path})")
    if labels.size and labels.max() >= 10:
        raise ValueError(f"{name}: labels outside [0, 10) in {lbl_path}")
    x = torch.from_numpy(images).unsqueeze(1)
    return TensorImageDataset(x, torch.from_numpy(labels.astype(np.int64)), classes=classes)


def mnist_dataset(root: Path | None = None, split: str = "train") -> TensorImageDataset:
    """MNIST: 60000 train / 10000 test images, 1 x 28 x 28, 10 classes (the idx files, see module doc)."""
    return _build(root, split, ("mnist", "MNIST"), "MNIST", MNIST_URL, [str(i) for i in range(10)])


def fashion_mnist_dataset(root: Path | None = None, split: str = "train") -> TensorImageDataset:
    """Fashion-MNIST: 60000 train / 10000 test images, 1 x 28 x 28, 10 classes (same idx layout as MNIST)."""
    folders = ("fashion_mnist", "fashion-mnist", "FashionMNIST")
    return _build(root, split, folders, "Fashion-MNIST", FASHION_URL, FASHION_CLASSES)


register_dataset("mnist", mnist_dataset, lambda: DatasetInfo(10, 1, 28, (0.1307,), (0.3081,)))
register_dataset("fashion_mnist", fashion_mnist_dataset, lambda: DatasetInfo(10, 1, 28, (0.2860,), (0.3530,)))
