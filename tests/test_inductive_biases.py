"""Inductive-bias options: residual heads start at their metric, monotone heads never reward a difference,
CSLS removes hubs, per-query targets and the listwise loss see one query's order only. Every option
scores identically in its fast (GEMM) and naive (pair by pair) forms."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cbir_jax.scoring import compose, heads, ranking, scorers
from cbir_jax.scoring.hubness import with_csls
from cbir_jax.training import losses, pairs
from cbir_jax.labels import pair_labels
from cbir_jax.core.config import HeadConfig, LabelsConfig, LossConfig


def _unit(x):
    return (x / np.linalg.norm(x, axis=-1, keepdims=True)).astype(np.float32)


def _data(dim=16, n=60, b=7, seed=0):
    rng = np.random.default_rng(seed)
    return _unit(rng.normal(size=(n, dim))), _unit(rng.normal(size=(b, dim)))


def _build(dim=16, seed=0, **kw):
    cfg = HeadConfig(**{"hidden": [24, 8], **kw})
    head = heads.build_head(cfg)
    return cfg, head, heads.init_params(head, dim, jax.random.key(seed))


def _all_scores(scorer, gallery, queries, self_index=None, chunk=25):
    state = scorer.prepare(jnp.asarray(gallery))
    si = np.full(len(queries), -1, np.int32) if self_index is None else np.asarray(self_index, np.int32)
    return np.array(ranking.score_all(scorer, state, jnp.asarray(queries), jnp.asarray(si), chunk=chunk))


def _perturbed(params, seed=1, scale=0.3):
    """Random parameters of the same structure (negative kernels included), as after some training."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree_util.tree_unflatten(tree, [x + scale * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)])


@pytest.mark.parametrize("name", ["mlp", "simnet"])
@pytest.mark.parametrize("base", ["cosine", "euclid"])
def test_zero_initialised_residual_head_ranks_exactly_like_its_base(name, base):
    gallery, queries = _data()
    cfg, head, params = _build(name=name, residual=True, base=base)
    got = _all_scores(scorers.pair_scorer("r", head, params), gallery, queries)
    want = _all_scores(scorers.fixed_scorer(base), gallery, queries)
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(np.argsort(-got, 1, kind="stable"), np.argsort(-want, 1, kind="stable"))
    # ... and the correction is a real one: after an update the ranking can differ from the base
    moved = _all_scores(scorers.pair_scorer("r", head, _perturbed(params)), gallery, queries)
    assert not np.allclose(moved - moved.mean(1, keepdims=True), want - want.mean(1, keepdims=True), atol=1e-3)


@pytest.mark.parametrize("activation", ["relu", "tanh"])
def test_monotone_residual_head_starts_exactly_at_its_base_and_can_move(activation):
    gallery, queries = _data()
    cfg, head, params = _build(name="mlp", residual=True, monotone=True, activation=activation)
    got = _all_scores(scorers.pair_scorer("r", head, params), gallery, queries)
    want = _all_scores(scorers.fixed_scorer("cosine"), gallery, queries)
    np.testing.assert_allclose(got, want, atol=1e-6)
    np.testing.assert_array_equal(np.argsort(-got, 1, kind="stable"), np.argsort(-want, 1, kind="stable"))
    # the zero first layer still receives gradients (a zero monotone *output* layer would not)
    q, g = jnp.asarray(queries[:, None]), jnp.asarray(gallery[None])
    grads = jax.grad(lambda p: jnp.sum(head.apply({"params": p}, q, g) * jnp.asarray(want)))(params)
    assert float(jnp.abs(grads["correction"]["mlp"]["Dense_0"]["kernel"]).sum()) > 0


def test_seed_architecture_is_still_selectable():
    _, head, params = _build(name="mlp", residual=False)
    assert isinstance(head, heads.SquaredDifferenceMLP) and set(params) == {"mlp"}


@pytest.mark.parametrize("activation", ["relu", "tanh"])
@pytest.mark.parametrize("residual", [False, True])
def test_monotone_head_never_rises_with_a_difference(activation, residual):
    dim = 16
    _, head, params = _build(dim, name="mlp", monotone=True, activation=activation, residual=residual, base="euclid")
    params = _perturbed(params, scale=0.5)  # any parameters, negative raw kernels included
    rng = np.random.default_rng(0)
    q = 0.3 * rng.normal(size=(400, dim)).astype(np.float32)  # small enough that tanh does not saturate
    g = 0.3 * rng.normal(size=(400, dim)).astype(np.float32)
    k = rng.integers(0, dim, 400)
    g_far = g.copy()
    g_far[np.arange(400), k] += np.sign(g[np.arange(400), k] - q[np.arange(400), k]) * rng.uniform(0.01, 0.5, 400)
    near = np.asarray(head.apply({"params": params}, q, g))
    far = np.asarray(head.apply({"params": params}, q, g_far))
    assert np.all(far <= near + 1e-5)
    assert np.any(far < near - 1e-3)  # not constant


def test_monotone_rejects_non_monotone_activations():
    with pytest.raises(ValueError, match="monotone activation"):
        heads.build_head(HeadConfig(name="mlp", monotone=True, activation="gelu"))


@pytest.mark.parametrize("kw", [
    {"name": "mlp", "residual": True},
    {"name": "mlp", "residual": True, "base": "euclid", "monotone": True},
    {"name": "mlp", "monotone": True, "activation": "tanh"},
    {"name": "simnet", "residual": True},
    {"name": "mlp", "csls_k": 5},
    {"name": "mlp", "residual": True, "monotone": True, "csls_k": 3},
])
def test_every_option_scores_identically_fast_and_naive(kw):
    gallery, queries = _data(n=61)
    cfg, head, params = _build(**kw)
    params = _perturbed(params)
    self_index = np.array([3, -1, 60, 0, -1, 17, 30])
    queries = np.where((self_index >= 0)[:, None], gallery[np.maximum(self_index, 0)], queries)
    fast = compose.head_scorer(cfg, head, params)
    naive = compose.head_scorer(cfg, head, params, fast=False)
    if not kw.get("csls_k"):
        assert scorers.form_key(head) in scorers.FAST_FORMS
    want = _all_scores(naive, gallery, queries, self_index)
    np.testing.assert_allclose(_all_scores(fast, gallery, queries, self_index), want, rtol=2e-4, atol=2e-4 * np.abs(want).max())


def test_csls_matches_its_definition_with_leave_one_out():
    gallery, _ = _data(n=40, seed=3)
    k = 4
    scorer = with_csls(scorers.fixed_scorer("cosine"), k)
    queries = gallery[:10]
    got = _all_scores(scorer, gallery, queries, np.arange(10), chunk=16)
    sim = gallery @ gallery.T
    for b in range(10):
        for j in range(40):
            others = [m for m in range(40) if m not in (j, b)]  # g's neighbours, the query's entry removed
            r = np.sort(sim[j, others])[::-1][:k].mean()
            assert got[b, j] == pytest.approx(sim[b, j] - r, abs=1e-5)


def test_csls_demotes_a_hub():
    # Points spread around a common direction; the item *at* that direction is close to all of them (a hub).
    rng = np.random.default_rng(0)
    d = 32
    centre = np.eye(d)[0]
    gallery = _unit(np.concatenate([centre + 1.5 * rng.normal(size=(60, d)) / np.sqrt(d), centre[None]]))
    queries = gallery[:60]

    def hub_share(scorer):  # share of queries with the hub in their top 5
        s = _all_scores(scorer, gallery, queries, np.arange(60), chunk=61)
        s[np.arange(60), np.arange(60)] = -np.inf
        return np.mean(np.any(np.argsort(-s, 1)[:, :5] == 60, axis=1))

    assert hub_share(scorers.fixed_scorer("cosine")) > 0.7
    assert hub_share(with_csls(scorers.fixed_scorer("cosine"), 5)) < 0.1


def test_per_query_targets_are_ranked_within_each_anchor():
    rng = np.random.default_rng(0)
    feats = _unit(rng.normal(size=(30, 8)))
    nbrs = pairs.neighbours(feats, 5)
    i, j = pairs.sample_anchor_groups(rng, 30, 6, 8, 0.5, nbrs)
    assert i.shape == j.shape == (6, 8)
    assert np.all(i == i[:, :1]) and np.all(i != j)
    for a in range(6):
        assert set(j[a, :4]) <= set(nbrs[i[a, 0]])
    ctx = pair_labels.PairContext(feats, np.zeros((30, 4, 4, 3), np.uint8), lambda: None,
                                  dataclasses.replace(LabelsConfig(name="euclid"), per_query=True))
    t = pair_labels.pair_targets(ctx, i, j)
    raw = -np.linalg.norm(feats[i] - feats[j], axis=-1)
    for a in range(6):
        # each anchor's candidates are ranked on their own: quantiles in [0, 1] with mean 1/2 (ties averaged)
        assert t[a].min() == 0.0 and t[a].max() <= 1.0 and t[a].mean() == pytest.approx(0.5)
        order = np.sign(raw[a][:, None] - raw[a][None, :])
        np.testing.assert_array_equal(np.sign(t[a][:, None] - t[a][None, :]), order)  # same order, ties kept
    with pytest.raises(ValueError, match="per_anchor"):
        pair_labels.pair_targets(ctx, i.ravel(), j.ravel())


def test_rank_transform_gives_ties_one_target():
    t = pair_labels.transform_targets("rank", np.array([0, 1, 0, 0, 1], np.float32))
    np.testing.assert_allclose(t, [0.25, 0.875, 0.25, 0.25, 0.875])


def test_listwise_loss_sees_each_querys_order_only():
    loss = losses.get_loss(LossConfig(name="listwise", temperature=0.1))
    target = jnp.array([[1.0, 0.5, 0.0], [0.0, 1.0, 0.5]])
    right = target * 2.0
    wrong = -target
    assert float(loss(right, target)) < float(loss(wrong, target))
    shifted = right + jnp.array([[5.0], [-3.0]])  # a per-query offset (the query's own a_i) changes nothing
    assert float(loss(shifted, target)) == pytest.approx(float(loss(right, target)), rel=1e-6)
    with pytest.raises(ValueError, match="per_anchor"):
        loss(right.ravel(), target.ravel())
