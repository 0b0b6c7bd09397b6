"""Feature extraction as its own cached stage: sweeps over labels and heads never re-run the CNN.

Features live in a sharded on-disk store (cbir_jax/features/store.py) under `cache_dir`, keyed by the data
source and the backbone: a killed extraction resumes, a grown folder extracts only its new files, and
images are decoded by `data.workers` processes while the backbone runs. Undecodable images are skipped,
named and counted; a file that could not be *read* (permissions, I/O, vanished) is retried on the next run.
Thumbnails (what SSIM and dHash labels are computed on) are made only when asked for, only for the rows
asked for, and cached apart from the features.
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np

from cbir_jax.core import cache
from cbir_jax.backbones import Backbone
from cbir_jax.data import DataError, ImageDataset
from cbir_jax.data.imageops import resize_square
from cbir_jax.data.pipeline import auto_workers, decode_stream
from cbir_jax.features.forward import forward_batches  # noqa: F401  (re-exported: search, Index)
from cbir_jax.features.store import FeatureStore, build_store

log = logging.getLogger(__name__)
_STORE_VERSION = "3"  # 3: sharded store (2: one .npz with EXIF orientation applied)


class Thumbnails:
    """Thumbnails of a FeatureSet's rows, made on first use for the rows indexed (`fs.thumbnails[rows]`).

    Only label heuristics on pixels (SSIM, dHash) index it, and only with the rows training samples, so a
    run that never needs them never decodes an image twice. Built sets are cached under `cache_dir` (the
    project's cache rules: checked, healed, locked), apart from the features.
    """

    def __init__(self, dataset: ImageDataset, keep: np.ndarray, size: int, cache_dir: Optional[Path],
                 key: str, workers: Optional[int] = None, timeout_s: float = 60.0) -> None:
        self.dataset, self.keep, self.size = dataset, keep, int(size)
        self.cache_dir, self.key, self.workers, self.timeout_s = cache_dir, key, workers, timeout_s

    @property
    def shape(self) -> tuple[int, int, int, int]:
        return (len(self.keep), self.size, self.size, 3)

    @property
    def dtype(self) -> np.dtype:
        return np.dtype(np.uint8)

    def __len__(self) -> int:
        return len(self.keep)

    def __array__(self, dtype=None, copy=None) -> np.ndarray:
        out = self[np.arange(len(self.keep))]
        return out if dtype is None else out.astype(dtype)

    def __getitem__(self, rows) -> np.ndarray:
        rows = np.arange(len(self.keep))[rows]
        scalar = rows.ndim == 0
        rows = np.atleast_1d(rows)
        if self.cache_dir is None or len(rows) == 0:
            out = self._build(rows)["thumbnails"]
        else:
            digest = hashlib.sha256(rows.astype(np.int64).tobytes()).hexdigest()[:16]
            key = f"{self.key}|{self.size}|{digest}"
            path = self.cache_dir / f"thumbs-{self.size}-{digest}.npz"
            out = cache.cached(path, key, lambda: self._build(rows))["thumbnails"]
        return out[0] if scalar else out

    def _build(self, rows: np.ndarray) -> dict[str, np.ndarray]:
        out = np.zeros((len(rows), self.size, self.size, 3), np.uint8)
        indices = self.keep[rows]
        stream = decode_stream(indices, lambda image: resize_square(image, self.size), load=self.dataset.load,
                               paths=self.dataset.paths, workers=auto_workers(len(rows), self.workers),
                               timeout_s=self.timeout_s)
        for d in stream:
            if d.error:  # decoded when its features were extracted, not now: named, and left black
                log.warning("thumbnail of %s: %s (left black)", self.dataset.ids[d.index], d.error)
            else:
                out[d.position] = d.array
        return {"thumbnails": out}


@dataclasses.dataclass
class FeatureSet:
    """Features of the decodable images of a dataset; `keep` maps rows back to dataset indices.

    Class labels are read from the dataset only when asked for, so a run that never needs them
    (self-supervised training) never touches them.
    """

    dataset: ImageDataset
    keep: np.ndarray
    features: np.ndarray  # (N, D) float32, as the backbone produced them (through features.storage)
    thumbnails: Thumbnails | np.ndarray  # (N, S, S, 3) uint8, made for the rows indexed
    skipped: list[tuple[str, str]]
    store: Optional[FeatureStore] = None  # the on-disk store the features were read from (chunked readers)

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


def store_path(cache_dir: str, dataset: ImageDataset, backbone: Backbone, storage: str) -> Path:
    """Where the feature store of `dataset` under `backbone` lives inside `cache_dir`."""
    source = dataset.store_key or dataset.content_key
    key = hashlib.sha256(f"{_STORE_VERSION}|{dataset.name}|{source}|{backbone.fingerprint}|{storage}".encode())
    return Path(os.path.expanduser(cache_dir)) / "features" / f"{backbone.name}-{key.hexdigest()[:24]}"


def extract_features(
    dataset: ImageDataset,
    backbone: Backbone,
    *,
    thumb_size: int,
    cache_dir: str,
    batch_size: int = 32,
    use_cache: bool = True,
    storage: str = "float32",
    shard_rows: int = 4096,
    workers: Optional[int] = None,
    decode_timeout_s: float = 60.0,
    store: Optional[str] = None,
    progress: bool = True,
) -> FeatureSet:
    """Features of every decodable image, rows in dataset order, from the store (extracting what it lacks).

    `store`: a store folder to use instead of the one under `cache_dir`; `use_cache=False`: a throw-away
    store in a temporary folder (nothing is kept).
    """
    tmp = None
    if store is not None:
        path = Path(os.path.expanduser(store))
    elif use_cache:
        path = store_path(cache_dir, dataset, backbone, storage)
    else:
        tmp = tempfile.mkdtemp(prefix="cbir_jax-features-")
        path = Path(tmp)
    try:
        try:
            report = build_store(path, dataset, backbone, storage=storage, shard_rows=shard_rows,
                                 batch_size=batch_size, workers=workers, decode_timeout_s=decode_timeout_s,
                                 progress=progress)
        except OSError as e:
            if e.errno not in cache._UNWRITABLE or tmp is not None:
                raise
            log.warning("feature store %s is not writable (%s): features are not cached", path, e.strerror)
            return extract_features(dataset, backbone, thumb_size=thumb_size, cache_dir=cache_dir,
                                    batch_size=batch_size, use_cache=False, storage=storage, shard_rows=shard_rows,
                                    workers=workers, decode_timeout_s=decode_timeout_s, progress=progress)
        fs_store = FeatureStore.open(path, fingerprint=backbone.fingerprint)
        position = {image_id: i for i, image_id in enumerate(dataset.ids)}
        rows = np.asarray([position[i] for i in fs_store.ids], np.int64)
        order = np.argsort(rows, kind="stable")
        features = fs_store.features()[order]
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)
    keep = rows[order]
    skipped = list(dataset.skipped) + list(report.skipped)
    if skipped:
        log.warning("skipped %d of %d files or class folders (unreadable, empty or not images)", len(skipped),
                    len(dataset) + len(dataset.skipped))
    if len(keep) == 0:
        raise DataError(f"{dataset.name}: none of the {len(dataset)} files could be read as an image")
    thumbs_dir = None if tmp is not None else path / "thumbnails"
    rows_key = hashlib.sha256(keep.tobytes()).hexdigest()[:16]  # with content_key: which images the rows are
    thumbnails = Thumbnails(dataset, keep, thumb_size, thumbs_dir, key=f"{dataset.content_key}|{rows_key}",
                            workers=workers, timeout_s=decode_timeout_s)
    return FeatureSet(dataset=dataset, keep=keep, features=features, thumbnails=thumbnails, skipped=skipped,
                      store=None if tmp is not None else fs_store)
