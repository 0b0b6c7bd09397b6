"""Pair heads: every scorer, learned or fixed, maps a (query, gallery) feature pair to a similarity.

Heads broadcast over leading axes: q (..., D) and g (..., D) give (...,). Higher means more similar.
The fixed metrics are heads without parameters, so one evaluation path serves all of them.
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cbir_jax.registry import Registry

HEADS: Registry[Callable[..., nn.Module]] = Registry("head")
ACTIVATIONS = {"relu": nn.relu, "gelu": nn.gelu, "silu": nn.silu, "tanh": jnp.tanh}
EPS = 1e-6


class MLP(nn.Module):
    """Hidden layers then one output unit; the trunk shared by the learned heads."""

    hidden: Sequence[int]
    activation: str = "relu"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        act = ACTIVATIONS[self.activation]
        for width in self.hidden:
            x = act(nn.Dense(width)(x))
        return nn.Dense(1)(x)[..., 0]


class SquaredDifferenceMLP(nn.Module):
    """The seed's head: an MLP on (q - g)**2, symmetric in its two inputs by construction."""

    hidden: Sequence[int]
    activation: str = "relu"

    @nn.compact
    def __call__(self, q: jax.Array, g: jax.Array) -> jax.Array:
        return MLP(self.hidden, self.activation, name="mlp")((q - g) ** 2)


class ConcatMLP(nn.Module):
    """SimNet-style head: an MLP on the concatenated pair [q, g] (free to be non-symmetric)."""

    hidden: Sequence[int]
    activation: str = "relu"

    @nn.compact
    def __call__(self, q: jax.Array, g: jax.Array) -> jax.Array:
        q, g = jnp.broadcast_arrays(q, g)
        return MLP(self.hidden, self.activation, name="mlp")(jnp.concatenate([q, g], axis=-1))


def euclidean_distance(q: jax.Array, g: jax.Array) -> jax.Array:
    return jnp.sqrt(jnp.maximum(jnp.sum((q - g) ** 2, axis=-1), 0.0))


def cosine_similarity(q: jax.Array, g: jax.Array) -> jax.Array:
    qn = q / (jnp.linalg.norm(q, axis=-1, keepdims=True) + EPS)
    gn = g / (jnp.linalg.norm(g, axis=-1, keepdims=True) + EPS)
    return jnp.sum(qn * gn, axis=-1)


def feature_ssim(q: jax.Array, g: jax.Array) -> jax.Array:
    """Global SSIM between two feature vectors seen as 1-D signals.

    One window over the whole vector; the data range L is that of the pair, so the score is invariant
    to a common scale of both vectors. C1 = (0.01 L)^2, C2 = (0.03 L)^2 and sample covariance, as skimage.
    """
    q, g = jnp.broadcast_arrays(q, g)
    d = q.shape[-1]
    span = jnp.maximum(jnp.max(jnp.maximum(q, g), -1), 0) - jnp.minimum(jnp.min(jnp.minimum(q, g), -1), 0)
    c1, c2 = (0.01 * span) ** 2 + EPS, (0.03 * span) ** 2 + EPS
    mq, mg = jnp.mean(q, -1), jnp.mean(g, -1)
    qc, gc = q - mq[..., None], g - mg[..., None]
    vq = jnp.sum(qc * qc, -1) / (d - 1)
    vg = jnp.sum(gc * gc, -1) / (d - 1)
    cov = jnp.sum(qc * gc, -1) / (d - 1)
    return ((2 * mq * mg + c1) * (2 * cov + c2)) / ((mq**2 + mg**2 + c1) * (vq + vg + c2))


class FixedMetric(nn.Module):
    """A parameter-free head wrapping a similarity function."""

    fn: Callable[[jax.Array, jax.Array], jax.Array]

    def __call__(self, q: jax.Array, g: jax.Array) -> jax.Array:
        return self.fn(q, g)


def _neg_euclidean(q, g):
    return -euclidean_distance(q, g)


def _ssim_over_euclid(q, g):
    # The seed's heuristic: structural similarity per unit of distance.
    return feature_ssim(q, g) / (euclidean_distance(q, g) + 1e-3)


FIXED_METRICS: dict[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "euclid": _neg_euclidean,
    "cosine": cosine_similarity,
    "ssim": feature_ssim,
    "ssim_ratio": _ssim_over_euclid,
}


@HEADS.register("mlp")
def _mlp(cfg) -> nn.Module:
    return SquaredDifferenceMLP(hidden=tuple(cfg.hidden), activation=cfg.activation)


@HEADS.register("simnet")
def _simnet(cfg) -> nn.Module:
    return ConcatMLP(hidden=tuple(cfg.hidden), activation=cfg.activation)


def _register_fixed(name: str) -> None:
    HEADS.register(name)(lambda cfg=None: FixedMetric(FIXED_METRICS[name]))


for _name in FIXED_METRICS:
    _register_fixed(_name)


def build_head(cfg) -> nn.Module:
    """Builds the head named by `cfg.name` (a HeadConfig)."""
    return HEADS.get(cfg.name)(cfg)


def is_learned(name: str) -> bool:
    return name not in FIXED_METRICS


def init_params(head: nn.Module, feature_dim: int, rng: jax.Array):
    """Initial parameters ({} for fixed metrics)."""
    x = jnp.zeros((1, feature_dim), jnp.float32)
    return head.init(rng, x, x).get("params", {})
