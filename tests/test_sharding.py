"""The gallery sharded over 8 CPU devices (conftest) ranks exactly as on one device."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cbir_jax.scoring import heads, ranking, scorers, sharding
from cbir_jax.core.config import HeadConfig


@pytest.fixture
def data():
    rng = np.random.default_rng(0)
    return rng.normal(size=(203, 12)).astype(np.float32), rng.normal(size=(5, 12)).astype(np.float32)


def _scorer(name):
    if name in heads.FIXED_METRICS:
        return scorers.fixed_scorer(name)
    head = heads.build_head(HeadConfig(name=name, hidden=[16, 8]))
    return scorers.pair_scorer(name, head, heads.init_params(head, 12, jax.random.key(1)))


def test_eight_devices_are_present():
    assert jax.device_count() == 8  # tests/conftest.py forces 8 host devices


@pytest.mark.parametrize("name", ["cosine", "euclid", "ssim", "mlp", "simnet"])
@pytest.mark.parametrize("chunk", [7, 4096])  # several chunks per shard (7 does not divide 26), and one
def test_sharded_equals_one_device(data, name, chunk):
    gallery, queries = data  # 203 rows: 8 shards of 26, the last 5 rows padding
    scorer = _scorer(name)
    expected_s, expected_i = ranking.search(scorer, gallery, queries, k=9, chunk=64)
    s, i = sharding.sharded_search(scorer, gallery, queries, k=9, chunk=chunk)
    np.testing.assert_array_equal(i, expected_i)
    np.testing.assert_allclose(s, expected_s, rtol=1e-5, atol=1e-6)


def test_state_is_sharded_and_result_replicated(data):
    gallery, queries = data
    scorer = scorers.fixed_scorer("cosine")
    mesh = sharding.gallery_mesh()
    sg = sharding.distribute(gallery, mesh)
    assert sg.n == 203 and sg.features.shape == (208, 12)
    rows, shared, ids = state = sharding.prepare(scorer, sg)
    assert len(rows["g"].addressable_shards) == 8 and rows["g"].addressable_shards[0].data.shape == (26, 12)
    assert int((np.asarray(ids) >= 0).sum()) == 203
    s, i = sharding.sharded_top_k(scorer, state, queries, k=3)
    assert s.sharding.is_fully_replicated and i.sharding.is_fully_replicated


def test_exclude_self_and_padding(data):
    gallery, _ = data
    scorer = scorers.fixed_scorer("cosine")
    small = gallery[:5]  # fewer rows than devices x k: most shards hold only padding
    state = sharding.prepare(scorer, sharding.distribute(small, sharding.gallery_mesh()))
    s, i = sharding.sharded_top_k(scorer, state, small[:2], k=6, self_index=np.arange(2), exclude_self=True)
    s, i = np.asarray(s), np.asarray(i)
    assert 0 not in i[0] and 1 not in i[1]
    assert (i[:, 4:] == -1).all() and np.isneginf(s[:, 4:]).all()
    expected = ranking.top_k(scorer, scorer.prepare(jnp.asarray(small)), jnp.asarray(small[:2]), k=6,
                             self_index=jnp.arange(2, dtype=jnp.int32), exclude_self=True)
    np.testing.assert_array_equal(i, np.asarray(expected[1]))


def test_unchunkable_scorer_is_refused(data):
    gallery, queries = data
    scorer = scorers.Scorer("dense", scorers.fixed_scorer("cosine").prepare, lambda *a: None, chunkable=False)
    state = sharding.prepare(scorer, sharding.distribute(gallery, sharding.gallery_mesh()))
    with pytest.raises(ValueError, match="cannot be sharded"):
        sharding.sharded_top_k(scorer, state, queries, k=3)
