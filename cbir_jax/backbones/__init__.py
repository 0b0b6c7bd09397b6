"""Backbones turn images into feature vectors; importing this package registers all of them."""

from cbir_jax.backbones.base import BACKBONES, Backbone, build_backbone
from cbir_jax.backbones import pixels  # noqa: F401  (registers "pixels")
from cbir_jax.backbones import efficientnet_lite  # noqa: F401  (registers "efficientnet_lite0")
from cbir_jax.backbones import resnet  # noqa: F401  (registers "resnet50")
from cbir_jax.backbones import dinov2  # noqa: F401  (registers "dinov2")
from cbir_jax.backbones import clip  # noqa: F401  (registers "clip" and "siglip")

__all__ = ["BACKBONES", "Backbone", "build_backbone"]
