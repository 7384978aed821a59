"""Dataset registry: ``build_dataset``, ``dataset_info``, ``list_datasets``.

Every dataset yields ``(x, y)`` with ``x`` a float32 (C, H, W) tensor in [0, 1] and ``y`` an int64
scalar tensor; models hold their own normalisation (``DatasetInfo.mean`` / ``std``), so attacks work in
pixel space. Nothing is downloaded: a missing folder raises ``FileNotFoundError`` that says what to fetch
and where to put it.
"""

from __future__ import annotations

import inspect
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from torch.utils.data import Dataset

__all__ = [
    "DatasetInfo",
    "build_dataset",
    "dataset_info",
    "dataset_splits",
    "default_root",
    "list_datasets",
    "register_dataset",
]

SPLITS = ("train", "val", "test")
DEFAULT_SPLITS = ("train", "test")


@dataclass(frozen=True)
class DatasetInfo:
    """Static facts about a dataset, enough to build a model for it.

    Attributes:
        num_classes: number of labels.
        in_channels: image channels C.
        image_size: side of the (square) images the dataset yields.
        mean: per-channel mean of the training images in [0, 1] (length C), for the model's normalisation.
        std: per-channel standard deviation (length C).
    """

    num_classes: int
    in_channels: int
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]


@dataclass(frozen=True)
class _Entry:
    builder: Callable[..., Dataset]
    info: Callable[..., DatasetInfo]
    splits: tuple[str, ...]


_REGISTRY: dict[str, _Entry] = {}


def register_dataset(
    name: str,
    builder: Callable[..., Dataset],
    info: Callable[..., DatasetInfo],
    splits: tuple[str, ...] = DEFAULT_SPLITS,
) -> None:
    """Registers a dataset.

    Args:
        name: registry name.
        builder: ``builder(root, split, **kwargs) -> Dataset``; ``root`` is a ``Path`` or None.
        info: ``info(**kwargs) -> DatasetInfo`` (same keyword arguments as the builder, no files read).
        splits: the splits the dataset has, from ``("train", "val", "test")`` (a held-out ``val`` split
            only where the dataset defines one).
    """
    if name in _REGISTRY:
        raise ValueError(f"dataset {name!r} is already registered")
    unknown = [s for s in splits if s not in SPLITS]
    if unknown or not splits:
        raise ValueError(f"splits must be a non-empty subset of {list(SPLITS)}, got {splits!r}")
    _REGISTRY[name] = _Entry(builder, info, tuple(splits))


def _check_kwargs(name: str, fn: Callable, kwargs: dict, skip: tuple[str, ...]) -> None:
    """Unknown options raise a TypeError that lists the ones the dataset accepts."""
    params = [p for p in inspect.signature(fn).parameters if p not in skip]
    unknown = sorted(set(kwargs) - set(params))
    if unknown:
        raise TypeError(f"dataset {name!r} got unknown option(s) {unknown}; it accepts {params}")


def _entry(name: str) -> _Entry:
    if not isinstance(name, str) or name not in _REGISTRY:
        raise ValueError(f"unknown dataset {name!r}; known datasets: {list_datasets()}")
    return _REGISTRY[name]


def list_datasets() -> list[str]:
    """Names accepted by :func:`build_dataset`, sorted."""
    return sorted(_REGISTRY)


def default_root() -> Path:
    """Folder searched when ``root`` is None: ``$ADVMOE_DATA`` if set, else ``./data``."""
    return Path(os.environ.get("ADVMOE_DATA", "data"))


def build_dataset(name: str, root: str | os.PathLike | None = None, split: str = "train", **kwargs) -> Dataset:
    """Builds a dataset by name.

    Args:
        name: one of :func:`list_datasets` (``digits`` and ``synthetic`` need no files).
        root: dataset folder (see each dataset's docstring for the layout); None: :func:`default_root`.
        split: ``"train"`` or ``"test"`` (TinyImageNet / ImageNet: ``"test"`` is the labelled val set);
            ``"val"`` for datasets with a held-out validation split (``mnist5k``), see :func:`dataset_splits`.
        **kwargs: dataset options (e.g. ``size`` and ``channels`` for digits).

    Returns:
        A map-style dataset of ``(x (C, H, W) float32 in [0, 1], y int64)``.
    """
    entry = _entry(name)
    _check_kwargs(name, entry.builder, kwargs, ("root", "split"))
    if split not in entry.splits:
        raise ValueError(f"split must be one of {list(entry.splits)} for dataset {name!r}, got {split!r}")
    return entry.builder(None if root is None else Path(root), split, **kwargs)


def dataset_splits(name: str) -> tuple[str, ...]:
    """The splits :func:`build_dataset` accepts for ``name`` (``("train", "test")`` or with ``"val"``)."""
    return _entry(name).splits


def dataset_info(name: str, **kwargs) -> DatasetInfo:
    """Number of classes, channels, image size, mean and std of a dataset (reads no files).

    Args:
        name: one of :func:`list_datasets`.
        **kwargs: the options that change these facts (e.g. ``size``, ``channels``).
    """
    entry = _entry(name)
    _check_kwargs(name, entry.builder, kwargs, ("root", "split"))
    return entry.info(**kwargs)


def find_folder(root: Path | None, folder: str, marker: str) -> Path | None:
    """The dataset folder: ``root`` itself if it contains ``marker``, else ``root/folder`` if that does.

    ``root`` None searches :func:`default_root`. Returns None when neither exists.
    """
    base = default_root() if root is None else Path(root)
    for cand in (base, base / folder):
        if (cand / marker).exists():
            return cand
    return None


def missing(name: str, root: Path | None, folder: str, url: str, layout: str) -> FileNotFoundError:
    """A ``FileNotFoundError`` that says what to download and where to put it."""
    base = default_root() if root is None else Path(root)
    return FileNotFoundError(
        f"{name} not found under {str(base)!r} (looked in {str(base)!r} and {str(base / folder)!r}). "
        f"Download it from {url} and arrange it as\n{layout}\n"
        f"then pass root= the folder that contains {folder!r} (or set $ADVMOE_DATA). advmoe never downloads."
    )


def check_int(value, name: str, minimum: int) -> int:
    """``value`` as an int >= ``minimum``, else a ValueError naming the argument."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value
