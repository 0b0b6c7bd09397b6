"""A learned re-ranker: database-side augmentation whose neighbour weights a small transformer predicts.

DBA + α-QE (cbir_jax/scoring/rerank.py) replaces each gallery vector by a weighted mean of its k nearest
neighbours, with fixed weights max(cos, 0)^α. Those weights cannot tell a neighbour of the same object from
a look-alike of another one; the neighbourhood's own structure often can (same-object neighbours are also
similar to each other). `NeighbourhoodTransformer` reads only that structure: item i and its neighbours
are tokens, each described by its row of cosines to the other members and its rank, never by its feature
vector, so nothing it learns is a direction of the training categories (raw features overfit them). It
outputs a zero-initialised log-correction u to the DBA weights,

    d_i = normalise(Σ_t max(cos(i, m_t), 0)^α · exp(u_t) · g_{m_t}),   m = [i, n_1, ..., n_k],

so an untrained model *is* DBA + α-QE. The same model expands the query over its own neighbours, then α-QE
over the d_i ranks the gallery.

Leave-one-out is exact. Members are [i, n_1 .. n_{k+1}] with one of them masked: normally the spare
n_{k+1}; when the query is the gallery item n_p, that variant drops n_p instead (moved last and masked, the
others in rank order), so d_i is exactly what it would be were the query not in the gallery. `prepare` computes every variant's weights once ((N, k+1)
transformer passes); scoring only gathers them. The query's own neighbourhood excludes the query.
"""

from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from cbir_jax.core.config import LearnedRerankConfig
from cbir_jax.scoring import ranking, scorers
from cbir_jax.core.vectors import l2_normalise
from cbir_jax.scoring.rerank import mask_self, neighbourhood_gram, weights_from_similarity

EPS = 1e-12


class NeighbourhoodTransformer(nn.Module):
    """(…, M, M) member-to-member cosines and (…, M) validity -> (…, M) log-corrections to DBA weights."""

    dim: int = 64
    depth: int = 2
    heads: int = 4

    @nn.compact
    def __call__(self, gram: jax.Array, valid: jax.Array) -> jax.Array:
        m = gram.shape[-1]
        rows = jnp.where(valid[..., None, :], gram, 0.0)  # a masked member is invisible to the others
        h = nn.Dense(self.dim, name="embed")(jnp.concatenate([rows, valid[..., None].astype(rows.dtype)], -1))
        h = h + self.param("rank", nn.initializers.normal(0.02), (m, self.dim))
        attn_mask = valid[..., None, None, :]
        for i in range(self.depth):
            y = nn.LayerNorm(name=f"ln_attn_{i}")(h)
            h = h + nn.MultiHeadDotProductAttention(self.heads, name=f"attn_{i}")(y, y, mask=attn_mask)
            y = nn.LayerNorm(name=f"ln_mlp_{i}")(h)
            y = nn.Dense(2 * self.dim, name=f"mlp_in_{i}")(y)
            h = h + nn.Dense(self.dim, name=f"mlp_out_{i}")(nn.gelu(y))
        u = nn.Dense(1, kernel_init=nn.initializers.zeros, name="out")(nn.LayerNorm(name="ln_out")(h))[..., 0]
        return jnp.where(valid, u, 0.0)


def member_weights(model, params, gram: jax.Array, valid: jax.Array, alpha: float, learned: bool = True) -> jax.Array:
    """(…, M) weights of the members [self, n_1, …]: self 1, neighbour max(cos, 0)^α, times exp(u); masked 0."""
    base = weights_from_similarity(gram[..., 0, :], alpha)
    base = base.at[..., 0].set(1.0)
    if learned:
        base = base * jnp.exp(model.apply({"params": params}, gram, valid))
    return jnp.where(valid, base, 0.0)


def variant_orders(k: int) -> jax.Array:
    """(k+1, k+2) member orders of the leave-one-out variants of [self, n_1 .. n_{k+1}]: variant v drops
    member v+1 by moving it to the end, where it is masked (v = k drops the spare). The others keep their
    rank order, so a variant is token for token what the model sees in a gallery without that member."""
    members = jnp.arange(k + 2)
    dropped = jnp.arange(k + 1) + 1
    rest = jnp.stack([jnp.concatenate([members[:v], members[v + 1:]]) for v in range(1, k + 2)])
    return jnp.concatenate([rest, dropped[:, None]], axis=1)


def _last_masked(m: int) -> jax.Array:
    return jnp.arange(m) < m - 1


def gallery_neighbourhoods(g: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """(N, k+2) members [j, n_1 .. n_{k+1}] of every gallery row (itself excluded from its neighbours)
    and their (N, k+2, k+2) Gram matrices, found with the project's chunked top-k."""
    cosine = scorers.fixed_scorer("cosine")
    state = cosine.prepare(g)
    n = g.shape[0]
    _, nbr = ranking.gallery_neighbours(cosine, state, g, k + 1)
    members = jnp.concatenate([jnp.arange(n, dtype=nbr.dtype)[:, None], nbr], axis=1)
    return members, neighbourhood_gram(g, members)


def prepare_gallery(
    model, params, spec: LearnedRerankConfig, gallery: jax.Array, *, loo: bool = True, batch: int = 32
) -> dict[str, jax.Array]:
    """Every gallery row's unit-norm d_j as coefficients over its members, for each leave-one-out variant
    (`loo=False`: only the spare's variant, for queries that are not in the gallery, as in training).

    `batch` rows' variants go through the transformer at once: 32 x 51 neighbourhoods keep its attention
    maps near 100 MB (256 rows used 6 GB and were killed for memory during a study).
    """
    g = l2_normalise(gallery)
    members, gram = gallery_neighbourhoods(g, spec.k)
    orders = variant_orders(spec.k) if loo else variant_orders(spec.k)[spec.k:]
    valid = jnp.broadcast_to(_last_masked(spec.k + 2), orders.shape)

    def row_coef(gram_row):  # (M, M) -> (variants, M), weights in member order
        grams = gram_row[orders[:, :, None], orders[:, None, :]]
        w = member_weights(model, params, grams, valid, spec.alpha, spec.database_side)
        return jnp.zeros_like(w).at[jnp.arange(orders.shape[0])[:, None], orders].set(w)

    coef = jax.lax.map(row_coef, gram, batch_size=batch) if loo else jax.vmap(row_coef)(gram)  # (N, variants, M)
    norm = jnp.sqrt(jnp.maximum(jnp.einsum("jva,jac,jvc->jv", coef, gram, coef), EPS))
    coef = coef / norm[..., None]
    if not loo:  # one variant: the unit vectors d_j themselves, so scoring is one GEMM
        return {"g": g, "d": jnp.einsum("jm,jmd->jd", coef[:, 0], g[members])}
    return {"g": g, "members": members, "coef": coef}


def _variant_index(rows: dict[str, jax.Array], self_index: jax.Array) -> jax.Array:
    """(B, N) which variant each (query, gallery row) pair uses: the query's position among the row's
    neighbours, or the spare's variant (the last) when the query is not among them or not in the gallery."""
    spare = rows["coef"].shape[1] - 1
    hit = rows["members"][None, :, 1:] == self_index[:, None, None]  # (B, N, k+1)
    return jnp.where(hit.any(-1), jnp.argmax(hit, -1), spare)


def _augmented_similarity(v: jax.Array, rows: dict[str, jax.Array], var: jax.Array) -> jax.Array:
    """cos(v, d_j) for unit query vectors v (B, D) and each row's variant `var` (B, N) of its d_j."""
    coef = rows["coef"][jnp.arange(var.shape[1])[None, :], var]  # (B, N, M)
    p = v @ rows["g"].T
    return jnp.einsum("bjm,bjm->bj", coef, p[:, rows["members"]])


def expand_queries(model, params, spec: LearnedRerankConfig, g: jax.Array, q: jax.Array, self_index: jax.Array) -> jax.Array:
    """Each unit query expanded over its k gallery neighbours (itself excluded) with the learned weights."""
    _, top_i = jax.lax.top_k(mask_self(q @ g.T, self_index), spec.k + 1)
    vecs = jnp.concatenate([q[:, None], g[top_i]], axis=1)  # (B, k+2, D); the spare stays masked
    gram = jnp.einsum("bad,bcd->bac", vecs, vecs)
    valid = jnp.broadcast_to(_last_masked(spec.k + 2), gram.shape[:2])
    w = member_weights(model, params, gram, valid, spec.alpha, spec.query_side)
    return l2_normalise(jnp.einsum("bm,bmd->bd", w, vecs))


def score_queries(model, params, spec: LearnedRerankConfig, rows: dict[str, jax.Array], queries: jax.Array, self_index: jax.Array) -> jax.Array:
    """(B, N) final similarities: learned query expansion, then α-QE over the (leave-one-out) d_j."""
    g = rows["g"]
    b, n = queries.shape[0], g.shape[0]
    q = l2_normalise(queries)
    v = expand_queries(model, params, spec, g, q, self_index) if spec.query_side else q
    if "d" in rows:  # prepared without variants: queries are not gallery items (training, external search)
        d = rows["d"]
        top_s, top_i = jax.lax.top_k(mask_self(v @ d.T, self_index), min(spec.qe_k, n))
        expanded = l2_normalise(v + jnp.einsum("bt,btd->bd", weights_from_similarity(top_s, spec.qe_alpha), d[top_i]))
        return expanded @ d.T
    var = _variant_index(rows, self_index)
    s = mask_self(_augmented_similarity(v, rows, var), self_index)
    top_s, top_i = jax.lax.top_k(s, min(spec.qe_k, n))
    # v' = v + Σ_t w_t d_t (each d_t unit), written over gallery rows: a (B, N) mixing matrix.
    bi = jnp.arange(b)[:, None]
    c_t = rows["coef"][top_i, var[bi, top_i]]  # (B, t, M)
    vals = weights_from_similarity(top_s, spec.qe_alpha)[..., None] * c_t
    mix = jnp.zeros((b, n), g.dtype).at[jnp.broadcast_to(bi[..., None], vals.shape), rows["members"][top_i]].add(vals)
    expanded = l2_normalise(v + mix @ g)
    return _augmented_similarity(expanded, rows, var)


def learned_scorer(model, params, spec: LearnedRerankConfig, name: str = "learned_rerank", *, leave_one_out: bool = True) -> scorers.Scorer:
    """The trained re-ranker as a Scorer (whole gallery at once, like the other re-rankers).

    `leave_one_out=False` prepares each d_j once, without the variants that keep a gallery item that is
    also the query out of its neighbours' d_j: (k+1) times cheaper to prepare and one GEMM per query, for
    search with external queries (self_index < 0) only.
    """

    def prepare(gallery):
        return _prepare_jit(model, params, spec, gallery, loo=leave_one_out), params

    def score(rows, shared, queries, self_index):
        return score_queries(model, shared, spec, rows, queries, self_index)

    return scorers.Scorer(name=name, prepare=prepare, score=score, chunkable=False)


_prepare_jit = jax.jit(prepare_gallery, static_argnames=("model", "spec", "loo", "batch"))


def build_model(spec: LearnedRerankConfig) -> NeighbourhoodTransformer:
    return NeighbourhoodTransformer(dim=spec.dim, depth=spec.depth, heads=spec.heads)


def init_params(model: NeighbourhoodTransformer, spec: LearnedRerankConfig, rng: jax.Array) -> Any:
    m = spec.k + 2
    return model.init(rng, jnp.zeros((1, m, m)), jnp.ones((1, m), bool))["params"]
