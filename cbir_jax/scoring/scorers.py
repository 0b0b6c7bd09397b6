"""Scorers: a pair head (or re-ranker) bound to its parameters, in the form ranking needs.

`prepare` runs once per gallery and returns `(rows, shared)`: `rows` is a pytree whose leaves all have
the gallery axis first (so ranking can slice it into chunks), `shared` is everything else (parameters,
precomputed terms). `score(rows, shared, queries, self_index)` returns (B, n) similarities for the n
gallery rows given; `self_index` is each query's position among those rows (or negative), which only
neighbourhood re-rankers need. A `chunkable=False` scorer needs the whole gallery at once. A `row_local`
scorer's `prepare` of some rows equals those rows of `prepare` of the whole gallery, so a gallery can be
prepared and ranked chunk by chunk as it streams from disk (`ranking.top_k_streamed`).

By convention a dict `rows` keeps the raw gallery features under `FEATURES` ("g"); `with_storage` keeps
that leaf in bfloat16/float16 and widens each chunk to float32 before scoring.

The learned MLP heads have GEMM forms: their first layer, applied to all (query, gallery) pairs, is
rewritten so the gallery-only part is computed once in `prepare` and the pair part is one wide GEMM per
block of queries (see `_squared_difference_form`), instead of one small MLP application per pair.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from cbir_jax.scoring import heads
from cbir_jax.core.registry import Registry
from cbir_jax.core import vectors

GalleryState = tuple[Any, Any]
FEATURES = "g"
# Columns of the pair GEMM per query block: wide enough to run the GEMM near its peak, narrow enough that
# the (chunk, columns) float32 product stays small (8192 x 2048 x 4 B = 64 MiB).
PAIR_GEMM_COLUMNS = 2048


@dataclasses.dataclass(frozen=True, eq=False)
class Scorer:
    name: str
    prepare: Callable[[jax.Array], GalleryState]
    score: Callable[[Any, Any, jax.Array, jax.Array], jax.Array]
    chunkable: bool = True
    row_local: bool = False
    # Scores do not change when a gallery row is scaled (cosine): an L2 post-processing before it is a no-op.
    scale_invariant: bool = False
    # bytes `score` holds per gallery row besides the (B,) float32 scores; 0 for one GEMM plus elementwise
    # terms (cosine, euclid, dot), None where unknown (ranking then keeps its chunks at the default size)
    scratch_per_row: int | None = None


def gallery_major(gallery: jax.Array, queries: jax.Array) -> jax.Array:
    """(n, B) inner products. From GALLERY_MAJOR_MIN_QUERIES queries on, the gallery is the GEMM's row
    operand: on CPU (XLA's YNNPACK GEMM) the small query block is then the operand packed once per call,
    instead of every gallery chunk being re-packed, and ranking selects on this layout directly
    (`ranking._select`; its `.T` cancels the forms' `.T`). Below it the product is a matrix-vector one,
    which XLA streams fastest as queries @ gallery.T, read in place."""
    if queries.shape[0] >= GALLERY_MAJOR_MIN_QUERIES:
        return gallery @ queries.T
    return (queries @ gallery.T).T


GALLERY_MAJOR_MIN_QUERIES = 16


# Fast forms whose score is one GEMM plus elementwise terms: no intermediate larger than the scores.
GEMM_ONLY_FORMS = frozenset({"cosine", "euclid", "CosineResidual"})

# Fast forms keyed by head class: build(head, params) -> (prepare, score). Anything else is scored by
# applying the head to every (query, gallery) pair, which is correct for any head but slower.
FAST_FORMS: Registry[Callable[..., tuple[Callable, Callable]]] = Registry("fast scoring form")


def _pairwise_form(head: nn.Module, params) -> tuple[Callable, Callable]:
    def prepare(gallery):
        return {FEATURES: gallery}, params

    def score(rows, shared, queries, self_index):
        del self_index
        apply = lambda q: head.apply({"params": shared}, q[None, :], rows[FEATURES])  # noqa: E731
        return jax.lax.map(apply, queries, batch_size=8)

    return prepare, score


def _fixed_name(head: nn.Module) -> str | None:
    if isinstance(head, heads.FixedMetric):
        for name, fn in heads.FIXED_METRICS.items():
            if fn is head.fn:
                return name
    return None


@FAST_FORMS.register("cosine")
def _cosine_form(head, params):
    # Only the inverse norms are stored: normalising the gallery would copy it (N x D) in memory.
    def prepare(gallery):
        norm = jnp.linalg.norm(gallery.astype(jnp.float32), axis=-1)
        return {FEATURES: gallery, "inv_norm": 1.0 / jnp.maximum(norm, vectors.EPS)}, None

    def score(rows, shared, queries, self_index):
        qn = vectors.l2_normalise(queries)
        return (gallery_major(rows[FEATURES], qn) * rows["inv_norm"][:, None]).T

    return prepare, score


@FAST_FORMS.register("euclid")
def _euclid_form(head, params):
    def prepare(gallery):
        return {FEATURES: gallery, "g2": jnp.sum(gallery.astype(jnp.float32) ** 2, axis=-1)}, None

    def score(rows, shared, queries, self_index):
        q2 = jnp.sum(queries**2, axis=-1)
        d2 = q2[None, :] + rows["g2"][:, None] - 2.0 * gallery_major(rows[FEATURES], queries)
        return -jnp.sqrt(jnp.maximum(d2, 0.0)).T

    return prepare, score


# ---- learned MLP heads as GEMMs --------------------------------------------------------------------------


def mlp_layers(params, monotone: bool = False) -> list[tuple[jax.Array, jax.Array]]:
    """The (weights, bias) each Dense layer of a head's `mlp` trunk applies, in order (Dense_0, Dense_1, ...)."""
    return heads.effective_layers(params["mlp"], monotone)


def _tail(h: jax.Array, layers, act) -> jax.Array:
    """Applies the layers after the first to activated first-layer outputs h (..., H1); returns (...)."""
    for i, (w, b) in enumerate(layers):
        h = h @ w + b
        if i < len(layers) - 1:
            h = act(h)
    return h[..., 0]


def _by_query_blocks(queries: jax.Array, width: int, block_fn: Callable[[jax.Array], jax.Array]) -> jax.Array:
    """Runs `block_fn` ((qb, ...) -> (qb, n)) over blocks of queries, qb * width ~ PAIR_GEMM_COLUMNS."""
    b = queries.shape[0]
    qb = max(1, min(b, PAIR_GEMM_COLUMNS // max(width, 1)))
    n_blocks = -(-b // qb)
    if n_blocks == 1:
        return block_fn(queries)
    padded = jnp.pad(queries, [(0, n_blocks * qb - b)] + [(0, 0)] * (queries.ndim - 1))
    out = jax.lax.map(block_fn, padded.reshape((n_blocks, qb) + queries.shape[1:]))
    return out.reshape((n_blocks * qb,) + out.shape[2:])[:b]


@FAST_FORMS.register("SquaredDifferenceMLP")
def _squared_difference_form(head, params):
    """MLP((q - g)**2) with its first layer expanded over the square:

        sum_i W_ij (q_i - g_i)^2 = (q^2 W)_j + (g^2 W)_j - 2 (g (q o W))_j

    `(g^2) W` is a gallery row term (N, H) computed once in `prepare`; `q^2 W` is per query; the cross
    term for a block of queries is one GEMM G @ [-2 q1 o W | -2 q2 o W | ...] of width qb * H. Features are
    centred on the gallery mean first ((q - g) is unchanged), which keeps the cancellation in the
    expansion small when q is close to g.
    """
    layers = mlp_layers(params, head.monotone)
    (w1, b1), rest = layers[0], layers[1:]
    act = heads.ACTIVATIONS[head.activation]
    h1 = w1.shape[1]
    # a monotone residual correction is measured from its value at a zero difference (heads.MLP)
    offset = _tail(act(b1), rest, act) if head.monotone and head.constant_start else 0.0

    def prepare(gallery):
        center = jnp.mean(gallery.astype(jnp.float32), axis=0)
        gc = gallery.astype(jnp.float32) - center
        return {FEATURES: gallery, "g2w": (gc * gc) @ w1}, {"layers": layers, "center": center}

    def score(rows, shared, queries, self_index):
        del self_index
        (w, b), tail = shared["layers"][0], shared["layers"][1:]
        g = rows[FEATURES] - shared["center"]
        n = g.shape[0]

        def block(qs):  # (qb, D) -> (qb, n)
            qs = qs - shared["center"]
            qb = qs.shape[0]
            q_term = (qs * qs) @ w + b  # (qb, H)
            wq = (-2.0 * qs[:, :, None] * w[None]).transpose(1, 0, 2).reshape(w.shape[0], qb * h1)
            pre = (g @ wq).reshape(n, qb, h1) + rows["g2w"][:, None, :] + q_term[None]
            return _tail(act(pre), tail, act).T - offset

        return _by_query_blocks(queries, h1, block)

    return prepare, score


@FAST_FORMS.register("ConcatMLP")
def _concat_form(head, params):
    """MLP([q, g]) with its first layer split: [q, g] W = q W_q + g W_g. `g W_g` (N, H) is computed once
    in `prepare` and `q W_q` once per query, so no pair needs a GEMM in the first layer at all."""
    layers = mlp_layers(params)
    w1 = layers[0][0]
    d = w1.shape[0] // 2
    act = heads.ACTIVATIONS[head.activation]
    h1 = w1.shape[1]

    def prepare(gallery):
        return {"gw": gallery.astype(jnp.float32) @ w1[d:]}, {"layers": layers}

    def score(rows, shared, queries, self_index):
        del self_index
        (w, b), tail = shared["layers"][0], shared["layers"][1:]

        def block(qs):  # (qb, D) -> (qb, n)
            pre = (qs @ w[:d] + b)[:, None, :] + rows["gw"][None]
            return _tail(act(pre), tail, act)

        return _by_query_blocks(queries, h1, block)

    return prepare, score


@FAST_FORMS.register("Residual")
def _residual_form(head, params):
    """exp(log_scale) * base + bias + correction, each part in its own (fast if registered) form; the
    gallery state of both parts is kept side by side, so the sum stays chunkable."""
    base = pair_scorer("base", heads.FixedMetric(heads.FIXED_METRICS[head.base]), {})
    correction = pair_scorer("correction", head.correction.clone(parent=None), params["correction"])

    def prepare(gallery):
        (b_rows, b_shared), (c_rows, c_shared) = base.prepare(gallery), correction.prepare(gallery)
        shared = {"base": b_shared, "correction": c_shared, "scale": jnp.exp(params["log_scale"]), "bias": params["bias"]}
        return {"base": b_rows, "correction": c_rows}, shared

    def score(rows, shared, queries, self_index):
        s_base = base.score(rows["base"], shared["base"], queries, self_index)
        s_corr = correction.score(rows["correction"], shared["correction"], queries, self_index)
        return shared["scale"] * s_base + shared["bias"] + s_corr

    return prepare, score


@FAST_FORMS.register("CosineResidual")
def _cosine_residual_form(head, params):
    """Embeds the gallery once, then cosine = one GEMM. (`head.rerank` is not a pair form: scoring/compose.py.)"""

    def embed(p, x):
        return vectors.l2_normalise(head.apply({"params": p}, x, method=head.embed))

    def prepare(gallery):
        return {"g": embed(params, gallery)}, params

    def score(rows, shared, queries, self_index):
        del self_index
        return gallery_major(rows["g"], embed(shared, queries)).T

    return prepare, score


def form_key(head: nn.Module) -> str:
    """The name a fast form is registered under: the fixed metric's name or the head class name."""
    return _fixed_name(head) or type(head).__name__


def pair_scorer(name: str, head: nn.Module, params, *, fast: bool = True) -> Scorer:
    """Binds a head to its parameters; uses its registered fast form unless `fast=False`. Both forms score
    the same function (tests/test_gemm_forms.py), so `fast` changes speed, never results."""
    key = form_key(head)
    if fast and key in FAST_FORMS:
        prepare, score = FAST_FORMS.get(key)(head, params)
    else:
        prepare, score = _pairwise_form(head, params)
    return Scorer(name=name, prepare=prepare, score=score, chunkable=True, row_local=True,
                  scale_invariant=fast and key == "cosine",
                  scratch_per_row=0 if fast and key in GEMM_ONLY_FORMS else None)


def fixed_scorer(name: str) -> Scorer:
    """A scorer for one of the parameter-free metrics."""
    return pair_scorer(name, heads.FixedMetric(heads.FIXED_METRICS[name]), {})


def _dot_prepare(gallery):
    return {FEATURES: gallery}, None


def _dot_score(rows, shared, queries, self_index):
    del shared, self_index
    return gallery_major(rows[FEATURES], queries).T


# Inner product: cosine on rows that are already unit vectors (the re-rankers' neighbourhoods), without
# normalising them again.
DOT = Scorer(name="dot", prepare=_dot_prepare, score=_dot_score, row_local=True, scratch_per_row=0)


def with_storage(scorer: Scorer, dtype) -> Scorer:
    """The same scorer with the gallery features (`rows["g"]`) stored as `dtype` (bfloat16 / float16):
    half the memory, and each chunk is widened to float32 before scoring, so arithmetic and accumulation
    stay float32. Derived row terms (norms, g^2 W) are computed from the float32 gallery and kept float32.
    """
    dtype = jnp.dtype(dtype)

    def prepare(gallery):
        rows, shared = scorer.prepare(gallery)
        if not (isinstance(rows, dict) and FEATURES in rows):
            return rows, shared  # this form keeps no raw features (e.g. ConcatMLP keeps g W_g only)
        return {**rows, FEATURES: rows[FEATURES].astype(dtype)}, shared

    def score(rows, shared, queries, self_index):
        if isinstance(rows, dict) and FEATURES in rows:
            rows = {**rows, FEATURES: rows[FEATURES].astype(jnp.float32)}
        return scorer.score(rows, shared, queries, self_index)

    # scratch_per_row stays unknown: each step also holds a float32 copy of its chunk's features
    return Scorer(name=f"{scorer.name}[{dtype.name}]", prepare=prepare, score=score, chunkable=scorer.chunkable,
                  row_local=scorer.row_local)


def with_transform(scorer: Scorer, transform: Callable[[jax.Array], jax.Array], name: str = "") -> Scorer:
    """The same scorer on transformed gallery rows (`prepare(transform(rows))`): how a streamed gallery's
    post-processing runs inside the jitted pass that scores each chunk, instead of as host passes before
    it. Only row-local scorers: the transform sees one chunk at a time. Build it once per gallery (jit
    caches by scorer identity)."""
    if not scorer.row_local:
        raise ValueError(f"{scorer.name} is not row-local: a per-chunk transform would change its answers")
    return Scorer(name=name or f"{scorer.name}+transform", prepare=lambda rows: scorer.prepare(transform(rows)),
                  score=scorer.score, chunkable=scorer.chunkable, row_local=True)
