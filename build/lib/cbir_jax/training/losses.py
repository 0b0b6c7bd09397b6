"""Training losses (`loss=`) over a batch of predicted scores and targets in [0, 1]."""

from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from cbir_jax.core.registry import Registry

LOSSES: Registry[Callable[..., jax.Array]] = Registry("loss")


@LOSSES.register("mse")
def mse(pred: jax.Array, target: jax.Array, cfg) -> jax.Array:
    """Regression to the heuristic target (the seed's choice)."""
    return jnp.mean((pred - target) ** 2)


@LOSSES.register("contrastive")
def contrastive(pred: jax.Array, target: jax.Array, cfg) -> jax.Array:
    """Targets above 0.5 are similar pairs pulled to 1; the rest pushed below `margin` (Hadsell-style)."""
    similar = target >= 0.5
    pull = (1.0 - pred) ** 2
    push = jax.nn.relu(pred - cfg.margin) ** 2
    return jnp.mean(jnp.where(similar, pull, push))


@LOSSES.register("ranking")
def ranking(pred: jax.Array, target: jax.Array, cfg) -> jax.Array:
    """Pairwise ranking (RankNet-style) between each pair and the next in the batch: order, not value."""
    dp = pred - jnp.roll(pred, 1)
    dt = target - jnp.roll(target, 1)
    weight = jnp.abs(dt)
    return jnp.sum(weight * jax.nn.softplus(-jnp.sign(dt) * dp / max(cfg.margin, 1e-3))) / (jnp.sum(weight) + 1e-8)


@LOSSES.register("listwise")
def listwise(pred: jax.Array, target: jax.Array, cfg) -> jax.Array:
    """ListNet (Cao et al. 2007): cross-entropy between softmax(target / T) and softmax(pred / T) over each
    query's candidates (the last axis; pairs.per_anchor > 0). Only each query's own order matters, so a
    per-image offset of the query cancels, and the top of the list weighs most."""
    if pred.ndim < 2:
        raise ValueError("loss=listwise needs pairs grouped by anchor: set pairs.per_anchor > 0")
    t = max(cfg.temperature, 1e-6)
    p_target = jax.nn.softmax(target / t, axis=-1)
    return -jnp.mean(jnp.sum(p_target * jax.nn.log_softmax(pred / t, axis=-1), axis=-1))


def get_loss(cfg) -> Callable[[jax.Array, jax.Array], jax.Array]:
    fn = LOSSES.get(cfg.name)
    return lambda pred, target: fn(pred, target, cfg)
