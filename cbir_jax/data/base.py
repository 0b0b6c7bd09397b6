"""One interface for every image source: stable ids, a loader, optional class labels."""

from __future__ import annotations

import dataclasses
import hashlib
import io
import logging
import re
from typing import Callable, Optional

import numpy as np
from PIL import Image, ImageOps

from cbir_jax.core.errors import UserError
from cbir_jax.core.registry import Registry

log = logging.getLogger(__name__)


class DataError(UserError, ValueError):
    """A dataset that cannot be used at all (missing folder, no images); its message is one line."""


class ImageLoadError(UserError, ValueError):
    """One image that cannot be decoded; the caller skips it and counts it."""


class ImageReadError(ImageLoadError):
    """One image file that cannot be read (permissions, I/O): may pass, so it is never cached as a skip."""


@dataclasses.dataclass
class ImageDataset:
    """Images addressed by index.

    `labels` holds one class index per image, or is None for an unlabelled collection (searchable, not
    evaluable). `content_key` changes whenever the images do; the feature cache is keyed by it.
    """

    name: str
    ids: list[str]
    load: Callable[[int], np.ndarray]  # index -> uint8 HxWx3
    labels: Optional[np.ndarray]
    class_names: list[str]
    content_key: str
    skipped: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (id, reason)
    # Sources of image files: absolute paths (decode workers get paths, not the dataset) and (size, mtime_ns)
    # as listed, which the feature store compares to find new, changed and deleted files.
    paths: Optional[list[str]] = None
    stats: Optional[list[tuple[int, int]]] = None
    # Names the feature store of this source; None: `content_key` (a source whose images are not files).
    # A folder's is its root, so a grown folder updates its store instead of starting a new one.
    store_key: Optional[str] = None

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def labelled(self) -> bool:
        return self.labels is not None


# Each entry: build(cfg: DataConfig) -> ImageDataset.
DATASETS: Registry[Callable[..., ImageDataset]] = Registry("data source")


def build_dataset(cfg) -> ImageDataset:
    dataset = DATASETS.get(cfg.name)(cfg)
    if len(dataset) == 0:
        raise DataError(f"data={cfg.name}: the dataset is empty (no readable images)")
    return dataset


def to_rgb_uint8(image: Image.Image) -> np.ndarray:
    """Converts any PIL mode (L, LA, P, RGBA, CMYK, I;16, I, F, 1) to uint8 RGB.

    Alpha is composited on white; 16-bit and float images are rescaled from their own value range,
    since their nominal range (0..65535) rarely matches the data. An image without pixels is refused: it
    would rank as an arbitrary top-k.
    """
    if image.width == 0 or image.height == 0:
        raise ImageLoadError(f"an empty image ({image.width}x{image.height} pixels)")
    if image.mode in ("I;16", "I;16B", "I;16L", "I", "F"):
        arr = np.asarray(image, dtype=np.float64)
        lo, hi = float(arr.min()), float(arr.max())
        arr = (arr - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(arr)
        image = Image.fromarray(np.round(arr).astype(np.uint8), mode="L")
    if image.mode == "P":
        image = image.convert("RGBA")
    if image.mode in ("RGBA", "LA", "PA"):
        rgba = image.convert("RGBA")
        background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        image = Image.alpha_composite(background, rgba)
    return np.asarray(image.convert("RGB"), dtype=np.uint8)


def read_file(path: str) -> bytes:
    """The file's bytes; a failure here is a read error (permissions, I/O), not a bad image."""
    try:
        with open(path, "rb") as f:
            return f.read()
    except OSError as e:
        raise ImageReadError(f"cannot read: {e.strerror or e}") from None


def decode_image(data: bytes) -> np.ndarray:
    """Decodes image bytes fully to uint8 RGB, upright (EXIF orientation applied).

    Pillow's parsers report malformed input with many exception types (OSError, SyntaxError, struct.error,
    IndexError, ...); for bytes from a file, every one of them means "not a usable image".
    """
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
            return pil_to_rgb(image)
    except ImageLoadError:
        raise
    except Exception as e:  # noqa: BLE001  (see the docstring)
        message = re.sub(r" ?<_io\.BytesIO object at 0x[0-9a-fA-F]+>", "", f"{type(e).__name__}: {e}")
        raise ImageLoadError(message.splitlines()[0][:200]) from None  # PIL names the in-memory buffer


def pil_to_rgb(image: Image.Image) -> np.ndarray:
    """A decoded PIL image as every source loads one: upright, uint8 RGB."""
    return to_rgb_uint8(_upright(image))


def _upright(image: Image.Image) -> Image.Image:
    """Applies the EXIF orientation (a phone photo is stored sideways); a malformed EXIF block is ignored."""
    try:
        return ImageOps.exif_transpose(image)
    except Exception:  # noqa: BLE001  the pixels decoded fine; only the orientation tag is unusable
        return image


def load_image_file(path: str) -> np.ndarray:
    """Reads and decodes an image file, raising ImageReadError or ImageLoadError with a one-line reason."""
    return decode_image(read_file(path))


def hash_strings(*parts: str) -> str:
    h = hashlib.sha256()
    for p in parts:
        h.update(p.encode())
        h.update(b"\0")
    return h.hexdigest()[:16]
