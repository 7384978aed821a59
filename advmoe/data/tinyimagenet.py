"""TinyImageNet-200 from its official folder layout (Pillow, no torchvision).

Layout (as extracted from ``tiny-imagenet-200.zip``)::

    <root>/tiny-imagenet-200/wnids.txt                        200 WordNet ids, one per line
    <root>/tiny-imagenet-200/train/<wnid>/images/*.JPEG       500 images per class, 64x64
    <root>/tiny-imagenet-200/val/images/*.JPEG                10000 images
    <root>/tiny-imagenet-200/val/val_annotations.txt          "<file>\\t<wnid>\\t<bbox...>" per line

Label y is the index of the wnid in sorted order. ``split="test"`` is the labelled val set (the official
test set has no labels). Images are read on access.
"""

from __future__ import annotations

from pathlib import Path

from advmoe.data.base import FileImageDataset
from advmoe.data.registry import DatasetInfo, check_int, find_folder, missing, register_dataset

__all__ = ["tinyimagenet_dataset"]

URL = "http://cs231n.stanford.edu/tiny-imagenet-200.zip"
FOLDER = "tiny-imagenet-200"
MEAN, STD = (0.4802, 0.4481, 0.3975), (0.2770, 0.2691, 0.2821)
_LAYOUT = (
    f"  <root>/{FOLDER}/wnids.txt\n  <root>/{FOLDER}/train/<wnid>/images/*.JPEG\n"
    f"  <root>/{FOLDER}/val/images/*.JPEG\n  <root>/{FOLDER}/val/val_annotations.txt"
)


def tinyimagenet_dataset(root: Path | None = None, split: str = "train", size: int = 64) -> FileImageDataset:
    """TinyImageNet-200.

    Args:
        root: folder containing ``tiny-imagenet-200`` (or that folder itself).
        split: ``"train"`` (100000 images) or ``"test"`` (the 10000 labelled val images).
        size: output side (64 = native; other sizes resize bilinearly).

    Returns:
        FileImageDataset of ``(x (3, size, size) float32 in [0, 1], y int64 in [0, 200))``.
    """
    check_int(size, "size", 1)
    base = find_folder(root, FOLDER, "wnids.txt")
    if base is None:
        raise missing("TinyImageNet", root, FOLDER, URL, _LAYOUT)
    wnids = sorted({line.strip() for line in (base / "wnids.txt").read_text().splitlines() if line.strip()})
    index = {w: i for i, w in enumerate(wnids)}
    files: list[Path] = []
    targets: list[int] = []
    if split == "train":
        for wnid in wnids:
            folder = base / "train" / wnid / "images"
            if not folder.is_dir():
                raise FileNotFoundError(f"TinyImageNet: missing class folder {folder} (expected layout:\n{_LAYOUT})")
            for f in sorted(folder.glob("*.JPEG")):
                files.append(f)
                targets.append(index[wnid])
    else:
        ann = base / "val" / "val_annotations.txt"
        if not ann.exists():
            raise FileNotFoundError(f"TinyImageNet: missing {ann} (expected layout:\n{_LAYOUT})")
        for lineno, line in enumerate(ann.read_text().splitlines(), 1):
            if not line.strip():
                continue
            parts = line.split("\t")
            if len(parts) < 2 or parts[1] not in index:
                raise ValueError(f"{ann}:{lineno}: expected '<file>\\t<wnid>...' with a wnid from wnids.txt")
            files.append(base / "val" / "images" / parts[0])
            targets.append(index[parts[1]])
    return FileImageDataset(files, targets, size=size, classes=wnids)


def _info(size: int = 64) -> DatasetInfo:
    check_int(size, "size", 1)
    return DatasetInfo(200, 3, size, MEAN, STD)


register_dataset("tinyimagenet", tinyimagenet_dataset, _info)
