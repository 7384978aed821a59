"""In-memory image datasets and image-file helpers shared by the dataset modules."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["FileImageDataset", "TensorImageDataset", "load_image"]


class TensorImageDataset(Dataset):
    """Images held in memory.

    Args:
        images: (N, C, H, W) uint8 (0..255) or floating point (already in [0, 1]) images.
        targets: (N,) integer labels.
        classes: class names (optional), ``classes[y]`` names label y.

    Attributes:
        images: the stored images (uint8 kept as uint8: 4x less memory than float32).
        targets: (N,) int64 labels.
    """

    def __init__(self, images: torch.Tensor, targets: torch.Tensor, classes: list[str] | None = None) -> None:
        if images.dim() != 4:
            raise ValueError(f"images must be (N, C, H, W), got shape {tuple(images.shape)}")
        if targets.shape != (images.shape[0],):
            raise ValueError(f"targets must be ({images.shape[0]},), got shape {tuple(targets.shape)}")
        self.images = images if images.dtype == torch.uint8 else images.float()
        self.targets = targets.long()
        self.classes = classes

    def __len__(self) -> int:
        return self.images.shape[0]

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = self.images[index]
        x = img.float().div_(255.0) if img.dtype == torch.uint8 else img.clone()
        return x, self.targets[index]


def load_image(path: Path, size: int | None, resize_to: int | None = None, channels: int = 3) -> torch.Tensor:
    """Reads an image file with Pillow.

    Args:
        path: image file (JPEG, PNG, ...).
        size: side of the square centre crop (None: keep the image as it is, it must already be square
            if images are batched).
        resize_to: first resize so that the shorter side has this length (bilinear, antialiased);
            None: ``size`` (resize to fit, then crop the centre).
        channels: 3 (RGB) or 1 (grayscale).

    Returns:
        (channels, H, W) uint8 tensor.
    """
    from PIL import Image

    with Image.open(path) as im:
        im = im.convert("RGB" if channels == 3 else "L")
        if size is not None:
            short = resize_to if resize_to is not None else size
            w, h = im.size
            if min(w, h) != short:
                scale = short / min(w, h)
                im = im.resize((max(short, round(w * scale)), max(short, round(h * scale))), Image.BILINEAR)
            w, h = im.size
            left, top = (w - size) // 2, (h - size) // 2
            if (w, h) != (size, size):
                im = im.crop((left, top, left + size, top + size))
        arr = np.asarray(im, dtype=np.uint8)
    if arr.ndim == 2:
        arr = arr[:, :, None]
    return torch.from_numpy(arr.copy()).permute(2, 0, 1).contiguous()


class FileImageDataset(Dataset):
    """Images read from files on access (ImageNet-size data does not fit in memory).

    Args:
        files: image paths.
        targets: label of each file.
        size: side of the returned square images.
        resize_to: shorter side after resizing, before the centre crop (None: ``size``).
        classes: class names (``classes[y]`` names label y).
    """

    def __init__(
        self,
        files: list[Path],
        targets: list[int],
        size: int,
        resize_to: int | None = None,
        classes: list[str] | None = None,
    ) -> None:
        if len(files) != len(targets):
            raise ValueError(f"files ({len(files)}) and targets ({len(targets)}) differ in length")
        self.files = list(files)
        self.targets = torch.tensor(targets, dtype=torch.long)
        self.size = size
        self.resize_to = resize_to
        self.classes = classes

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor]:
        img = load_image(self.files[index], self.size, self.resize_to)
        return img.float().div_(255.0), self.targets[index]
