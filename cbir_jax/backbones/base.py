"""What every backbone provides: host-side preprocessing and a jitted batched forward pass."""

from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import numpy as np

from cbir_jax.registry import Registry


@dataclasses.dataclass(frozen=True)
class Backbone:
    """A feature extractor.

    `preprocess` runs on the host per image (uint8 HxWx3 -> float32 SxSx3) so images of any size can be
    batched; `forward` is the jitted device function (B,S,S,3) -> (B,D) that ends in pooling.
    `fingerprint` names everything that changes the output (weights hash, layer, pooling, size), so the
    feature cache is keyed by it.
    """

    name: str
    image_size: int
    feature_dim: int
    preprocess: Callable[[np.ndarray], np.ndarray]
    forward: Callable[[jax.Array], jax.Array]
    fingerprint: str


# Each entry: build(cfg: BackboneConfig) -> Backbone.
BACKBONES: Registry[Callable[..., Backbone]] = Registry("backbone")


def build_backbone(cfg) -> Backbone:
    """Builds the backbone named by `cfg.name` (a BackboneConfig)."""
    return BACKBONES.get(cfg.name)(cfg)
