"""Non-learned re-rankers as scorers (`eval.baselines=[...,alpha_qe,dba_alpha_qe,diffusion]`).

All work on L2-normalised features with cosine similarity and read the gallery's neighbourhoods, so they
are `chunkable=False` scorers (see cbir_jax/scoring/scorers.py). Leave-one-out honesty: when a query is itself a
gallery entry (`self_index >= 0`), that entry is removed from *every* neighbour set the re-ranker uses —
the query's own neighbours, the gallery items' neighbours for database-side augmentation, and the
diffusion graph — so the score a query gives is what it would be were the query not in the database.

- `alpha_qe` — α-query expansion (Radenović, Tolias, Chum, "Fine-tuning CNN image retrieval with no human
  annotation", TPAMI 2018): q' = normalise(q + Σ_{i∈kNN(q)} max(cos(q, g_i), 0)^α g_i), score = cos(q', g).
  Defaults k=10, α=3 (the paper's).
- `dba_alpha_qe` — database-side augmentation then α-QE (same paper): every gallery vector is replaced by
  d_j = normalise(g_j + Σ_{n∈kNN(j)} max(cos(g_j, g_n), 0)^α g_n), then α-QE over the d_j. Defaults
  k=10, α=3 for both. kNN(j) with the query's entry removed is the first k of j's k+1 neighbours that are
  not the query, so the exact leave-one-out d_j is computed for every query without refitting.
- `diffusion` — kNN-graph diffusion (Iscen et al., "Efficient diffusion on region manifolds", CVPR 2017):
  mutual-kNN affinities W_ij = max(cos, 0)^γ (k=20, γ=3), S = D^-1/2 W D^-1/2, the query's top-k_q
  similarities (k_q=10) as y, f = (I - βS)^-1 y (β=0.99) by conjugate gradient (20 steps). The query's
  node is removed from the graph (its edges dropped, degrees updated). Items the diffusion reaches rank
  above the rest, which keep their cosine order.
- `k_reciprocal` — k-reciprocal re-ranking (Zhong, Zheng, Cao, Li, "Re-ranking person re-identification
  with k-reciprocal encoding", CVPR 2017), as in the authors' released `re_ranking`: R(p, k1) = the items
  among p's k1+1 nearest (p first) that have p among theirs; each member c adds R(c, round(k1/2)) when
  more than 2/3 of it lies in R(p, k1) (the 1/2 expansion rule; the paper writes ≥, the code >); V_p is the
  Gaussian kernel exp(-d(p, x)) on that set, normalised to sum 1, then averaged over p's k2 nearest
  (local query expansion); Jaccard distance 1 - Σ min(V_p, V_g) / Σ max(V_p, V_g); the score is minus
  (1-λ)·Jaccard + λ·d(p, g). d = 1 - cos: the released code divides squared euclidean distances by each
  row's maximum, which for non-negative unit features (max distance 2, at cos 0) is 1 - cos. Defaults
  k1=20, k2=6, λ=0.3 (the paper's). The probe is a member of the set it is encoded in, as in the paper:
  the set is the gallery without the query's own entry, plus the query — so a query that is gallery row s
  scores exactly as it would against the gallery with row s removed. Such a query (same vector as row s)
  reads the gallery's own encodings, prepared once: O(N²) per query for its Jaccard row. Any other query
  encodes the N+1-item set it joins (the gallery's nearest lists merged with it, not re-sorted): O(N²·k2)
  per query and N×N arrays, fine at N ~ 10³, slow at 10⁴.

Parameters other than the defaults: `build_reranker("alpha_qe", k=5, alpha=1.0)`.
"""

from __future__ import annotations

import functools
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

from cbir_jax.core.registry import Registry
from cbir_jax.scoring import ranking
from cbir_jax.scoring.scorers import DOT, Scorer
from cbir_jax.core.vectors import l2_normalise

EPS = 1e-12
RERANKERS: Registry[Callable[..., Scorer]] = Registry("re-ranker")


def mask_self(s: jax.Array, self_index: jax.Array) -> jax.Array:
    """Sets each row's self entry to -inf (no-op where self_index < 0)."""
    cols = jnp.arange(s.shape[-1])[None, :]
    return jnp.where(cols == self_index[:, None], -jnp.inf, s)


def weights_from_similarity(sims: jax.Array, alpha: float) -> jax.Array:
    """α-QE weights max(sim, 0)^α; -inf (masked) similarities weigh 0."""
    return jnp.where(jnp.isfinite(sims), jnp.maximum(sims, 0.0), 0.0) ** alpha


def alpha_qe_scores(g: jax.Array, queries: jax.Array, self_index: jax.Array, k: int, alpha: float) -> jax.Array:
    """(B, N) cosine between α-expanded queries and the normalised gallery `g`."""
    q = l2_normalise(queries)
    s = mask_self(q @ g.T, self_index)
    top_s, top_i = jax.lax.top_k(s, k)
    expanded = l2_normalise(q + jnp.einsum("bk,bkd->bd", weights_from_similarity(top_s, alpha), g[top_i]))
    return expanded @ g.T


def _gallery_neighbours(g: jax.Array, k: int) -> tuple[jax.Array, jax.Array]:
    """(N, k) cosine similarities of each unit gallery row to its k nearest other rows, and their ids."""
    return ranking.gallery_neighbours(DOT, DOT.prepare(g), g, k)


def neighbourhood_gram(g: jax.Array, members: jax.Array, chunk: int = 1024) -> jax.Array:
    """(N, M, M) cosines among each row's members, built `chunk` rows at a time: the members' vectors of all
    rows at once would be N x M x D (10k rows, M = 52, D = 1280: 2.7 GB)."""
    out = []
    for start in range(0, members.shape[0], chunk):
        vecs = g[members[start : start + chunk]]
        out.append(jnp.einsum("jad,jcd->jac", vecs, vecs))
    return jnp.concatenate(out)


def _dba_coefficients(nbr_i: jax.Array, nbr_w: jax.Array, self_index: jax.Array, k: int) -> jax.Array:
    """(B, N, k+2) coefficients of each gallery row's DBA vector over its members [j, n_j1..n_j(k+1)],
    with query b's gallery entry removed: the first k neighbours other than self_index[b]."""
    keep = nbr_i[None, :, :] != self_index[:, None, None]  # (B, N, k+1)
    keep = keep & (jnp.cumsum(keep, axis=-1) <= k)
    own = jnp.ones(keep.shape[:2] + (1,), nbr_w.dtype)
    return jnp.concatenate([own, jnp.where(keep, nbr_w[None], 0.0)], axis=-1)


def _dba_similarity(p: jax.Array, members: jax.Array, gram: jax.Array, coef: jax.Array) -> jax.Array:
    """cos(v, d_j) for every query vector v and gallery DBA vector d_j, from p = v·g (B, N) (v unit)."""
    numer = jnp.einsum("bjm,bjm->bj", coef, p[:, members])
    norm2 = jnp.einsum("bja,jac,bjc->bj", coef, gram, coef)
    return numer / jnp.sqrt(jnp.maximum(norm2, EPS))


def dba_alpha_qe_scores(
    g: jax.Array, members: jax.Array, gram: jax.Array, nbr_w: jax.Array,
    queries: jax.Array, self_index: jax.Array, k: int, alpha: float, qe_k: int, qe_alpha: float,
) -> jax.Array:
    """(B, N) cosine between α-expanded queries and leave-one-out DBA gallery vectors."""
    b, n = queries.shape[0], g.shape[0]
    q = l2_normalise(queries)
    coef = _dba_coefficients(members[:, 1:], nbr_w, self_index, k)  # (B, N, k+2)
    s = mask_self(_dba_similarity(q @ g.T, members, gram, coef), self_index)
    top_s, top_i = jax.lax.top_k(s, qe_k)  # neighbours of q among the DBA vectors
    # q' = q + Σ_t w_t d_t / |d_t|, written as a combination of gallery rows: coefficients (B, N).
    rows = jnp.arange(b)[:, None]
    c_t = coef[rows, top_i]  # (B, qe_k, k+2)
    norm_t = jnp.sqrt(jnp.maximum(jnp.einsum("bta,btac,btc->bt", c_t, gram[top_i], c_t), EPS))
    vals = (weights_from_similarity(top_s, qe_alpha) / norm_t)[..., None] * c_t
    mix = jnp.zeros((b, n), g.dtype).at[jnp.broadcast_to(rows[..., None], vals.shape), members[top_i]].add(vals)
    expanded = q + mix @ g
    expanded = l2_normalise(expanded)
    return _dba_similarity(expanded @ g.T, members, gram, coef)


def diffusion_scores(
    g: jax.Array, w: jax.Array, queries: jax.Array, self_index: jax.Array,
    k_query: int, gamma: float, beta: float, iterations: int,
) -> jax.Array:
    """(B, N) diffusion scores on the gallery graph `w` with each query's own node removed."""
    b, n = queries.shape[0], g.shape[0]
    q = l2_normalise(queries)
    cos = mask_self(q @ g.T, self_index)
    top_s, top_i = jax.lax.top_k(cos, k_query)
    rows = jnp.arange(b)[:, None]
    y = jnp.zeros((b, n), g.dtype).at[rows, top_i].set(weights_from_similarity(top_s, gamma))
    is_self = jnp.arange(n)[None, :] == self_index[:, None]  # (B, N)
    w_self = jnp.where(self_index[:, None] >= 0, w[jnp.maximum(self_index, 0)], 0.0)  # edges to the query
    degree = jnp.sum(w, axis=1)[None, :] - w_self
    dinv = jnp.where(is_self | (degree <= 0), 0.0, 1.0 / jnp.sqrt(jnp.maximum(degree, EPS)))

    def system(f):  # (I - βS) f with the query's node cut out of S
        return f - beta * dinv * ((dinv * f) @ w)

    # Batched conjugate gradient; (I - βS) is symmetric positive definite for β < 1.
    f = jnp.zeros_like(y)
    r = y
    p = r
    rs = jnp.sum(r * r, axis=1, keepdims=True)

    def step(_, state):
        f, r, p, rs = state
        ap = system(p)
        a = rs / jnp.maximum(jnp.sum(p * ap, axis=1, keepdims=True), EPS)
        f, r = f + a * p, r - a * ap
        rs_new = jnp.sum(r * r, axis=1, keepdims=True)
        p = r + (rs_new / jnp.maximum(rs, EPS)) * p
        return f, r, p, rs_new

    f, *_ = jax.lax.fori_loop(0, iterations, step, (f, r, p, rs))
    f = f / jnp.maximum(jnp.max(f, axis=1, keepdims=True), EPS)
    reached = f > 1e-6
    # Reached items in (1, 2] by diffusion mass, the rest below in cosine order ([-3, -1]).
    return jnp.where(reached, 1.0 + f, jnp.where(jnp.isfinite(cos), cos, 0.0) - 2.0)


def _mutual_knn_graph(g: jax.Array, k: int, gamma: float) -> jax.Array:
    """(N, N) symmetric affinities max(cos, 0)^γ between mutual k-nearest neighbours."""
    n = g.shape[0]
    nbr_s, nbr_i = _gallery_neighbours(g, k)
    a = jnp.zeros((n, n), g.dtype).at[jnp.arange(n)[:, None], nbr_i].set(weights_from_similarity(nbr_s, gamma))
    return jnp.minimum(a, a.T)


@functools.partial(jax.jit, static_argnames="width")
def nearest_order(c: jax.Array, present: jax.Array, width: int) -> jax.Array:
    """(M, width) each row's nearest items of a set: itself first, then by decreasing cosine (ties: lower
    index first); absent items (`present` False) come last."""
    m = c.shape[0]
    s = jnp.where(present[:, None] & present[None, :], c, -jnp.inf)
    return jax.lax.top_k(jnp.where(jnp.eye(m, dtype=bool), jnp.inf, s), min(width, m))[1]


@functools.partial(jax.jit, static_argnames=("k1", "k2"))
def kreciprocal_encoding(c: jax.Array, present: jax.Array, order: jax.Array, k1: int, k2: int) -> jax.Array:
    """(M, M) k-reciprocal encodings V of a set of M unit vectors, local-query-expanded over k2 neighbours.

    `c` holds their cosines, `order` each row's nearest list (`nearest_order`, at least min(max(k1+1, k2), M)
    wide); rows where `present` is False are absent: never a neighbour, and their own V is 0.
    """
    m = c.shape[0]
    rows = jnp.arange(m)[:, None]
    ok = present[:, None] & present[None, :]
    half = int(np.around(k1 / 2))

    def reciprocal(k: int) -> jax.Array:  # (M, M): x ∈ R(i, k), i.e. each is among the other's k+1 nearest
        nearest = jnp.zeros((m, m), bool).at[rows, order[:, : k + 1]].set(True) & ok
        return nearest & nearest.T

    r, r_half = reciprocal(k1), reciprocal(half)
    cand = order[:, : k1 + 1]  # R(i, k1) lies among these
    around = order[cand, : half + 1]  # (M, k1+1, half+1): R(c, half) lies among these
    in_half = r_half[cand[..., None], around]
    in_r = r[rows[..., None], around]
    # |R(c, k1/2) ∩ R(i, k1)| > 2/3 |R(c, k1/2)|, in integers.
    accept = r[rows, cand] & (3 * jnp.sum(in_half & in_r, -1) > 2 * jnp.sum(in_half, -1))
    added = jnp.zeros((m, m), jnp.int32).at[rows[..., None], around].add((accept[..., None] & in_half).astype(jnp.int32))
    v = jnp.where(r | (added > 0), jnp.exp(c - 1.0), 0.0)  # exp(-d), d = 1 - cos
    v = v / jnp.maximum(jnp.sum(v, axis=1, keepdims=True), EPS)
    if k2 > 1:  # local query expansion: the mean encoding of i's k2 nearest (i included)
        near = order[:, :k2]
        w = (present[near] & present[:, None]).astype(v.dtype)
        v = jnp.einsum("ik,ikx->ix", w, v[near]) / jnp.maximum(jnp.sum(w, axis=1, keepdims=True), 1.0)
    return v


def jaccard_distance(v: jax.Array, i: jax.Array | int) -> jax.Array:
    """(M,) Jaccard distances 1 - Σ min / Σ max between encoding row i and every row (rows sum to 1 or 0)."""
    inter = jnp.sum(jnp.minimum(v[i][None, :], v), axis=1)
    return 1.0 - inter / (2.0 - inter)


def kreciprocal_scores(
    g: jax.Array, c: jax.Array, near: jax.Array, v: jax.Array, queries: jax.Array, self_index: jax.Array,
    k1: int, k2: int, lam: float,
) -> jax.Array:
    """(B, N) minus the k-reciprocal final distance, each query encoded in the set (gallery minus its own
    entry) + the query. `c` is the gallery's cosine matrix, `near` its nearest lists with one spare column,
    `v` its encodings: a query that is gallery row s (self_index s, same vector) makes that set the gallery
    itself, so its row of `v` is read instead of encoding N+1 items again."""
    n = g.shape[0]
    ids = jnp.arange(n)
    width = min(max(k1 + 1, k2), n + 1)
    near_c = jnp.where(near == ids[:, None], jnp.inf, jnp.take_along_axis(c, near, axis=1))

    def encoded(q, s):  # the definition: encode (gallery without row s) + q, q last
        qg = g @ q
        cset = jnp.concatenate(
            [jnp.concatenate([c, qg[:, None]], axis=1), jnp.append(qg, jnp.ones((), c.dtype))[None, :]]
        )
        present = jnp.append(ids != s, True)
        # Each gallery row's list loses row s and may gain q: merged from its own list (one spare), no sort of N.
        merged = jnp.concatenate([jnp.where(near == s, -jnp.inf, near_c), qg[:, None]], axis=1)
        cands = jnp.concatenate([near, jnp.full((n, 1), n, near.dtype)], axis=1)
        rows_order = jnp.take_along_axis(cands, jax.lax.top_k(merged, width)[1], axis=1)
        q_order = jax.lax.top_k(jnp.append(jnp.where(ids == s, -jnp.inf, qg), jnp.inf), width)[1]
        order = jnp.concatenate([rows_order, q_order[None, :].astype(rows_order.dtype)])
        return jaccard_distance(kreciprocal_encoding(cset, present, order, k1, k2), n)[:n]

    def one(args):
        q, s = args
        row = jnp.maximum(s, 0)
        own = (s >= 0) & jnp.all(jnp.abs(q - g[row]) <= 1e-6)
        jac = jax.lax.cond(own, lambda: jaccard_distance(v, row), lambda: encoded(q, s))
        return -((1.0 - lam) * jac + lam * (1.0 - g @ q))

    return jax.lax.map(one, (l2_normalise(queries), self_index))


@RERANKERS.register("alpha_qe")
def _alpha_qe(k: int = 10, alpha: float = 3.0) -> Scorer:
    def prepare(gallery):
        return {"g": l2_normalise(gallery)}, None

    def score(rows, shared, queries, self_index):
        return alpha_qe_scores(rows["g"], queries, self_index, min(k, rows["g"].shape[0]), alpha)

    return Scorer(name="alpha_qe", prepare=prepare, score=score, chunkable=False)


@RERANKERS.register("dba_alpha_qe")
def _dba_alpha_qe(k: int = 10, alpha: float = 3.0, qe_k: int = 10, qe_alpha: float = 3.0) -> Scorer:
    def prepare(gallery):
        g = l2_normalise(gallery)
        kk = min(k + 1, g.shape[0] - 1)  # one spare neighbour replaces the query's entry when removed
        nbr_s, nbr_i = _gallery_neighbours(g, kk)
        members = jnp.concatenate([jnp.arange(g.shape[0])[:, None], nbr_i], axis=1)  # (N, k+2)
        gram = neighbourhood_gram(g, members)
        return {"g": g, "members": members, "gram": gram, "nbr_w": weights_from_similarity(nbr_s, alpha)}, None

    def score(rows, shared, queries, self_index):
        n = rows["g"].shape[0]
        return dba_alpha_qe_scores(
            rows["g"], rows["members"], rows["gram"], rows["nbr_w"], queries, self_index,
            min(k, n - 2), alpha, min(qe_k, n), qe_alpha,
        )

    return Scorer(name="dba_alpha_qe", prepare=prepare, score=score, chunkable=False)


@RERANKERS.register("diffusion")
def _diffusion(k: int = 20, gamma: float = 3.0, k_query: int = 10, beta: float = 0.99, iterations: int = 20) -> Scorer:
    def prepare(gallery):
        g = l2_normalise(gallery)
        return {"g": g, "w": _mutual_knn_graph(g, min(k, g.shape[0] - 1), gamma)}, None

    def score(rows, shared, queries, self_index):
        return diffusion_scores(
            rows["g"], rows["w"], queries, self_index, min(k_query, rows["g"].shape[0]), gamma, beta, iterations
        )

    return Scorer(name="diffusion", prepare=prepare, score=score, chunkable=False)


@RERANKERS.register("k_reciprocal")
def _k_reciprocal(k1: int = 20, k2: int = 6, lam: float = 0.3) -> Scorer:
    def prepare(gallery):
        g = l2_normalise(gallery)
        c = g @ g.T
        present = jnp.ones(g.shape[0], bool)
        near = nearest_order(c, present, max(k1 + 1, k2) + 1)  # one spare: a query's own row leaves its lists
        return {"g": g, "c": c, "near": near, "v": kreciprocal_encoding(c, present, near, k1, k2)}, None

    def score(rows, shared, queries, self_index):
        return kreciprocal_scores(rows["g"], rows["c"], rows["near"], rows["v"], queries, self_index, k1, k2, lam)

    return Scorer(name="k_reciprocal", prepare=prepare, score=score, chunkable=False)


@functools.lru_cache(maxsize=None)
def build_reranker(name: str, **params) -> Scorer:
    """The re-ranker registered as `name`, with its documented defaults unless `params` override them.

    Cached, so repeated calls return the same Scorer (jitted ranking functions key on its identity).
    """
    return RERANKERS.get(name)(**params)
