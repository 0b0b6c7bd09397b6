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
