"""The search page's engine: an `Index` prepared once at start, then ranked per query in milliseconds.

Everything a query needs (post-processed features, each scorer's prepared state, compiled ranking and
backbone functions) is the index's, made ready by `prepare_gallery`; `search_row` and `search_image` only
rank and time. No web framework is imported here, so the engine is tested and timed on its own.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
from omegaconf import DictConfig
from PIL import Image

from cbir_jax.api.index import Index, from_command_line
from cbir_jax.core.errors import UserError
from cbir_jax.data import DataError
from cbir_jax.runs.cli import to_typed

log = logging.getLogger(__name__)
THUMB_SIZE = 192
MAX_K = 100  # per request: each new k compiles the ranking once, so the choice is bounded

# One line per scorer under its column: scores are on each scorer's own scale and compare within a column only.
SCORE_MEANINGS = {
    "cosine": "cosine similarity of the features: 1 is the same direction, 0 unrelated",
    "euclid": "minus the Euclidean distance of the features: 0 is identical, more negative is farther",
    "ssim": "structural similarity (SSIM) of the feature vectors: 1 is identical",
    "ssim_ratio": "feature SSIM divided by the Euclidean distance: higher is closer",
    "alpha_qe": "cosine to the query averaged with its nearest neighbours (α-QE): 1 is the same direction",
    "dba_alpha_qe": "cosine after query and database expansion: scores crowd near 1, the order is what counts",
    "diffusion": "relevance spread over the gallery's neighbour graph: relative within a query, not a similarity",
    "k_reciprocal": "minus a mix of k-reciprocal Jaccard distance and 1 - cosine: 0 is closest, the order is what counts",
}


class SearchError(UserError):
    """A search request the page refuses (k out of range, an unknown scorer); its message is one line."""


def score_meaning(name: str) -> str:
    """What a scorer's numbers mean, for the line under its column (a learned head: its own scale)."""
    return SCORE_MEANINGS.get(name, f"the learned scorer {name}'s output: higher is more similar; its scale is its own")


def check_request(gallery: "PreparedGallery", k: Optional[int], scorers: Optional[list[str]]) -> tuple[int, list[str]]:
    """A request's k (default: the page's) and scorers (default: all, in the gallery's order), validated:
    k in 1..min(MAX_K, gallery size), scorers among those prepared at start (none is added per request)."""
    limit = min(MAX_K, len(gallery))
    k = gallery.k if k is None else k
    if not 1 <= k <= limit:
        raise SearchError(f"k={k}: must be between 1 and {limit}")
    chosen = list(gallery.scorers) if not scorers else list(dict.fromkeys(scorers))
    unknown = [s for s in chosen if s not in gallery.scorers]
    if unknown:
        raise SearchError(f"unknown scorer {unknown[0]!r}; this page has: {', '.join(gallery.scorers)}")
    return k, chosen


@dataclasses.dataclass(frozen=True)
class Ranked:
    """One scorer's answer to one query: gallery rows best first, their scores, and the time it took."""

    scorer: str
    rows: np.ndarray
    scores: np.ndarray
    ms: float


@dataclasses.dataclass
class PreparedGallery:
    """The gallery as the page serves it: an `Index` (features, post-processing, scorers and their prepared
    states), rows whose files lie inside its root, and the page's k. Rows index `ids` and `labels` alike."""

    name: str
    index: Index
    k: int
    # One device computation at a time, so the time a scorer shows is its own. Without it, 16 concurrent
    # requests on 2 cores showed 117 ms at p50 for 5 ms of work (Caltech dev, `python -m
    # benchmarks.load_serve -- data=folder data.root=...`); end-to-end latency was the same either way.
    device: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def __len__(self) -> int:
        return len(self.index)

    @property
    def ids(self) -> list[str]:
        return self.index.paths

    @property
    def labels(self) -> Optional[np.ndarray]:
        return self.index.labels

    @property
    def class_names(self) -> list[str]:
        return self.index.class_names

    @property
    def scorers(self) -> dict[str, Any]:
        return self.index.scorers

    @property
    def features(self) -> np.ndarray:
        """(N, D) post-processed, as every scorer sees them."""
        return self.index.gallery()

    @property
    def backbone(self):
        return self.index.backbone

    def load(self, row: int) -> np.ndarray:
        return self.index.image(row)

    def label_name(self, row: int) -> Optional[str]:
        if self.labels is None or not self.class_names or self.labels[row] < 0:  # -1: an unlabelled index row
            return None
        return self.class_names[int(self.labels[row])]


def prepare_gallery(cfg_dict: DictConfig, overridden: frozenset[str] = frozenset()) -> PreparedGallery:
    """The index the command line names (`index=FILE`, or `data` with `checkpoint=RUN`'s head first), ranked
    by it and `serve.scorers`; every scorer's state prepared and the query path compiled before the first
    request. Files that resolve outside the gallery's root (symlinks) are never served."""
    now = to_typed(cfg_dict)
    cfg, index = from_command_line(cfg_dict, overridden, also=now.serve.scorers, head=False)
    if index.root:
        keep = _inside(index.root, index.paths)
        if len(keep) == 0:
            raise DataError(f"{'index=' + cfg.index if cfg.index else 'data.root=' + str(cfg.data.root)}: "
                            f"no image lies inside {index.root}")
        if len(keep) < len(index):
            index = index.subset(keep)
    name = f"index {Path(cfg.index).name}" if cfg.index else index.name
    gallery = PreparedGallery(name=name, index=index, k=max(1, min(cfg.k, len(index), MAX_K)))
    warm_up(gallery)
    return gallery


def _inside(root: str, relative_paths: list[str]) -> np.ndarray:
    root_dir = Path(os.path.expanduser(root)).resolve()
    inside = [r for r, rel in enumerate(relative_paths) if (root_dir / rel).resolve().is_relative_to(root_dir)]
    if len(inside) < len(relative_paths):
        log.warning("not served: %d files that resolve outside %s (symlinks)", len(relative_paths) - len(inside), root)
    return np.asarray(inside, np.int64)


def warm_up(gallery: PreparedGallery) -> None:
    """Prepares every scorer and compiles the backbone (batch of one) and every ranking, so the first query is
    fast too."""
    search_row(gallery, 0)
    size = gallery.backbone.image_size
    query_feature(gallery, np.zeros((size, size, 3), np.uint8))


def query_feature(gallery: PreparedGallery, image: np.ndarray) -> np.ndarray:
    """An image's feature (1, D), post-processed as the gallery's: one backbone forward pass."""
    with gallery.device:
        return np.asarray(gallery.index.embed([image]), np.float32)


def rank(gallery: PreparedGallery, query: np.ndarray, self_row: int = -1, k: Optional[int] = None,
         scorers: Optional[list[str]] = None) -> list[Ranked]:
    """Each chosen scorer's top-k for one query feature (1, D); `self_row` (a gallery query) is left out.
    `k` and `scorers` default to the page's; `check_request` validates them."""
    k, names = check_request(gallery, k, scorers)
    out = []
    for name in names:
        with gallery.device:
            start = time.perf_counter()
            s, i = gallery.index.rank(query, k, scorer=name, exclude=np.asarray([self_row]))
            ms = (time.perf_counter() - start) * 1e3
        s, i = s[0], i[0]
        valid = i >= 0
        out.append(Ranked(scorer=name, rows=i[valid], scores=s[valid], ms=ms))
    return out


def search_row(gallery: PreparedGallery, row: int, k: Optional[int] = None,
               scorers: Optional[list[str]] = None) -> list[Ranked]:
    """Ranks the gallery for one of its own images (which is left out of its results)."""
    return rank(gallery, gallery.index.rows([row]), self_row=row, k=k, scorers=scorers)  # one row: nothing loaded


def search_image(gallery: PreparedGallery, image: np.ndarray, k: Optional[int] = None,
                 scorers: Optional[list[str]] = None) -> list[Ranked]:
    """Ranks the gallery for an image from outside it (an upload)."""
    check_request(gallery, k, scorers)  # before the backbone runs
    return rank(gallery, query_feature(gallery, image), k=k, scorers=scorers)


def encode_jpeg(image: np.ndarray, max_side: Optional[int] = None) -> bytes:
    """JPEG bytes of a uint8 image, shrunk (aspect kept) so its longer side is at most `max_side`."""
    pil = Image.fromarray(image)
    if max_side is not None:
        pil.thumbnail((max_side, max_side), Image.Resampling.BILINEAR)
    buf = io.BytesIO()
    pil.save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def image_encoder(gallery: PreparedGallery, cache_size: int = 4096) -> Callable[[int, bool], bytes]:
    """row, full -> JPEG bytes; thumbnails are cached (the page shows the same ones again and again)."""

    @functools.lru_cache(maxsize=cache_size)
    def thumb(row: int) -> bytes:
        return encode_jpeg(gallery.load(row), THUMB_SIZE)

    def encode(row: int, full: bool) -> bytes:
        return encode_jpeg(gallery.load(row)) if full else thumb(row)

    return encode
