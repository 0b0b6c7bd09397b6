"""`data=embedded` (the default): real photos shipped inside the scikit-image wheel, each expanded into
a group of augmented views. Relevance = same source photo. Needs no download and no folder, so the main
job runs on any fresh machine; deterministic given `data.seed`.
"""

from __future__ import annotations

import io

import numpy as np
from PIL import Image, ImageEnhance

from cbir_jax.data.base import DATASETS, ImageDataset, hash_strings, to_rgb_uint8

# Photos bundled in the scikit-image wheel (none of these triggers a download).
PHOTOS = (
    "astronaut", "brick", "camera", "cat", "coffee", "coins", "grass", "gravel", "horse",
    "hubble_deep_field", "immunohistochemistry", "logo", "microaneurysms", "moon", "page", "retina",
    "rocket", "text", "clock", "cell", "motorcycle",
)
VIEW_SIZE = 224
_VERSION = "v2"  # bump when the augmentation changes, so cached features are not reused


def _load_photo(name: str) -> np.ndarray:
    import skimage.data as skdata

    if name == "clock":
        image = skdata.clock()
    elif name == "motorcycle":
        image = skdata.stereo_motorcycle()[0]
    elif name == "horse":
        image = (~skdata.horse()).astype(np.uint8) * 255
    else:
        image = getattr(skdata, name)()
    return to_rgb_uint8(Image.fromarray(np.asarray(image)))


def augment(image: np.ndarray, rng: np.random.Generator, size: int = VIEW_SIZE) -> np.ndarray:
    """One random view: resized crop, flip, rotation, colour jitter, JPEG re-compression."""
    h, w = image.shape[:2]
    for _ in range(10):
        area = rng.uniform(0.08, 0.6) * h * w  # mostly parts of the photo: retrieval must generalise
        aspect = np.exp(rng.uniform(np.log(3 / 4), np.log(4 / 3)))
        ch, cw = int(round(np.sqrt(area / aspect))), int(round(np.sqrt(area * aspect)))
        if ch <= h and cw <= w:
            break
    else:
        ch, cw = min(h, w), min(h, w)
    top, left = rng.integers(0, h - ch + 1), rng.integers(0, w - cw + 1)
    view = Image.fromarray(image[top : top + ch, left : left + cw]).resize((size, size), Image.Resampling.BILINEAR)
    if rng.random() < 0.5:
        view = view.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    view = view.rotate(rng.uniform(-25, 25), resample=Image.Resampling.BILINEAR, fillcolor=(128, 128, 128))
    view = ImageEnhance.Brightness(view).enhance(rng.uniform(0.6, 1.4))
    view = ImageEnhance.Contrast(view).enhance(rng.uniform(0.6, 1.4))
    view = ImageEnhance.Color(view).enhance(rng.uniform(0.0, 1.6) if rng.random() < 0.2 else rng.uniform(0.6, 1.4))
    buffer = io.BytesIO()
    view.save(buffer, format="JPEG", quality=int(rng.integers(40, 96)))
    buffer.seek(0)
    return np.asarray(Image.open(buffer).convert("RGB"))


@DATASETS.register("embedded")
def build(cfg) -> ImageDataset:
    views = int(cfg.views_per_image)
    photos = PHOTOS
    if cfg.max_per_class:  # classes are photos: the cap applies to views per photo
        views = min(views, int(cfg.max_per_class))
    sources = [_load_photo(name) for name in photos]
    images, ids, labels = [], [], []
    for c, (name, source) in enumerate(zip(photos, sources)):
        for v in range(views):
            rng = np.random.default_rng([cfg.seed, c, v])
            images.append(augment(source, rng))
            ids.append(f"{name}/view_{v:02d}")
            labels.append(c)
    return ImageDataset(
        name="embedded",
        ids=ids,
        load=lambda i: images[i],
        labels=np.asarray(labels, np.int32),
        class_names=list(photos),
        content_key=hash_strings("embedded", _VERSION, str(cfg.seed), str(views), *photos),
    )
