"""Ranking a gallery: chunked scans with a running top-k, so memory stays bounded at any gallery size.

Contract (as faiss): `top_k(...) -> (scores, indices)`, both (B, k); scores are similarities in
descending order; where the gallery holds fewer than k eligible items the index is -1.

The gallery is never padded or copied whole, and no more than one (chunk, B) block of scores exists at a
time. When the whole gallery's scores fit in SCORE_BLOCK_BYTES it is scored in one step, read in place;
otherwise in even chunks sized to the cache (`chunk_rows`: XLA:CPU copies a `dynamic_slice` it feeds a GEMM,
so a chunk is kept small enough for that copy to stay in cache). The last chunk is aligned to the end of the
gallery and the rows it shares with the chunk before are masked, so every row is scored once. Each chunk's
k best are selected exactly in two stages (`_select`) and merged into the running top-k.
"""

from __future__ import annotations

import functools
import glob
import math
from typing import Any, Callable, Iterable

import jax
import jax.numpy as jnp
import numpy as np

from cbir_jax.scoring.scorers import Scorer, with_storage


def _num_rows(rows: Any) -> int:
    return jax.tree_util.tree_leaves(rows)[0].shape[0]


def _row_bytes(rows: Any) -> int:
    return sum(x.dtype.itemsize * math.prod(x.shape[1:]) for x in jax.tree_util.tree_leaves(rows))


def _chunk_at(rows: Any, start: jax.Array, chunk: int) -> Any:
    return jax.tree_util.tree_map(lambda x: jax.lax.dynamic_slice_in_dim(x, start, chunk, axis=0), rows)


def _chunk_starts(n: int, chunk: int) -> tuple[jax.Array, jax.Array]:
    """(nominal, actual) start of each chunk; actual starts are clamped so the last chunk ends at n."""
    n_chunks = max(1, -(-n // chunk))
    nominal = jnp.arange(n_chunks, dtype=jnp.int32) * chunk
    return nominal, jnp.minimum(nominal, n - chunk)


def _last_level_cache_bytes() -> int:
    """The largest CPU cache of this host (L3 on most machines), from sysfs; 32 MiB where it cannot be read."""
    sizes = []
    for path in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            text = open(path).read().strip().upper()
            sizes.append(int(text[:-1]) << {"K": 10, "M": 20, "G": 30}[text[-1]] if text[-1] in "KMG" else int(text))
        except (OSError, ValueError):
            continue
    return max(sizes, default=32 << 20)


# The most bytes one step's scores (and a light scorer's per-row terms) may take: below it the whole gallery
# is scored in one step, read in place. Above it a step reads a chunk that fits in half the last-level cache:
# on CPU a chunk fed to the GEMM is a copy (XLA materialises the dynamic slice), and a cache-resident copy
# costs little. Scorers whose intermediates are unknown (`Scorer.scratch_per_row` None: learned heads, SSIM)
# keep chunks of at most DEFAULT_CHUNK rows, evened out.
SCORE_BLOCK_BYTES = 32 << 20
CHUNK_CACHE_BYTES = _last_level_cache_bytes() // 2
DEFAULT_CHUNK = 8192


def chunk_rows(n: int, b: int, row_bytes: int, most: int | None = None, scratch_per_row: int | None = 0) -> int:
    """Gallery rows scored per step, for n rows of `row_bytes`, b queries and a scorer that holds
    `scratch_per_row` bytes per row besides the (b, rows) float32 scores (None: unknown). At most `most`.

    Chunks are evened out (n = 10,000 in chunks of at most 8,192 is two of 5,024, not 8,192 + 8,192 with
    6,384 rows scored twice) and rounded up to a multiple of 32 where that stays within the cap."""
    if most is None and scratch_per_row is None:
        most = DEFAULT_CHUNK
    if most is None:
        per_row = 4 * b + scratch_per_row
        if n * per_row <= SCORE_BLOCK_BYTES:
            return n
        most = min(CHUNK_CACHE_BYTES // max(row_bytes, 1), SCORE_BLOCK_BYTES // per_row)
    most = max(1, min(most, n))
    chunk = -(-n // -(-n // most))
    rounded = -(-chunk // 32) * 32
    return rounded if rounded <= most else chunk


def _block_width(c: int, k: int) -> int:
    """Width m of the blocks the two-stage selection takes maxima over (0: select directly). m ~ sqrt(c/k)
    balances its two top-k passes, over c/m block maxima and over the k*m entries of the k best blocks."""
    if k < 1:
        return 0
    m = 1 << max(3, round(math.log2(max(c / k, 1)) / 2))
    return m if c >= 4 * k * m else 0


def _select(s_t: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """`jax.lax.top_k(s_t.T, min(k, c))` of (c, B) scores (one column per query), as (scores, rows) (B, k),
    exactly, ties to the lower row.

    Two stages: the maxima of contiguous blocks of m rows, the k best blocks (in row order), then the k
    best of their k*m entries. Exact: an entry outside the k best blocks has k blocks ranked before its
    own, and each holds an entry (its first maximum) ranked before it, by value or by lower row on a tie.
    Replaces a sort-based top-k over all c rows by two over ~2*sqrt(c*k) entries. The scores stay in the
    (c, B) layout the gallery-major GEMM writes (`scorers.gallery_major`): the block maxima are a reduction
    over whole rows of B queries, and only the k*m candidates per query are gathered across it."""
    c, b = s_t.shape
    m = _block_width(c, k)
    if not m:
        return jax.lax.top_k(s_t.T, min(k, c))
    nb = -(-c // m)
    blocks = jnp.pad(s_t, ((0, nb * m - c), (0, 0)), constant_values=-jnp.inf).reshape(nb, m, b)
    _, best_blocks = jax.lax.top_k(jnp.max(blocks, axis=1).T, k)  # (B, k)
    best_blocks = jnp.sort(best_blocks, axis=1)  # row order, so ties among candidates go to the lower row
    cand = blocks[best_blocks, :, jnp.arange(b)[:, None]].reshape(b, k * m)  # (B, k, m) -> (B, k*m)
    top_s, at = jax.lax.top_k(cand, k)
    return top_s, jnp.take_along_axis(best_blocks, at // m, axis=1) * m + at % m


def scan_top_k(
    scorer: Scorer,
    rows: Any,
    shared: Any,
    queries: jax.Array,
    k: int,
    chunk: int | None = None,
    self_index: jax.Array | None = None,
    exclude_self: bool = False,
    ids: jax.Array | None = None,
) -> tuple[jax.Array, jax.Array]:
    """The traceable core of `top_k`: the k best rows per query as (scores, labels).

    Labels are row positions, or `ids[position]` when `ids` is given (rows whose id is negative are
    padding and never returned); `self_index` is compared with the labels. Used per shard by sharding.
    `chunk` is the most rows scored per step (None: `chunk_rows` picks it from N, B and the row size).

    Per step: one scorer call on the chunk (read in place when the chunk is the whole gallery), the masks
    fused into one elementwise pass, the chunk's k best by the two-stage `_select` (no (B, chunk) labels
    are built), and a merge of 2k entries into the running top-k (earlier chunks first, so ties resolve to
    the lower row, as one `lax.top_k` over every score would).
    """
    n = _num_rows(rows)
    b = queries.shape[0]
    if scorer.chunkable:
        chunk = chunk_rows(n, b, _row_bytes(rows), chunk, scorer.scratch_per_row)
    else:
        chunk = n  # a re-ranker reads the whole gallery's neighbourhoods
    if self_index is None:
        self_index = jnp.full((b,), -1, jnp.int32)
    nominal, actual = _chunk_starts(n, chunk)

    def step(best, nominal_start, start):
        best_s, best_i = best
        rows_c = rows if chunk == n else _chunk_at(rows, start, chunk)
        ids_c = None if ids is None else (ids if chunk == n else jax.lax.dynamic_slice_in_dim(ids, start, chunk))
        pos = start + jnp.arange(chunk, dtype=jnp.int32)
        local_self = self_index - start if ids is None else jnp.full_like(self_index, -1)
        # (chunk, B): a gallery-major form's GEMM output as written (the two transposes cancel)
        s_t = scorer.score(rows_c, shared, queries, local_self).astype(jnp.float32).T
        label = pos if ids is None else ids_c
        invalid = (pos < nominal_start)[:, None]  # already scored by the chunk before
        if ids is not None:
            invalid = invalid | (label < 0)[:, None]
        if exclude_self:
            invalid = invalid | (label[:, None] == self_index[None, :])
        top_s, col = _select(jnp.where(invalid, -jnp.inf, s_t), k)
        all_s = jnp.concatenate([best_s, top_s], axis=1)
        all_i = jnp.concatenate([best_i, jnp.take(label, col, mode="clip")], axis=1)
        top_s, at = jax.lax.top_k(all_s, k)
        return top_s, jnp.take_along_axis(all_i, at, axis=1)

    best = (jnp.full((b, k), -jnp.inf, jnp.float32), jnp.full((b, k), -1, jnp.int32))
    if nominal.shape[0] == 1:
        scores, indices = step(best, 0, 0)
    else:
        (scores, indices), _ = jax.lax.scan(lambda c, st: (step(c, *st), None), best, (nominal, actual))
    return scores, jnp.where(jnp.isfinite(scores), indices, -1)


@functools.partial(jax.jit, static_argnames=("scorer", "k", "chunk", "exclude_self"))
def top_k(
    scorer: Scorer,
    state: tuple[Any, Any],
    queries: jax.Array,
    k: int,
    chunk: int | None = None,
    self_index: jax.Array | None = None,
    exclude_self: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """The k best gallery items per query, scanning the gallery at most `chunk` rows at a time (None: the
    chunk `chunk_rows` picks from N, B and the row size)."""
    rows, shared = state
    return scan_top_k(scorer, rows, shared, queries, k, chunk, self_index, exclude_self)


def top_k_streamed(
    scorer: Scorer,
    chunks: Iterable[tuple[int, np.ndarray]],
    queries: jax.Array,
    k: int,
    *,
    rows_per_chunk: int,
    transform: Callable[[np.ndarray], np.ndarray] | None = None,
    self_index: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """As `top_k`, over a gallery that is never in memory whole: `chunks` yields (first row, host rows), e.g.
    a feature store's `iter_chunks`. Each chunk is transformed on the host (post-processing), put on the
    device while the chunk before is scored (double buffering: `device_put` returns at once), prepared and
    merged into the running top-k. Peak memory is about two chunks, whatever the gallery's size. Only
    `row_local` scorers stream; `self_index` (global rows, -1: none) is left out of each query's list."""
    if not scorer.row_local:
        raise ValueError(f"{scorer.name} is not row-local: it needs the whole gallery at once")
    queries = jnp.asarray(queries, jnp.float32)
    b = queries.shape[0]
    excluded = jnp.asarray(np.full(b, -1) if self_index is None else self_index, jnp.int32)
    best = (jnp.full((b, k), -jnp.inf, jnp.float32), jnp.full((b, k), -1, jnp.int32))

    def put(item):
        if item is None:
            return None
        first, rows = item
        rows = np.asarray(transform(rows) if transform is not None else rows, np.float32)
        valid = len(rows)
        if valid < rows_per_chunk:  # the last chunk, padded: one compilation for every chunk
            rows = np.concatenate([rows, np.zeros((rows_per_chunk - valid, rows.shape[1]), np.float32)])
        return jnp.int32(first), jnp.int32(valid), jax.device_put(rows)

    stream = iter(chunks)
    upcoming = put(next(stream, None))
    nan = jnp.bool_(False)
    while upcoming is not None:
        current, upcoming = upcoming, put(next(stream, None))
        best, nan = _merge_chunk(scorer, best, nan, *current, queries, excluded, k)
    if bool(nan):
        raise NonFiniteScores(f"{scorer.name}: NaN scores (the gallery or the queries hold non-finite values)")
    scores, ids = best
    return np.asarray(scores), np.asarray(jnp.where(jnp.isfinite(scores), ids, -1))


class NonFiniteScores(ArithmeticError):
    """A streamed gallery gave NaN scores: a stored gallery that is damaged, or non-finite queries."""


@functools.partial(jax.jit, static_argnames=("scorer", "k"))
def _merge_chunk(scorer: Scorer, best, nan, first, valid, rows, queries, excluded, k: int):
    state_rows, shared = scorer.prepare(rows)
    s = scorer.score(state_rows, shared, queries, excluded - first).astype(jnp.float32)
    nan = nan | jnp.any(jnp.isnan(s))  # fused into the pass that scores the chunk: no second read of it
    pos = jnp.arange(rows.shape[0], dtype=jnp.int32)
    label = first + pos
    invalid = (pos >= valid)[None, :] | (label[None, :] == excluded[:, None])
    s = jnp.where(invalid, -jnp.inf, s)
    all_s = jnp.concatenate([best[0], s], axis=1)
    all_i = jnp.concatenate([best[1], jnp.broadcast_to(label, s.shape)], axis=1)
    top_s, at = jax.lax.top_k(all_s, k)
    return (top_s, jnp.take_along_axis(all_i, at, axis=1)), nan


def gallery_neighbours(
    scorer: Scorer, state: tuple[Any, Any], gallery: jax.Array, k: int, query_chunk: int = 1024
) -> tuple[jax.Array, jax.Array]:
    """(N, k) similarities of each gallery row to its k nearest *other* rows under `scorer`, and their ids:
    the one k-nearest-neighbours-excluding-self of the project (hard pairs, re-rankers, CSLS).

    Rows are queried in even blocks of at most `query_chunk` against the prepared `state` of the same
    `gallery` (10,000 rows: ten blocks of 1,000, not nine of 1,024 and one padded from 784); the last block
    is padded to the others' size, so `top_k` compiles once."""
    n = gallery.shape[0]
    k = min(k, n - 1)
    block = -(-n // -(-n // min(query_chunk, n)))
    sims, ids = [], []
    for start in range(0, n, block):
        q = gallery[start : start + block]
        pad = block - q.shape[0]
        self_index = jnp.arange(start, start + block, dtype=jnp.int32)
        s, i = top_k(scorer, state, jnp.pad(q, ((0, pad), (0, 0))), k=k, self_index=self_index, exclude_self=True)
        sims.append(s[: block - pad])
        ids.append(i[: block - pad])
    return jnp.concatenate(sims), jnp.concatenate(ids)


@functools.partial(jax.jit, static_argnames=("scorer", "chunk"))
def score_all(
    scorer: Scorer, state: tuple[Any, Any], queries: jax.Array, self_index: jax.Array, chunk: int | None = None
) -> jax.Array:
    """Every gallery score for each query, (B, N): what evaluation needs for full-ranking metrics."""
    rows, shared = state
    n = _num_rows(rows)
    if scorer.chunkable:
        chunk = chunk_rows(n, queries.shape[0], _row_bytes(rows), chunk, scorer.scratch_per_row)
    if not scorer.chunkable or chunk == n:  # one step, the gallery read in place
        return scorer.score(rows, shared, queries, self_index).astype(jnp.float32)
    _, actual = _chunk_starts(n, chunk)

    def body(i, out):
        start = actual[i]
        s = scorer.score(_chunk_at(rows, start, chunk), shared, queries, self_index - start).astype(jnp.float32)
        return jax.lax.dynamic_update_slice_in_dim(out, s, start, axis=1)  # the overlap is rewritten equal

    return jax.lax.fori_loop(0, actual.shape[0], body, jnp.zeros((queries.shape[0], n), jnp.float32))


@functools.partial(jax.jit, static_argnames=("cheap", "exact", "k", "m", "chunk", "exclude_self"))
def shortlist_rerank(
    cheap: Scorer,
    cheap_state: tuple[Any, Any],
    exact: Scorer,
    exact_state: tuple[Any, Any],
    queries: jax.Array,
    k: int,
    m: int,
    chunk: int | None = None,
    self_index: jax.Array | None = None,
    exclude_self: bool = False,
) -> tuple[jax.Array, jax.Array]:
    """Shortlist the top `m` by a cheap scorer (e.g. cosine), then re-score only those with the exact
    (learned) scorer and keep its top `k`. Returns (exact scores, indices), as `top_k`.

    Costs one cheap scan plus B * m exact pair scores instead of B * N; it equals the exact ranking
    whenever the exact top-k lie inside the cheap top-m. Both states must hold the same gallery.
    """
    if k > m:
        raise ValueError(f"shortlist_rerank: k={k} must be <= m={m}")
    crow, cshared = cheap_state
    _, cand = scan_top_k(cheap, crow, cshared, queries, m, chunk, self_index, exclude_self)  # (B, m)
    rows, shared = exact_state

    def rescore(q, idx):  # one query against its m candidates
        sub = jax.tree_util.tree_map(lambda x: jnp.take(x, jnp.maximum(idx, 0), axis=0), rows)
        return exact.score(sub, shared, q[None], jnp.full((1,), -1, jnp.int32))[0]

    s = jax.vmap(rescore)(queries, cand).astype(jnp.float32)
    s = jnp.where(cand >= 0, s, -jnp.inf)
    top_s, at = jax.lax.top_k(s, k)
    top_i = jnp.take_along_axis(cand, at, axis=1)
    return top_s, jnp.where(jnp.isfinite(top_s), top_i, -1)


def aligned_empty(shape: tuple[int, ...], dtype: Any = np.float32) -> np.ndarray:
    """An uninitialised numpy array on a 64-byte boundary: on CPU `jax.device_put` then aliases it
    instead of copying, so a gallery loaded into it costs its size in memory once, not twice."""
    dtype = np.dtype(dtype)
    nbytes = int(np.prod(shape)) * dtype.itemsize
    buf = np.empty(nbytes + 64, np.uint8)
    off = (-buf.ctypes.data) % 64
    return buf[off:off + nbytes].view(dtype).reshape(shape)


@functools.lru_cache(maxsize=64)
def _stored(scorer: Scorer, dtype: jnp.dtype) -> Scorer:
    return with_storage(scorer, dtype)  # one wrapper per (scorer, dtype), so top_k compiles once


def search(
    scorer: Scorer,
    gallery: np.ndarray,
    queries: np.ndarray,
    k: int,
    chunk: int | None = None,
    storage_dtype: Any = None,
) -> tuple[np.ndarray, np.ndarray]:
    """One-call search: prepares the gallery, ranks it, returns numpy (scores, indices).

    `storage_dtype` (e.g. jnp.bfloat16) keeps the gallery features in that type (see `with_storage`).
    """
    if storage_dtype is not None:
        scorer = _stored(scorer, jnp.dtype(storage_dtype))
    state = scorer.prepare(jax.device_put(np.asarray(gallery)))  # no copy on CPU if 64-byte aligned
    s, i = top_k(scorer, state, jnp.asarray(queries), k=k, chunk=chunk)
    return np.asarray(s), np.asarray(i)
