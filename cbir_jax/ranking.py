"""Ranking a gallery: chunked scans with a running top-k, so memory stays bounded at any gallery size.

Contract (as faiss): `top_k(...) -> (scores, indices)`, both (B, k); scores are similarities in
descending order; where the gallery holds fewer than k eligible items the index is -1.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cbir_jax.scorers import Scorer


def _chunk_rows(rows: Any, n: int, chunk: int) -> tuple[Any, int]:
    """Pads the gallery axis to a multiple of `chunk` and folds it into (n_chunks, chunk, ...)."""
    n_chunks = max(1, -(-n // chunk))
    pad = n_chunks * chunk - n

    def fold(x):
        x = jnp.pad(x, [(0, pad)] + [(0, 0)] * (x.ndim - 1))
        return x.reshape((n_chunks, chunk) + x.shape[1:])

    return jax.tree_util.tree_map(fold, rows), n_chunks


def _num_rows(rows: Any) -> int:
    return jax.tree_util.tree_leaves(rows)[0].shape[0]


@functools.partial(jax.jit, static_argnames=("scorer", "k", "chunk", "exclude_self"))
def top_k(
    scorer: Scorer,
    state: tuple[Any, Any],
    queries: jax.Array,
    k: int,
    chunk: int = 8192,
    self_index: jax.Array | None = None,
    exclude_self: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """The k best gallery items per query, scanning the gallery `chunk` rows at a time."""
    rows, shared = state
    n = _num_rows(rows)
    chunk = min(chunk, n)
    b = queries.shape[0]
    if self_index is None:
        self_index = jnp.full((b,), -1, jnp.int32)
    folded, n_chunks = _chunk_rows(rows, n, chunk)
    offsets = jnp.arange(n_chunks, dtype=jnp.int32) * chunk

    def body(carry, xs):
        best_s, best_i = carry
        rows_c, offset = xs
        s = scorer.score(rows_c, shared, queries, self_index - offset).astype(jnp.float32)
        idx = offset + jnp.arange(chunk, dtype=jnp.int32)
        invalid = (idx >= n)[None, :]
        if exclude_self:
            invalid = invalid | (idx[None, :] == self_index[:, None])
        s = jnp.where(invalid, -jnp.inf, s)
        all_s = jnp.concatenate([best_s, s], axis=1)
        all_i = jnp.concatenate([best_i, jnp.broadcast_to(idx, s.shape)], axis=1)
        top_s, pos = jax.lax.top_k(all_s, k)
        return (top_s, jnp.take_along_axis(all_i, pos, axis=1)), None

    init = (jnp.full((b, k), -jnp.inf, jnp.float32), jnp.full((b, k), -1, jnp.int32))
    (scores, indices), _ = jax.lax.scan(body, init, (folded, offsets))
    return scores, jnp.where(jnp.isfinite(scores), indices, -1)


@functools.partial(jax.jit, static_argnames=("scorer", "chunk"))
def score_all(
    scorer: Scorer, state: tuple[Any, Any], queries: jax.Array, self_index: jax.Array, chunk: int = 8192
) -> jax.Array:
    """Every gallery score for each query, (B, N): what evaluation needs for full-ranking metrics."""
    rows, shared = state
    n = _num_rows(rows)
    if not scorer.chunkable:
        return scorer.score(rows, shared, queries, self_index)
    chunk = min(chunk, n)
    folded, n_chunks = _chunk_rows(rows, n, chunk)
    offsets = jnp.arange(n_chunks, dtype=jnp.int32) * chunk
    per_chunk = jax.lax.map(lambda xs: scorer.score(xs[0], shared, queries, self_index - xs[1]), (folded, offsets))
    return jnp.moveaxis(per_chunk, 0, 1).reshape(queries.shape[0], -1)[:, :n]


def search(
    scorer: Scorer, gallery: np.ndarray, queries: np.ndarray, k: int, chunk: int = 8192
) -> tuple[np.ndarray, np.ndarray]:
    """One-call search: prepares the gallery, ranks it, returns numpy (scores, indices)."""
    state = scorer.prepare(jnp.asarray(gallery))
    s, i = top_k(scorer, state, jnp.asarray(queries), k=k, chunk=chunk)
    return np.asarray(s), np.asarray(i)
