"""Ranking a gallery streamed chunk by chunk (`ranking.top_k_streamed`) equals ranking it in memory, for every
row-local scorer kind; scorers that need the whole gallery are refused."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cbir_jax.core.config import HeadConfig
from cbir_jax.scoring import heads, ranking, rerank, scorers


def _chunks(x: np.ndarray, rows: int):
    for first in range(0, len(x), rows):
        yield first, x[first:first + rows]


def _scorers() -> list[scorers.Scorer]:
    mlp = heads.build_head(HeadConfig(name="mlp", hidden=[16]))
    params = heads.init_params(mlp, 12, jax.random.key(3))
    return [scorers.fixed_scorer("cosine"), scorers.fixed_scorer("euclid"), scorers.fixed_scorer("ssim_ratio"),
            scorers.pair_scorer("mlp", mlp, params), scorers.with_storage(scorers.fixed_scorer("cosine"), "bfloat16")]


@pytest.mark.parametrize("scorer", _scorers(), ids=lambda s: s.name)
def test_streamed_top_k_equals_the_in_memory_top_k(scorer):
    rng = np.random.default_rng(0)
    gallery = rng.normal(size=(203, 12)).astype(np.float32)  # 203 = 4 chunks of 50 and a last one of 3
    queries = gallery[[5, 77, 202]] + 0.01 * rng.normal(size=(3, 12)).astype(np.float32)
    expect_s, expect_i = ranking.top_k(scorer, scorer.prepare(jnp.asarray(gallery)), jnp.asarray(queries), k=7, chunk=64)
    s, i = ranking.top_k_streamed(scorer, _chunks(gallery, 50), queries, 7, rows_per_chunk=50)
    np.testing.assert_array_equal(i, np.asarray(expect_i))
    np.testing.assert_allclose(s, np.asarray(expect_s), rtol=1e-5, atol=1e-4)  # euclid near 0: sqrt of a rounded difference
    # a query that is a gallery row leaves itself out, as top_k's exclude_self does
    self_index = np.asarray([5, 77, 202], np.int32)
    expect_s, expect_i = ranking.top_k(scorer, scorer.prepare(jnp.asarray(gallery)), jnp.asarray(gallery[self_index]), k=7,
                                       chunk=64, self_index=jnp.asarray(self_index), exclude_self=True)
    s, i = ranking.top_k_streamed(scorer, _chunks(gallery, 50), gallery[self_index], 7, rows_per_chunk=50,
                                  self_index=self_index)
    np.testing.assert_array_equal(i, np.asarray(expect_i))
    assert not (i == self_index[:, None]).any()


def test_a_host_transform_is_applied_to_each_chunk_and_a_short_gallery_pads_with_minus_one():
    rng = np.random.default_rng(1)
    gallery = rng.normal(size=(4, 6)).astype(np.float32)
    double = lambda x: 2 * x  # noqa: E731
    s, i = ranking.top_k_streamed(scorers.fixed_scorer("euclid"), _chunks(gallery, 3), 2 * gallery[:1], 6,
                                  rows_per_chunk=3, transform=double)
    assert i[0, 0] == 0 and s[0, 0] == pytest.approx(0.0, abs=1e-5)  # the transformed row 0 is the query itself
    assert list(i[0, 4:]) == [-1, -1] and np.all(np.isneginf(s[0, 4:]))


def test_scorers_that_need_the_whole_gallery_are_refused():
    with pytest.raises(ValueError, match="whole gallery"):
        ranking.top_k_streamed(rerank.build_reranker("dba_alpha_qe"), _chunks(np.zeros((4, 3), np.float32), 2),
                               np.zeros((1, 3), np.float32), 2, rows_per_chunk=2)
