"""ImageNet-1k (ILSVRC-2012) from an ImageFolder-style layout (Pillow, no torchvision).

Layout::

    <root>/imagenet/train/<wnid>/*.JPEG      1000 class folders
    <root>/imagenet/val/<wnid>/*.JPEG        the 50000 val images sorted into the same class folders

``root`` may also be the ``imagenet`` folder itself. Label y is the index of the wnid in sorted order of
the train folders. Preprocessing is deterministic (augmentation runs later on batches): the training
split resizes the shorter side to ``size`` and crops the centre; the test split resizes the shorter side
to ``resize_to`` (default ``size * 256 / 224``, the usual 256 for 224) and crops the centre ``size``.
"""

from __future__ import annotations

from pathlib import Path

from advmoe.data.base import FileImageDataset
from advmoe.data.registry import DatasetInfo, check_int, find_folder, missing, register_dataset

__all__ = ["imagenet_dataset"]

URL = "https://image-net.org/download-images.php (ILSVRC2012 train and val archives)"
FOLDER = "imagenet"
MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
EXTENSIONS = (".jpeg", ".jpg", ".png")
_LAYOUT = (
    f"  <root>/{FOLDER}/train/<wnid>/*.JPEG\n  <root>/{FOLDER}/val/<wnid>/*.JPEG   "
    "(sort the val images into class folders, e.g. with the widely used valprep.sh)"
)


def imagenet_dataset(
    root: Path | None = None, split: str = "train", size: int = 224, resize_to: int | None = None
) -> FileImageDataset:
    """ImageNet-1k.

    Args:
        root: folder containing ``imagenet`` (or that folder itself).
        split: ``"train"`` or ``"test"`` (the val images).
        size: output side.
        resize_to: shorter side before the centre crop on the test split (None: ``round(size * 256 / 224)``).

    Returns:
        FileImageDataset of ``(x (3, size, size) float32 in [0, 1], y int64)``.
    """
    check_int(size, "size", 1)
    if resize_to is not None:
        check_int(resize_to, "resize_to", size)
    base = find_folder(root, FOLDER, "train")
    if base is None:
        raise missing("ImageNet", root, FOLDER, URL, _LAYOUT)
    classes = sorted(p.name for p in (base / "train").iterdir() if p.is_dir())
    if not classes:
        raise FileNotFoundError(f"ImageNet: no class folders in {base / 'train'} (expected layout:\n{_LAYOUT})")
    folder = base / ("train" if split == "train" else "val")
    if not folder.is_dir():
        raise FileNotFoundError(f"ImageNet: missing {folder} (expected layout:\n{_LAYOUT})")
    files: list[Path] = []
    targets: list[int] = []
    for y, wnid in enumerate(classes):
        cdir = folder / wnid
        if not cdir.is_dir():
            continue
        for f in sorted(cdir.iterdir()):
            if f.suffix.lower() in EXTENSIONS:
                files.append(f)
                targets.append(y)
    if not files:
        raise FileNotFoundError(f"ImageNet: no images found under {folder} (expected layout:\n{_LAYOUT})")
    test_resize = resize_to if resize_to is not None else round(size * 256 / 224)
    resize = size if split == "train" else test_resize
    return FileImageDataset(files, targets, size=size, resize_to=resize, classes=classes)


def _info(size: int = 224, resize_to: int | None = None) -> DatasetInfo:
    check_int(size, "size", 1)
    return DatasetInfo(1000, 3, size, MEAN, STD)


register_dataset("imagenet", imagenet_dataset, _info)
