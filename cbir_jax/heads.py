"""Pair heads: every scorer, learned or fixed, maps a (query, gallery) feature pair to a similarity.

Heads broadcast over leading axes: q (..., D) and g (..., D) give (...,). Higher means more similar.
The fixed metrics are heads without parameters, so one evaluation path serves all of them.
"""

from __future__ import annotations

from typing import Callable, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from cbir_jax.heuristics import ssim_vectors
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
    qn = q / jnp.maximum(jnp.linalg.norm(q, axis=-1, keepdims=True), EPS)
    gn = g / jnp.maximum(jnp.linalg.norm(g, axis=-1, keepdims=True), EPS)
    return jnp.sum(qn * gn, axis=-1)


def feature_ssim(q: jax.Array, g: jax.Array) -> jax.Array:
    """Global SSIM between two feature vectors seen as 1-D signals (heuristics.ssim_vectors).

    The data range L is the pair's joint range, so the score is invariant to a common scale of both
    vectors; floored at EPS so constant vectors give a number, not NaN.
    """
    q, g = jnp.broadcast_arrays(q, g)
    span = jnp.maximum(q.max(-1), g.max(-1)) - jnp.minimum(q.min(-1), g.min(-1))
    return ssim_vectors(q, g, data_range=jnp.maximum(span, EPS))


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


# --- Heads that start *at* cosine and learn a residual (issue 5) -------------------------------------


class ResidualProjection(nn.Module):
    """e(x) = x + B(A x) with B zero-initialised: the identity map at initialisation."""

    rank: int = 128

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), EPS)
        h = nn.Dense(self.rank, use_bias=False, name="down")(x)
        return x + nn.Dense(x.shape[-1], use_bias=False, kernel_init=nn.initializers.zeros, name="up")(h)


class CosineResidual(nn.Module):
    """cos(e(q), e(g)) with e a `ResidualProjection`: equals cosine at initialisation (see above)."""

    rank: int = 128
    rerank: str = "none"

    def setup(self):
        self.projection = ResidualProjection(self.rank)

    def embed(self, x: jax.Array) -> jax.Array:
        return self.projection(x)

    def __call__(self, q: jax.Array, g: jax.Array) -> jax.Array:
        return cosine_similarity(self.embed(q), self.embed(g))


@HEADS.register("cosine_residual")
def _cosine_residual(cfg) -> nn.Module:
    rerank = getattr(cfg, "rerank", "none")
    from cbir_jax import rerank as rerank_lib  # registers this head's fast forms (embed the gallery once)

    if rerank != "none":
        rerank_lib.RERANKERS.get(rerank)  # an unknown name fails here, listing the valid ones
    return CosineResidual(rank=getattr(cfg, "rank", 128), rerank=rerank)
