"""Pair sampling: easy pairs (uniformly random) mixed with difficult ones (feature-space neighbours)."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

from cbir_jax.scoring import ranking
from cbir_jax.labels import pair_labels
from cbir_jax.scoring.scorers import fixed_scorer


def neighbours(features: np.ndarray, k: int) -> np.ndarray:
    """(N, k) cosine nearest neighbours of every row, itself excluded."""
    scorer = fixed_scorer("cosine")
    x = jnp.asarray(features)
    return np.asarray(ranking.gallery_neighbours(scorer, scorer.prepare(x), x, k)[1])


def sample_pairs(
    rng: np.random.Generator, n: int, num_pairs: int, hard_fraction: float, nbrs: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Row indices (i, j), i != j: a `hard_fraction` share with j among i's neighbours, the rest random."""
    n_hard = int(round(hard_fraction * num_pairs)) if nbrs is not None else 0
    i = rng.integers(0, n, num_pairs)
    j = (i + rng.integers(1, n, num_pairs)) % n  # uniform over the other rows
    if n_hard:
        j[:n_hard] = nbrs[i[:n_hard], rng.integers(0, nbrs.shape[1], n_hard)]
    perm = rng.permutation(num_pairs)
    return i[perm], j[perm]


def sample_anchor_groups(
    rng: np.random.Generator, n: int, num_anchors: int, per_anchor: int, hard_fraction: float, nbrs: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """(i, j) of shape (num_anchors, per_anchor): row a holds one anchor i[a, 0] and its candidates j[a],
    a `hard_fraction` share of them among the anchor's neighbours, the rest random other rows.

    Ranking is per query, so per-query targets and listwise losses need a query's candidates side by side.
    """
    anchors = rng.integers(0, n, num_anchors)
    j = (anchors[:, None] + rng.integers(1, n, (num_anchors, per_anchor))) % n
    n_hard = int(round(hard_fraction * per_anchor)) if nbrs is not None else 0
    if n_hard:
        j[:, :n_hard] = nbrs[anchors[:, None], rng.integers(0, nbrs.shape[1], (num_anchors, n_hard))]
    i = np.broadcast_to(anchors[:, None], j.shape).copy()
    return i, j


def epoch_batches(
    cfg, context: pair_labels.PairContext, n: int, nbrs: np.ndarray | None, epoch: int, steps: int, batch: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Epoch `epoch`'s pairs and targets, each shaped (steps, batch) — or (steps, batch // M, M) in groups of
    one anchor and M = `pairs.per_anchor` candidates."""
    rng = np.random.default_rng([cfg.seed, epoch])
    per_anchor = cfg.pairs.per_anchor
    if per_anchor > 0:
        groups = max(1, batch // per_anchor)
        i, j = sample_anchor_groups(rng, n, steps * groups, per_anchor, cfg.pairs.hard_fraction, nbrs)
        shape = (steps, groups, per_anchor)
    else:
        i, j = sample_pairs(rng, n, steps * batch, cfg.pairs.hard_fraction, nbrs)
        shape = (steps, batch)
    targets = pair_labels.pair_targets(context, i, j)
    return tuple(x.reshape(shape) for x in (i, j, targets))
