"""Hubness correction for any chunkable scorer (`head.csls_k`)."""

from __future__ import annotations

import jax.numpy as jnp

from cbir_jax.scoring import ranking
from cbir_jax.scoring.scorers import Scorer


def with_csls(scorer: Scorer, k: int) -> Scorer:
    """CSLS hubness correction (Lample et al. 2018, "Word translation without parallel data"):
    score(q, g) - r(g), r(g) the mean similarity of g to its k nearest gallery neighbours under the same
    scorer. CSLS also subtracts the query's own r(q), a constant per query that does not change its ranking,
    so it is left out. An item that is close to everything (a hub) loses exactly that advantage.

    Leave-one-out: when the query is itself gallery item `self_index`, it is removed from every r(g) that
    counted it (the next neighbour takes its place), so no query sees its own entry. `prepare` scores the
    gallery against itself: O(N^2) once per gallery.
    """
    if not scorer.chunkable:
        raise ValueError(f"head.csls_k: {scorer.name} needs the whole gallery at once; CSLS wraps chunkable scorers")

    def prepare(gallery):
        state = scorer.prepare(gallery)
        sims, ids = ranking.gallery_neighbours(scorer, state, jnp.asarray(gallery, jnp.float32), k + 1)
        rows, shared = state
        pos = jnp.arange(gallery.shape[0], dtype=jnp.int32)
        return {"inner": rows, "nbr_s": sims, "nbr_i": ids, "pos": pos}, shared

    def score(rows, shared, queries, self_index):
        s = scorer.score(rows["inner"], shared, queries, self_index)
        kk = min(k, rows["nbr_s"].shape[1])
        # self_index is relative to this chunk of rows; the neighbour ids are gallery positions.
        query_id = jnp.where(self_index >= -rows["pos"][0], self_index + rows["pos"][0], -1)
        nbr_s, nbr_i = rows["nbr_s"], rows["nbr_i"]
        hit = nbr_i[None, :, :kk] == query_id[:, None, None]  # (B, n, k): the query is among g's k neighbours
        top = jnp.sum(nbr_s[:, :kk], axis=-1)[None, :]
        spare = nbr_s[:, kk][None, :] if nbr_s.shape[1] > kk else jnp.zeros_like(top)
        r = (top - jnp.sum(jnp.where(hit, nbr_s[None, :, :kk], 0.0), axis=-1) + jnp.any(hit, -1) * spare) / kk
        return s - r

    return Scorer(name=scorer.name, prepare=prepare, score=score, chunkable=True)
