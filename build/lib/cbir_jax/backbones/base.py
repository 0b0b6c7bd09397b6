"""What every backbone provides: host-side preprocessing and a jitted batched forward pass."""

from __future__ import annotations

import dataclasses
import functools
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cbir_jax.core.registry import Registry, UnknownComponentError


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


def build_backbone(cfg, cache_dir: str | None = None) -> Backbone:
    """Builds the backbone named by `cfg.name` (a BackboneConfig); converted weights are cached in `cache_dir`
    (the config's `cache_dir`; None: its default)."""
    return BACKBONES.get(cfg.name)(cfg, cache_dir=cache_dir)


def cnn_backbone(
    cfg,
    *,
    name: str,
    module: Callable[..., nn.Module],
    layers: dict[str, int],
    default_layer: str,
    params: dict,
    weights_sha: str,
    preprocess: Callable[..., np.ndarray],
    normalisation: str,
) -> Backbone:
    """Wraps a pretrained Flax CNN (`module(output=layer)`) and its converted params as a Backbone.

    The forward pass runs the CNN up to `cfg.layer`, then the configured pooling, under one jit.
    """
    from cbir_jax.data.imageops import RESIZERS
    from cbir_jax.backbones.pooling import build_pooling, describe

    layer = cfg.layer or default_layer
    if layer not in layers:
        raise UnknownComponentError(f"{name} has no layer {layer!r}; valid: {', '.join(layers)}")
    size, resize_name = int(cfg.image_size), str(cfg.resize)
    if resize_name not in RESIZERS:
        raise UnknownComponentError(f"unknown backbone.resize {resize_name!r}; valid: {', '.join(RESIZERS)}")
    dtype = jnp.dtype(cfg.dtype)
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), params)
    pool = build_pooling(cfg)
    net = module(output=layer)

    @jax.jit
    def _forward(params: dict, batch: jax.Array) -> jax.Array:
        fmap = net.apply({"params": params}, batch.astype(dtype))
        return pool(fmap.astype(jnp.float32))

    return Backbone(
        name=name,
        image_size=size,
        feature_dim=layers[layer],
        preprocess=functools.partial(preprocess, size=size, resize=resize_name),
        forward=functools.partial(_forward, params),
        fingerprint=f"{name}-{weights_sha}-{layer}-{describe(cfg)}-{size}-{resize_name}-{dtype.name}-{normalisation}",
    )
