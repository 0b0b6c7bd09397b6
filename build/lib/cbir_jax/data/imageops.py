"""Host-side image helpers shared by data sources, backbones and labels."""

from __future__ import annotations

import numpy as np
from PIL import Image


def resize_square(image: np.ndarray, size: int, resample: int = Image.Resampling.BILINEAR) -> np.ndarray:
    """Squash-resizes uint8 HxWx3 to size x size (no crop: retrieval keeps the whole picture)."""
    if image.shape[0] == size and image.shape[1] == size:
        return image
    return np.asarray(Image.fromarray(image).resize((size, size), resample))


def center_crop_resize(image: np.ndarray, size: int, crop_fraction: float = 0.875) -> np.ndarray:
    """Resizes the short side to size/crop_fraction, then takes the central size x size crop."""
    h, w = image.shape[:2]
    short = round(size / crop_fraction)
    scale = short / min(h, w)
    nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
    resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.Resampling.BILINEAR))
    top, left = (nh - size) // 2, (nw - size) // 2
    return resized[top : top + size, left : left + size]


RESIZERS = {"squash": resize_square, "center_crop": center_crop_resize}
