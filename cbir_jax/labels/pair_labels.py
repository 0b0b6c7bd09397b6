"""Pair targets (`labels=`): cheap heuristics that say how similar two images are, no human labels.

Every target is "higher = more similar". Ratio heuristics are heavy-tailed, so targets go through a
monotone `transform` (rank -> quantile in [0, 1] by default) before regression.
Only `class` reads class labels; the others see thumbnails and features alone.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import jax.numpy as jnp
import numpy as np
import scipy.stats

from cbir_jax.labels.dhash import dhash, hamming
from cbir_jax.labels.ssim import ssim_pairs
from cbir_jax.data import DataError
from cbir_jax.core.registry import Registry


@dataclasses.dataclass
class PairContext:
    """What heuristics may look at; `class_labels` is a callable so labels are read only on demand."""

    features: np.ndarray  # (N, D) post-processed features
    thumbnails: np.ndarray  # (N, S, S, 3) uint8
    class_labels: Callable[[], Optional[np.ndarray]]
    cfg: object  # LabelsConfig
    _cache: dict = dataclasses.field(default_factory=dict)

    def images(self) -> np.ndarray:
        if "images" not in self._cache:
            x = self.thumbnails.astype(np.float32)
            if self.cfg.grayscale:  # ITU-R 601 luma, as PIL's "L"
                x = x @ np.array([0.299, 0.587, 0.114], np.float32)
            self._cache["images"] = jnp.asarray(x)
        return self._cache["images"]

    def hashes(self) -> np.ndarray:
        if "hashes" not in self._cache:
            self._cache["hashes"] = dhash(self.thumbnails, hash_size=self.cfg.hash_size)
        return self._cache["hashes"]

    def distance_scale(self) -> float:
        """Median distance of random pairs: makes euclidean distances unit-free."""
        if "scale" not in self._cache:
            rng = np.random.default_rng(0)
            i, j = rng.integers(0, len(self.features), (2, 2048))
            d = np.linalg.norm(self.features[i] - self.features[j], axis=-1)
            self._cache["scale"] = float(np.median(d[i != j])) or 1.0
        return self._cache["scale"]


PAIR_LABELS: Registry[Callable[[PairContext, np.ndarray, np.ndarray], np.ndarray]] = Registry("pair label")


def _ssim(ctx: PairContext, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    images = ctx.images()
    return np.asarray(ssim_pairs(images[i], images[j], win_size=ctx.cfg.ssim_win_size, data_range=255.0))


def _distance(ctx: PairContext, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    return np.linalg.norm(ctx.features[i] - ctx.features[j], axis=-1) / ctx.distance_scale()


@PAIR_LABELS.register("ssim")
def ssim_label(ctx, i, j):
    return _ssim(ctx, i, j)


@PAIR_LABELS.register("euclid")
def euclid_label(ctx, i, j):
    return -_distance(ctx, i, j)


@PAIR_LABELS.register("ssim_ratio")
def ssim_ratio_label(ctx, i, j):
    # The seed's best heuristic: image SSIM per unit of feature distance.
    return _ssim(ctx, i, j) / (_distance(ctx, i, j) + ctx.cfg.eps)


@PAIR_LABELS.register("ssim_dhash")
def ssim_dhash_label(ctx, i, j):
    hashes = ctx.hashes()
    bits = np.asarray(hamming(hashes[i], hashes[j]), np.float32)
    return _ssim(ctx, i, j) / (bits + 1.0)  # +1: identical hashes must not divide by zero


@PAIR_LABELS.register("class")
def class_label(ctx, i, j):
    y = ctx.class_labels()
    if y is None:
        raise DataError("labels=class needs class labels; this dataset has none (use a heuristic label)")
    return (y[i] == y[j]).astype(np.float32)


def transform_targets(name: str, t: np.ndarray, axis: int | None = None) -> np.ndarray:
    """Monotone map of raw targets into a range a regression head can fit; over all targets (`axis=None`)
    or separately along `axis` (per query: each anchor's candidates ranked among themselves)."""
    t = np.asarray(t, np.float64)
    if name == "none":
        return t.astype(np.float32)
    if axis is not None:
        return np.apply_along_axis(lambda row: transform_targets(name, row), axis, t)
    if name == "rank":
        # Average ranks for ties: tied raw targets (e.g. 0/1 labels) must get one target, not an arbitrary order.
        ranks = scipy.stats.rankdata(t.ravel()).reshape(t.shape) - 1.0
        return (ranks / max(t.size - 1, 1)).astype(np.float32)
    if name == "minmax":
        lo, hi = t.min(), t.max()
        return ((t - lo) / (hi - lo) if hi > lo else np.zeros_like(t)).astype(np.float32)
    raise ValueError(f"labels.transform={name!r}: valid are rank, minmax, none")


def pair_targets(ctx: PairContext, i: np.ndarray, j: np.ndarray) -> np.ndarray:
    """Targets of pairs (i, j), any shape. With `labels.per_query` (pairs grouped by anchor, shape (A, M)),
    the transform runs within each anchor's candidates, so only their order for that anchor counts."""
    raw = np.asarray(PAIR_LABELS.get(ctx.cfg.name)(ctx, i.ravel(), j.ravel())).reshape(i.shape)
    per_query = getattr(ctx.cfg, "per_query", False)
    if per_query and i.ndim != 2:
        raise ValueError("labels.per_query=true needs pairs grouped by anchor: set pairs.per_anchor > 0")
    return transform_targets(ctx.cfg.transform, raw, axis=-1 if per_query else None)


# --- Self-supervised pseudo-labels from the neighbourhood structure (labels=rerank) -------------------


def rerank_similarities(features: np.ndarray, reranker: str = "dba_alpha_qe", chunk: int = 256) -> np.ndarray:
    """(N, N) similarity of every pair of rows under a non-learned re-ranker run on the rows themselves,
    each row a leave-one-out query against all the others (cbir_jax/scoring/rerank.py), symmetrised
    (S + S^T) / 2. Reads features only; O(N^2) memory (3,315 rows: 44 MB)."""
    from cbir_jax.scoring import rerank

    scorer = rerank.build_reranker(reranker)
    x = jnp.asarray(features, jnp.float32)
    rows, shared = scorer.prepare(x)
    out = []
    for start in range(0, len(features), chunk):
        q = x[start : start + chunk]
        self_index = jnp.arange(start, start + q.shape[0], dtype=jnp.int32)
        out.append(np.asarray(scorer.score(rows, shared, q, self_index), np.float32))
    s = np.concatenate(out)
    return (s + s.T) / 2


@PAIR_LABELS.register("rerank")
def rerank_label(ctx, i, j):
    """No class labels: the target of pair (i, j) is their similarity under `labels.reranker` (default
    DBA + alpha-QE) computed on the training rows' own features — a pseudo-label from the neighbourhood
    structure that a head whose score is a cosine (cosine_residual) can regress directly (transform none)."""
    if "rerank" not in ctx._cache:
        ctx._cache["rerank"] = rerank_similarities(ctx.features, getattr(ctx.cfg, "reranker", "dba_alpha_qe"))
    return ctx._cache["rerank"][i, j]
