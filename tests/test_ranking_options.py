"""Ranking options: half-precision gallery storage and the cheap shortlist + exact re-rank."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cbir_jax.scoring import heads, ranking, scorers
from cbir_jax.core.config import HeadConfig


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(301, 16)).astype(np.float32), rng.normal(size=(6, 16)).astype(np.float32)


def _mlp(dim=16):
    head = heads.build_head(HeadConfig(name="mlp", hidden=[32, 8]))
    return scorers.pair_scorer("mlp", head, heads.init_params(head, dim, jax.random.key(3)))


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("name", ["cosine", "euclid", "mlp"])
def test_half_storage_is_close_to_float32(data, dtype, name):
    gallery, queries = data
    scorer = _mlp() if name == "mlp" else scorers.fixed_scorer(name)
    stored = scorers.with_storage(scorer, dtype)
    rows, _ = stored.prepare(jnp.asarray(gallery))
    assert rows["g"].dtype == dtype
    assert all(leaf.dtype == jnp.float32 for key, leaf in rows.items() if key != "g")  # derived terms stay f32
    si = jnp.full((6,), -1, jnp.int32)
    full = np.asarray(ranking.score_all(scorer, scorer.prepare(jnp.asarray(gallery)), jnp.asarray(queries), si, chunk=64))
    half = np.asarray(ranking.score_all(stored, stored.prepare(jnp.asarray(gallery)), jnp.asarray(queries), si, chunk=64))
    assert half.dtype == np.float32
    tol = 2.0 ** -7 if dtype == jnp.bfloat16 else 2.0 ** -10
    np.testing.assert_allclose(half, full, atol=8 * tol * np.abs(full).max())
    _, i_full = ranking.search(scorer, gallery, queries, k=10, chunk=64)
    _, i_half = ranking.search(scorer, gallery, queries, k=10, chunk=64, storage_dtype=dtype)
    recall = np.mean([len(set(a) & set(b)) / 10 for a, b in zip(i_full, i_half)])
    assert recall >= 0.8


def test_shortlist_of_everything_is_the_exact_ranking(data):
    gallery, queries = data
    cheap, exact = scorers.fixed_scorer("cosine"), _mlp()
    g = jnp.asarray(gallery)
    cs, es = cheap.prepare(g), exact.prepare(g)
    s, i = ranking.shortlist_rerank(cheap, cs, exact, es, jnp.asarray(queries), k=10, m=301, chunk=64)
    want_s, want_i = ranking.top_k(exact, es, jnp.asarray(queries), k=10, chunk=64)
    np.testing.assert_array_equal(np.asarray(i), np.asarray(want_i))
    np.testing.assert_allclose(np.asarray(s), np.asarray(want_s), rtol=1e-5, atol=1e-6)


def test_shortlist_rescores_only_the_shortlist(data):
    gallery, queries = data
    cheap, exact = scorers.fixed_scorer("cosine"), _mlp()
    g, q = jnp.asarray(gallery), jnp.asarray(queries)
    cs, es = cheap.prepare(g), exact.prepare(g)
    s, i = (np.asarray(x) for x in ranking.shortlist_rerank(cheap, cs, exact, es, q, k=5, m=20, chunk=64))
    _, short = ranking.top_k(cheap, cs, q, k=20, chunk=64)
    dense = np.asarray(exact.score(es[0], es[1], q, None))  # every exact score, (6, 301)
    for b in range(len(queries)):
        cand = np.asarray(short[b])
        want = cand[np.argsort(-dense[b, cand], kind="stable")[:5]]
        np.testing.assert_array_equal(i[b], want)
        np.testing.assert_allclose(s[b], dense[b, want], rtol=1e-5, atol=1e-6)
        assert (np.diff(s[b]) <= 0).all()


def test_shortlist_excludes_self_and_pads(data):
    gallery, _ = data
    cheap, exact = scorers.fixed_scorer("euclid"), _mlp()
    g = jnp.asarray(gallery[:4])
    s, i = ranking.shortlist_rerank(cheap, cheap.prepare(g), exact, exact.prepare(g), g[:2], k=5, m=6,
                                    self_index=jnp.arange(2, dtype=jnp.int32), exclude_self=True)
    i, s = np.asarray(i), np.asarray(s)
    assert 0 not in i[0] and 1 not in i[1]
    assert (i[:, 3:] == -1).all() and np.isneginf(s[:, 3:]).all()


def test_shortlist_needs_k_at_most_m(data):
    gallery, queries = data
    cheap = scorers.fixed_scorer("cosine")
    state = cheap.prepare(jnp.asarray(gallery))
    with pytest.raises(ValueError, match="k=10 must be <= m=5"):
        ranking.shortlist_rerank(cheap, state, cheap, state, jnp.asarray(queries), k=10, m=5)
