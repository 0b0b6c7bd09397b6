"""Feature post-processing fitted on the gallery itself (unsupervised): L2, PCA, PCA-whitening.

The order is the one retrieval papers use: L2-normalise, centre and project (optionally whitening),
L2-normalise again.
"""

from __future__ import annotations

from typing import Any

import numpy as np

EPS = 1e-12


def l2_normalize(x: np.ndarray) -> np.ndarray:
    return x / (np.linalg.norm(x, axis=-1, keepdims=True) + EPS)


WHITENINGS = ("none", "pca", "pca_whiten")


def fit(cfg, gallery: np.ndarray) -> dict[str, Any]:
    """Fits the post-processing named by a FeaturesConfig on gallery features (N, D)."""
    x = gallery.astype(np.float64)
    if cfg.l2_normalize:
        x = l2_normalize(x)
    if cfg.whiten == "none":
        return {"l2": bool(cfg.l2_normalize)}
    if cfg.whiten not in WHITENINGS:  # config_checks rejects it at start; a direct caller gets this
        raise ValueError(f"features.whiten={cfg.whiten!r}: valid are {', '.join(WHITENINGS)}")
    mean = x.mean(axis=0)
    _, s, vt = np.linalg.svd(x - mean, full_matrices=False)
    dim = min(cfg.whiten_dim or vt.shape[0], vt.shape[0])
    projection = vt[:dim].T
    if cfg.whiten == "pca_whiten":
        eigval = s[:dim] ** 2 / max(len(x) - 1, 1)
        projection = projection / np.sqrt(eigval + 1e-6 * eigval.max())
    return {"l2": bool(cfg.l2_normalize), "mean": mean.astype(np.float32), "projection": projection.astype(np.float32)}


def apply(params: dict[str, Any], x: np.ndarray) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if params["l2"]:
        x = l2_normalize(x)
    if "projection" in params:
        x = (x - params["mean"]) @ params["projection"]
        if params["l2"]:
            x = l2_normalize(x)
    return x.astype(np.float32)
