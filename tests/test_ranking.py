"""Chunked top-k ranking against a plain argsort, and the scorers' fast forms against the pair form."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cbir_jax.scoring import heads, ranking, scorers
from cbir_jax.core.config import HeadConfig


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(203, 12)).astype(np.float32), rng.normal(size=(5, 12)).astype(np.float32)


@pytest.mark.parametrize("name", ["cosine", "euclid", "ssim", "ssim_ratio"])
def test_top_k_matches_argsort(data, name):
    gallery, queries = data
    scorer = scorers.fixed_scorer(name)
    s, i = ranking.search(scorer, gallery, queries, k=7, chunk=50)  # 50 does not divide 203
    dense = np.asarray(heads.FIXED_METRICS[name](queries[:, None], gallery[None]))
    expected = np.argsort(-dense, axis=1, kind="stable")[:, :7]
    np.testing.assert_array_equal(i, expected)
    np.testing.assert_allclose(s, np.take_along_axis(dense, expected, 1), rtol=1e-4, atol=1e-5)


def test_fewer_items_than_k_pad_with_minus_one(data):
    gallery, queries = data
    s, i = ranking.search(scorers.fixed_scorer("cosine"), gallery[:3], queries, k=5)
    assert (i[:, 3:] == -1).all() and np.isneginf(s[:, 3:]).all()
    assert sorted(i[0, :3].tolist()) == [0, 1, 2]


def test_exclude_self(data):
    gallery, _ = data
    scorer = scorers.fixed_scorer("cosine")
    state = scorer.prepare(jnp.asarray(gallery))
    _, i = ranking.top_k(scorer, state, jnp.asarray(gallery[:4]), k=3, chunk=64,
                         self_index=jnp.arange(4, dtype=jnp.int32), exclude_self=True)
    assert not any(r in row for r, row in enumerate(np.asarray(i)))


@pytest.mark.parametrize("head_name", ["mlp", "simnet"])
def test_learned_head_ranking_equals_pairwise_application(data, head_name):
    gallery, queries = data
    head = heads.build_head(HeadConfig(name=head_name, hidden=[16, 8]))
    params = heads.init_params(head, 12, jax.random.key(1))
    fast = scorers.pair_scorer(head_name, head, params)
    naive = scorers.pair_scorer(head_name, head, params, fast=False)
    dense = np.asarray(head.apply({"params": params}, queries[:, None], gallery[None]))
    for scorer in (fast, naive):
        full = ranking.score_all(scorer, scorer.prepare(jnp.asarray(gallery)), jnp.asarray(queries), jnp.full((5,), -1), chunk=64)
        np.testing.assert_allclose(np.asarray(full), dense, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("c, k", [(4096, 10), (5003, 10), (3000, 50), (1000, 1), (64, 5)])
def test_two_stage_selection_equals_lax_top_k(c, k):
    """`_select` (block maxima, then the best blocks' entries) returns exactly `lax.top_k`, ties and -inf
    included: ties go to the lower column, as in one top-k over every score."""
    rng = np.random.default_rng(c + k)
    s = rng.integers(0, 50, size=(6, c)).astype(np.float32)  # many exact ties
    s[1] = 3.0  # a row of one value
    s[2, : c // 2] = -np.inf  # masked entries
    s[3] = -np.inf  # nothing eligible
    got = ranking._select(jnp.asarray(s.T), k)  # (c, B): one column per query
    want = jax.lax.top_k(jnp.asarray(s), min(k, c))
    np.testing.assert_array_equal(np.asarray(got[0]), np.asarray(want[0]))
    np.testing.assert_array_equal(np.asarray(got[1]), np.asarray(want[1]))


@pytest.mark.parametrize("chunk", [None, 64, 1000])
def test_top_k_with_ties_equals_stable_argsort(chunk):
    """Small-integer features, so every inner product is exact and repeated rows tie exactly: ranked in one
    step or in chunks, the lower row wins every tie, as a stable argsort says; the query's own row is left out."""
    rng = np.random.default_rng(3)
    gallery = np.concatenate([rng.integers(-3, 4, size=(300, 12))] * 7)[:2003].astype(np.float32)
    queries = gallery[[5, 305, 1999, 42]]
    self_index = np.array([5, 305, 1999, 42], np.int32)
    dense = queries @ gallery.T
    dense[np.arange(4), self_index] = -np.inf
    s, i = ranking.top_k(scorers.DOT, scorers.DOT.prepare(jnp.asarray(gallery)), jnp.asarray(queries), k=12,
                         chunk=chunk, self_index=jnp.asarray(self_index), exclude_self=True)
    expected = np.argsort(-dense, axis=1, kind="stable")[:, :12]
    np.testing.assert_array_equal(np.asarray(i), expected)
    np.testing.assert_array_equal(np.asarray(s), np.take_along_axis(dense, expected, 1))
