"""Pooling of convolutional feature maps (B,h,w,C) into global descriptors (B,C).

Each registry entry is a factory `build(cfg) -> pool` so the pooling's own parameters (GeM's p, R-MAC's
levels) come from the BackboneConfig; `describe(cfg)` names those parameters for feature-cache keys.
Note that GeM clamps at `eps`, as published: on maps with negative values (the linear bottleneck outputs
of MobileNet-style stages) it only sees the positive part.
"""

from __future__ import annotations

import math
from typing import Callable

import jax
import jax.numpy as jnp

from cbir_jax.core.registry import Registry
from cbir_jax.core.vectors import l2_normalise

Pool = Callable[[jax.Array], jax.Array]
POOLINGS: Registry[Callable[..., Pool]] = Registry("pooling")


def gap(x: jax.Array) -> jax.Array:
    """Global average pooling."""
    return jnp.mean(x, axis=(1, 2))


def mac(x: jax.Array) -> jax.Array:
    """Maximum activation of convolutions (global max pooling)."""
    return jnp.max(x, axis=(1, 2))


def gem(x: jax.Array, p: float = 3.0, eps: float = 1e-6) -> jax.Array:
    """Generalised mean (Radenović et al. 2018): p=1 is GAP, p -> inf tends to MAC."""
    return jnp.mean(jnp.maximum(x, eps) ** p, axis=(1, 2)) ** (1.0 / p)


def rmac_regions(h: int, w: int, levels: int = 3, overlap: float = 0.4) -> list[tuple[int, int, int, int]]:
    """R-MAC regions (top, left, height, width) as in Tolias et al. 2016 / cirtorch.

    Square regions of side 2*min(h,w)/(l+1) at levels l=1..L, spread uniformly with about 40% overlap;
    the long side gets extra regions chosen so the overlap is closest to `overlap`. The whole map is the
    first region.
    """
    short = min(h, w)
    regions = [(0, 0, h, w)]
    extra_w = extra_h = 0
    if h != w:
        best, best_err = 0, math.inf
        for i, steps in enumerate(range(2, 8)):  # candidate region counts along the long side
            b = (max(h, w) - short) / (steps - 1)
            err = abs((short**2 - short * b) / short**2 - overlap)
            if err < best_err:
                best, best_err = i, err
        extra_w, extra_h = (best + 1, 0) if h < w else (0, best + 1)

    def centres(size: int, wl: int, wl2: int, n: int) -> list[int]:
        b = 0.0 if n == 1 else (size - wl) / (n - 1)
        return [int(math.floor(wl2 + i * b)) - wl2 for i in range(n)]

    for level in range(1, levels + 1):
        wl = int(math.floor(2 * short / (level + 1)))
        if wl == 0:
            continue
        wl2 = int(math.floor(wl / 2 - 1))
        for top in centres(h, wl, wl2, level + extra_h):
            for left in centres(w, wl, wl2, level + extra_w):
                regions.append((top, left, wl, wl))
    return regions


def rmac(x: jax.Array, levels: int = 3) -> jax.Array:
    """Regional MAC: the L2-normalised max over each R-MAC region, summed over regions."""
    total = jnp.zeros((x.shape[0], x.shape[-1]), x.dtype)
    for top, left, rh, rw in rmac_regions(x.shape[1], x.shape[2], levels):
        v = jnp.max(x[:, top : top + rh, left : left + rw, :], axis=(1, 2))
        total = total + l2_normalise(v)
    return total


@POOLINGS.register("gap")
def _build_gap(cfg) -> Pool:
    return gap


@POOLINGS.register("mac")
def _build_mac(cfg) -> Pool:
    return mac


@POOLINGS.register("gem")
def _build_gem(cfg) -> Pool:
    p = float(cfg.gem_p)
    return lambda x: gem(x, p)


@POOLINGS.register("rmac")
def _build_rmac(cfg) -> Pool:
    levels = int(cfg.rmac_levels)
    return lambda x: rmac(x, levels)


def build_pooling(cfg) -> Pool:
    """The pooling named by `cfg.pooling` (a BackboneConfig), with its parameters bound."""
    return POOLINGS.get(cfg.pooling)(cfg)


def describe(cfg) -> str:
    """A short name of the pooling and the parameters that change its output, for fingerprints."""
    POOLINGS.get(cfg.pooling)  # fail early on unknown names
    if cfg.pooling == "gem":
        return f"gem{float(cfg.gem_p):g}"
    if cfg.pooling == "rmac":
        return f"rmac{int(cfg.rmac_levels)}"
    return str(cfg.pooling)
