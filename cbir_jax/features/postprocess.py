"""Feature post-processing fitted on the gallery itself (unsupervised): L2, PCA, PCA-whitening.

The order is the one retrieval papers use: L2-normalise, centre and project (optionally whitening),
L2-normalise again.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cbir_jax.core.config import Whiten
from cbir_jax.core.vectors import ArrayT, l2_normalise



def fit(cfg, gallery: np.ndarray) -> dict[str, Any]:
    """Fits the post-processing named by a FeaturesConfig on gallery features (N, D)."""
    if cfg.whiten == "none":  # nothing to fit: the gallery is not read (it may be a million rows on disk)
        return {"l2": bool(cfg.l2_normalize)}
    x = np.asarray(gallery).astype(np.float64)
    if cfg.l2_normalize:
        x = l2_normalise(x)
    Whiten(cfg.whiten)  # a direct caller's bad value fails here; a composed config cannot hold one
    mean = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    dim = min(cfg.whiten_dim or vt.shape[0], vt.shape[0])
    projection = vt[:dim].T
    if cfg.whiten == "pca_whiten":
        eigval = s[:dim] ** 2 / max(len(x) - 1, 1)
        projection = projection / np.sqrt(eigval + 1e-6 * eigval.max())
    return {"l2": bool(cfg.l2_normalize), "mean": mean.astype(np.float32), "projection": projection.astype(np.float32)}


def apply(params: dict[str, Any], x: ArrayT) -> ArrayT:
    """The fitted post-processing of rows (N, D): numpy in, numpy out; JAX in, JAX out (so a streamed
    gallery chunk is post-processed inside the jitted scan, in the pass that scores it)."""
    xp = jnp if isinstance(x, jax.Array) else np
    x = xp.asarray(x, xp.float32)
    if params["l2"]:
        x = l2_normalise(x)
    if "projection" in params:
        x = (x - params["mean"]) @ params["projection"]
        if params["l2"]:
            x = l2_normalise(x)
    return x.astype(xp.float32) if xp is jnp else x.astype(np.float32, copy=False)
