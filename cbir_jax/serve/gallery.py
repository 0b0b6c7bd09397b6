"""The search page's engine: a gallery prepared once at start, then ranked per query in milliseconds.

Everything a query needs (post-processed features, each scorer's prepared state, compiled ranking and
backbone functions) is built by `prepare_gallery`; `search_row` and `search_image` only rank. No web
framework is imported here, so the engine is tested and timed on its own.
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

import jax
import jax.numpy as jnp
import numpy as np
from omegaconf import DictConfig
from PIL import Image

from cbir_jax.scoring import heads, ranking, scorers
from cbir_jax.features import postprocess
from cbir_jax.backbones import Backbone
from cbir_jax.core.errors import CheckpointError
from cbir_jax.runs.cli import refuse_overrides, to_typed
from cbir_jax.core.config import Config
from cbir_jax.data import DataError
from cbir_jax.runs.trained import load_trained, trained_scorer
from cbir_jax.scoring.baselines import baseline_scorer
from cbir_jax.features.extract import FeatureSet
from cbir_jax.features.stage import load_stage
from cbir_jax.core.registry import UnknownComponentError

log = logging.getLogger(__name__)
THUMB_SIZE = 192


@dataclasses.dataclass(frozen=True)
class Ranked:
    """One scorer's answer to one query: gallery rows best first, their scores, and the time it took."""

    scorer: str
    rows: np.ndarray
    scores: np.ndarray
    ms: float


@dataclasses.dataclass
class PreparedGallery:
    """The gallery as the page serves it. Rows index `ids`, `features` and `labels` alike."""

    name: str
    ids: list[str]
    labels: Optional[np.ndarray]
    class_names: list[str]
    features: np.ndarray  # (N, D) post-processed, as every scorer sees them
    post: dict[str, Any]  # the post-processing fitted on the gallery, applied to uploads too
    backbone: Backbone
    # name -> (scorer, prepared gallery state, gallery chunk)
    scorers: dict[str, tuple[scorers.Scorer, Any, int]]
    k: int
    load: Callable[[int], np.ndarray]  # row -> uint8 HxWx3
    # One device computation at a time, so the time a scorer shows is its own. Without it, 16 concurrent
    # requests on 2 cores showed 117 ms at p50 for 5 ms of work (Caltech dev, `python -m
    # benchmarks.load_serve -- data=folder data.root=...`); end-to-end latency was the same either way.
    device: threading.Lock = dataclasses.field(default_factory=threading.Lock)

    def __len__(self) -> int:
        return len(self.ids)

    def label_name(self, row: int) -> Optional[str]:
        if self.labels is None or not self.class_names or self.labels[row] < 0:  # -1: an unlabelled index row
            return None
        return self.class_names[int(self.labels[row])]


def _named_scorers(cfg: Config) -> dict[str, scorers.Scorer]:
    """`serve.scorers` by name; a typo fails before any feature is loaded."""
    named = {}
    for name in cfg.serve.scorers:
        try:
            named[name] = baseline_scorer(name)
        except UnknownComponentError as e:  # its message names eval.baselines, where evaluate reads them
            raise UnknownComponentError(str(e).replace("eval.baselines", "serve.scorers")) from None
    return named


def _gallery_scorers(now: Config, cfg_dict: DictConfig, overridden: frozenset[str]):
    """(config, stage, scorers): the checkpoint's head first when one is given, then `serve.scorers`.

    The named scorers are built first, so a typo fails before any features are loaded.
    """
    named = _named_scorers(now)
    chosen: dict[str, scorers.Scorer] = {}
    cfg = now
    if cfg.checkpoint:
        run = Path(cfg.checkpoint)
        cfg, info = load_trained(run, cfg_dict, overridden)
        cfg = dataclasses.replace(cfg, serve=now.serve)  # the page's settings are today's, never the run's
        stage = load_stage(cfg, split_by="none")
        chosen[cfg.head.name] = trained_scorer(cfg, run, info, stage)
    else:
        if "head" in overridden and heads.is_learned(cfg.head.name):
            raise CheckpointError(f"head={cfg.head.name} is learned: pass checkpoint=RUN_DIR (or serve.scorers=[...])")
        if not named:
            raise DataError("serve.scorers is empty and no checkpoint was given: nothing to rank with")
        stage = load_stage(cfg, split_by="none")
    for name, scorer in named.items():
        chosen.setdefault(name, scorer)
    return cfg, stage, chosen


def rows_inside_root(cfg: Config, fs: FeatureSet) -> np.ndarray:
    """Rows whose file really lies inside `data.root`: a symlink out of the root is never served.

    Only the folder source reads files by path; other sources (embedded, tfds) keep every row.
    """
    if cfg.data.name != "folder":
        return np.arange(len(fs))
    return _inside(cfg.data.root, fs.ids)


def _inside(root: str, relative_paths: list[str]) -> np.ndarray:
    root_dir = Path(os.path.expanduser(root)).resolve()
    inside = [r for r, rel in enumerate(relative_paths) if (root_dir / rel).resolve().is_relative_to(root_dir)]
    if len(inside) < len(relative_paths):
        log.warning("not served: %d files that resolve outside %s (symlinks)", len(relative_paths) - len(inside), root)
    return np.asarray(inside, np.int64)


def prepare_gallery(cfg_dict: DictConfig, overridden: frozenset[str] = frozenset()) -> PreparedGallery:
    """Loads features and scorers, prepares every scorer's gallery state and compiles the query path."""
    now = to_typed(cfg_dict)
    if now.index:
        return prepare_index_gallery(now, overridden)
    cfg, stage, chosen = _gallery_scorers(now, cfg_dict, overridden)
    fs = stage.features
    keep = rows_inside_root(cfg, fs)
    if len(keep) == 0:
        raise DataError(f"data.root={cfg.data.root}: no image lies inside the root")
    raw = fs.features[keep]
    post = postprocess.fit(cfg.features, raw)
    labels = fs.labels
    dataset_rows = fs.keep[keep]
    return _assemble(
        cfg, chosen, name=fs.dataset.name, ids=[fs.ids[r] for r in keep], labels=None if labels is None else labels[keep],
        class_names=list(fs.dataset.class_names), features=postprocess.apply(post, raw), post=post,
        backbone=stage.backbone, load=lambda row: fs.dataset.load(int(dataset_rows[row])),
    )


def prepare_index_gallery(cfg: Config, overridden: frozenset[str] = frozenset()) -> PreparedGallery:
    """The page over a saved index (`python -m cbir_jax.index`): its features, post-processing and scorer
    (first), then `serve.scorers` on the same features. No gallery feature is computed again."""
    from cbir_jax.api.index import Index  # the page is an entry point: it may use the API

    refuse_overrides(cfg.index, overridden)
    named = _named_scorers(cfg)
    index = Index.load(cfg.index)
    chosen = {index.scorer_name: index.scorer, **{n: s for n, s in named.items() if n != index.scorer_name}}
    keep = _inside(index.root, index.paths)
    if len(keep) == 0:
        raise DataError(f"index={cfg.index}: no image lies inside its folder {index.root}")
    labels = index.labels
    return _assemble(
        cfg, chosen, name=f"index {Path(cfg.index).name}", ids=[index.paths[r] for r in keep],
        labels=None if labels is None else labels[keep], class_names=list(index.class_names),
        features=index.gallery()[keep], post=index.post, backbone=index.backbone,
        load=lambda row: index.image(int(keep[row])),
    )


def _assemble(cfg: Config, chosen: dict[str, scorers.Scorer], *, features: np.ndarray, **fields: Any) -> PreparedGallery:
    """Prepares every scorer's gallery state on the post-processed `features` and compiles the query path."""
    features = np.asarray(features, np.float32)
    device_gallery = jax.device_put(features)
    prepared = {}
    for name, scorer in chosen.items():
        chunk = cfg.eval.gallery_chunk if scorer.chunkable else len(features)
        prepared[name] = (scorer, scorer.prepare(device_gallery), chunk)
    gallery = PreparedGallery(features=features, scorers=prepared, k=max(1, min(cfg.k, len(features))), **fields)
    warm_up(gallery)
    return gallery


def warm_up(gallery: PreparedGallery) -> None:
    """Compiles the backbone (batch of one) and every scorer's ranking, so the first query is fast too."""
    search_row(gallery, 0)
    size = gallery.backbone.image_size
    query_feature(gallery, np.zeros((size, size, 3), np.uint8))


def query_feature(gallery: PreparedGallery, image: np.ndarray) -> np.ndarray:
    """An image's feature (1, D), post-processed as the gallery's: one backbone forward pass."""
    backbone = gallery.backbone
    x = jnp.asarray(backbone.preprocess(image)[None])
    with gallery.device:
        raw = np.asarray(backbone.forward(x))
    return np.asarray(postprocess.apply(gallery.post, raw), np.float32)


def rank(gallery: PreparedGallery, query: np.ndarray, self_row: int = -1) -> list[Ranked]:
    """Every scorer's top-k for one query feature (1, D); `self_row` (a gallery query) is left out."""
    q = jnp.asarray(query)
    self_index = jnp.asarray([self_row], jnp.int32)
    out = []
    for name, (scorer, state, chunk) in gallery.scorers.items():
        with gallery.device:
            start = time.perf_counter()
            s, i = ranking.top_k(scorer, state, q, k=gallery.k, chunk=chunk, self_index=self_index, exclude_self=True)
            s, i = np.asarray(s)[0], np.asarray(i)[0]  # waits for the device
            ms = (time.perf_counter() - start) * 1e3
        valid = i >= 0
        out.append(Ranked(scorer=name, rows=i[valid], scores=s[valid], ms=ms))
    return out


def search_row(gallery: PreparedGallery, row: int) -> list[Ranked]:
    """Ranks the gallery for one of its own images (which is left out of its results)."""
    return rank(gallery, gallery.features[row : row + 1], self_row=row)


def search_image(gallery: PreparedGallery, image: np.ndarray) -> list[Ranked]:
    """Ranks the gallery for an image from outside it (an upload)."""
    return rank(gallery, query_feature(gallery, image))


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
