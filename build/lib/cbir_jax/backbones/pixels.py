"""`backbone=pixels`: resized raw pixels, the no-learning baseline every feature must beat."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from cbir_jax.backbones.base import BACKBONES, Backbone
from cbir_jax.data.imageops import RESIZERS


@BACKBONES.register("pixels")
def build(cfg, cache_dir: str | None = None) -> Backbone:
    del cache_dir  # no weights
    size = int(cfg.image_size)
    resize = RESIZERS[cfg.resize]

    def preprocess(image: np.ndarray) -> np.ndarray:
        return resize(image, size).astype(np.float32) / 255.0

    @jax.jit
    def forward(batch: jax.Array) -> jax.Array:
        return jnp.reshape(batch, (batch.shape[0], -1))

    return Backbone(
        name="pixels",
        image_size=size,
        feature_dim=size * size * 3,
        preprocess=preprocess,
        forward=forward,
        fingerprint=f"pixels-{size}-{cfg.resize}",
    )
