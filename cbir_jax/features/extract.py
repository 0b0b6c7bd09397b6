"""Feature extraction as its own cached stage: sweeps over labels and heads never re-run the CNN.

One pass decodes each image once and yields the backbone feature and a small thumbnail (what the
image heuristics SSIM and dHash are computed on). Undecodable images are skipped, named and counted.
Only decode failures are stored with the cache: a file that could not be *read* (permissions, I/O) is
retried on the next run, and the cache is rebuilt once it reads (a passing problem never becomes permanent).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from pathlib import Path
from typing import Callable, Iterable, Iterator, Optional

import jax.numpy as jnp
import numpy as np

from cbir_jax.core.progress import progress
from cbir_jax.core import cache
from cbir_jax.backbones import Backbone
from cbir_jax.data import DataError, ImageDataset, ImageLoadError, ImageReadError
from cbir_jax.data.imageops import resize_square

log = logging.getLogger(__name__)
_CACHE_VERSION = "2"  # 2: EXIF orientation applied; header, hash and key inside the file


@dataclasses.dataclass
class FeatureSet:
    """Features of the decodable images of a dataset; `keep` maps rows back to dataset indices.

    Class labels are read from the dataset only when asked for, so a run that never needs them
    (self-supervised training) never touches them.
    """

    dataset: ImageDataset
    keep: np.ndarray
    features: np.ndarray  # (N, D) float32, as the backbone produced them
    thumbnails: np.ndarray  # (N, S, S, 3) uint8
    skipped: list[tuple[str, str]]

    @property
    def ids(self) -> list[str]:
        return [self.dataset.ids[i] for i in self.keep]

    @property
    def labels(self) -> Optional[np.ndarray]:
        labels = self.dataset.labels
        return None if labels is None else np.asarray(labels)[self.keep]

    def __len__(self) -> int:
        return len(self.keep)

    def image(self, row: int, size: int = 128) -> np.ndarray:
        """Row's image, reloaded and squashed to size x size (for figures)."""
        return resize_square(self.dataset.load(int(self.keep[row])), size)


def cache_key(dataset: ImageDataset, backbone: Backbone, thumb_size: int) -> str:
    """What a feature cache file was built from; stored inside the file and checked on load."""
    return f"{_CACHE_VERSION}|{dataset.name}|{dataset.content_key}|{backbone.fingerprint}|{thumb_size}"


def cache_path(cache_dir: str, dataset: ImageDataset, backbone: Backbone, thumb_size: int) -> Path:
    key = hashlib.sha256(cache_key(dataset, backbone, thumb_size).encode()).hexdigest()[:24]
    return Path(os.path.expanduser(cache_dir)) / "features" / f"{backbone.name}-{key}.npz"


def forward_batches(backbone: Backbone, images: Iterable[np.ndarray], batch_size: int) -> np.ndarray:
    """Backbone features (N, D) float32 of uint8 HxWx3 images, `batch_size` at a time.

    `images` may be a generator (a folder is decoded as it is read, never held whole in memory). Every batch
    is padded to `batch_size` rows, so the jitted forward pass compiles for one shape only.
    """
    feats: list[np.ndarray] = []
    batch: list[np.ndarray] = []

    def flush() -> None:
        if not batch:
            return
        n = len(batch)
        x = np.stack(batch + [batch[-1]] * (batch_size - n))  # fixed shape: one compilation
        feats.append(np.asarray(backbone.forward(jnp.asarray(x)))[:n])
        batch.clear()

    for image in images:
        batch.append(backbone.preprocess(image))
        if len(batch) == batch_size:
            flush()
    flush()
    return np.concatenate(feats).astype(np.float32) if feats else np.zeros((0, backbone.feature_dim), np.float32)


def _extract(dataset: ImageDataset, backbone: Backbone, thumb_size: int, batch_size: int) -> dict[str, np.ndarray]:
    thumbs, keep, skipped, unread = [], [], [], []

    def decoded() -> Iterator[np.ndarray]:
        for i in progress(range(len(dataset)), desc=f"features ({backbone.name})", unit="img", mininterval=2.0):
            try:
                image = dataset.load(i)
            except ImageLoadError as e:
                log.warning("skipped %s: %s", dataset.ids[i], e)
                (unread if isinstance(e, ImageReadError) else skipped).append((dataset.ids[i], str(e)))
                continue
            keep.append(i)
            thumbs.append(resize_square(image, thumb_size))
            yield image

    features = forward_batches(backbone, decoded(), batch_size)
    thumbnails = np.stack(thumbs) if thumbs else np.zeros((0, thumb_size, thumb_size, 3), np.uint8)
    return {
        "keep": np.asarray(keep, np.int64), "features": features, "thumbnails": thumbnails,
        "skipped": np.asarray(skipped, dtype=str).reshape(-1, 2),  # decode failures: permanent
        "unread": np.asarray(unread, dtype=str).reshape(-1, 2),  # read errors: retried next time
    }


def _still_unreadable(dataset: ImageDataset) -> Callable[[dict[str, np.ndarray]], bool]:
    """A cache is out of date once one of the files it could not read reads now."""
    index = {image_id: i for i, image_id in enumerate(dataset.ids)}

    def check(arrays: dict[str, np.ndarray]) -> bool:
        for image_id, _ in arrays["unread"].tolist():
            try:
                dataset.load(index[image_id])
            except ImageReadError:
                continue
            except ImageLoadError:
                pass
            log.info("features: %s reads now; rebuilding the cache", image_id)
            return False
        return True

    return check


def extract_features(
    dataset: ImageDataset,
    backbone: Backbone,
    *,
    thumb_size: int,
    cache_dir: str,
    batch_size: int = 32,
    use_cache: bool = True,
) -> FeatureSet:
    """Features and thumbnails for every decodable image, from the cache when it holds them."""
    extracted = []

    def build() -> dict[str, np.ndarray]:
        extracted.append(True)
        return _extract(dataset, backbone, thumb_size, batch_size)

    if use_cache:
        path = cache_path(cache_dir, dataset, backbone, thumb_size)
        arrays = cache.cached(path, cache_key(dataset, backbone, thumb_size), build,
                              still_valid=_still_unreadable(dataset))
    else:
        arrays = build()
    skipped = [tuple(s) for s in arrays["skipped"].tolist() + arrays["unread"].tolist()]
    if use_cache and not extracted:
        log.info("features: %d images from cache %s", len(arrays["keep"]), path)
        for image_id, reason in skipped:
            log.warning("skipped %s: %s", image_id, reason)
    skipped = list(dataset.skipped) + skipped
    if skipped:
        log.warning("skipped %d of %d files or class folders (unreadable, empty or not images)", len(skipped), len(dataset) + len(dataset.skipped))
    keep = arrays["keep"]
    if len(keep) == 0:
        raise DataError(f"{dataset.name}: none of the {len(dataset)} files could be read as an image")
    return FeatureSet(dataset=dataset, keep=keep, features=arrays["features"], thumbnails=arrays["thumbnails"],
                      skipped=skipped)
