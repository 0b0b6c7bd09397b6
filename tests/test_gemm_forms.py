"""The learned heads' GEMM forms equal applying the head to every pair, over shapes, depths, activations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cbir_jax.scoring import heads, ranking, scorers
from cbir_jax.core.config import HeadConfig


def _setup(head_name, dim, hidden, activation="relu", seed=0, n=97, b=5, mean=0.0):
    rng = np.random.default_rng(seed)
    gallery = (mean + rng.normal(size=(n, dim))).astype(np.float32)
    queries = (mean + rng.normal(size=(b, dim))).astype(np.float32)
    head = heads.build_head(HeadConfig(name=head_name, hidden=list(hidden), activation=activation))
    params = heads.init_params(head, dim, jax.random.key(seed))
    return head, params, gallery, queries


def _dense(head, params, gallery, queries):
    return np.asarray(head.apply({"params": params}, queries[:, None], gallery[None]))


def _fast_scores(head, params, gallery, queries, chunk=32):
    scorer = scorers.pair_scorer("h", head, params)
    state = scorer.prepare(jnp.asarray(gallery))
    self_index = jnp.full((len(queries),), -1, jnp.int32)
    return np.asarray(ranking.score_all(scorer, state, jnp.asarray(queries), self_index, chunk=chunk))


def _close(got, want, rtol=2e-4):
    # float32 tolerance relative to the scores' spread (the expansion sums terms of that size)
    np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * (np.abs(want).max() + 1e-6))


@pytest.mark.parametrize("head_name", ["mlp", "simnet"])
@pytest.mark.parametrize("dim, hidden, activation", [
    (12, [16], "relu"), (12, [16, 8], "gelu"), (64, [32, 16, 8], "tanh"), (200, [128], "relu"), (7, [3, 5], "silu"),
])
def test_fast_form_equals_pairwise(head_name, dim, hidden, activation):
    head, params, gallery, queries = _setup(head_name, dim, hidden, activation)
    assert scorers.form_key(head) in scorers.FAST_FORMS
    _close(_fast_scores(head, params, gallery, queries), _dense(head, params, gallery, queries))


@pytest.mark.parametrize("head_name", ["mlp", "simnet"])
@pytest.mark.parametrize("b", [1, 3, 8, 11])
def test_query_blocks(monkeypatch, head_name, b):
    # 16 columns with H=8 -> blocks of 2 queries: odd counts exercise the padded last block
    monkeypatch.setattr(scorers, "PAIR_GEMM_COLUMNS", 16)
    head, params, gallery, queries = _setup(head_name, 12, [8, 4], b=b, seed=b)
    _close(_fast_scores(head, params, gallery, queries), _dense(head, params, gallery, queries))


def test_near_duplicates_with_a_large_mean():
    # q ~ g and features far from 0: the expansion's worst case for cancellation (centring handles it)
    head, params, gallery, _ = _setup("mlp", 256, [64], mean=20.0)
    queries = gallery[:6] + 1e-3 * np.random.default_rng(1).normal(size=(6, 256)).astype(np.float32)
    want = _dense(head, params, gallery, queries)
    got = _fast_scores(head, params, gallery, queries)
    _close(got, want)
    np.testing.assert_array_equal(got.argmax(1), want.argmax(1))


def test_mlp_layers_are_in_numeric_order():
    head, params, _, _ = _setup("mlp", 4, [3] * 11)  # Dense_0 .. Dense_11: "Dense_10" sorts before "Dense_2"
    widths = [w.shape for w, _ in scorers.mlp_layers(params)]
    assert widths == [(4, 3)] + [(3, 3)] * 10 + [(3, 1)]


@pytest.mark.parametrize("head_name", ["mlp", "simnet"])
def test_top_k_fast_equals_naive(head_name):
    head, params, gallery, queries = _setup(head_name, 24, [16, 8], n=203, b=4)
    fast = scorers.pair_scorer("f", head, params)
    naive = scorers.pair_scorer("n", head, params, fast=False)
    s1, i1 = ranking.search(fast, gallery, queries, k=10, chunk=50)
    s2, i2 = ranking.search(naive, gallery, queries, k=10, chunk=50)
    np.testing.assert_array_equal(i1, i2)
    np.testing.assert_allclose(s1, s2, rtol=1e-4, atol=1e-5)


def _perturbed(params, seed=3, scale=0.1):
    """Parameters away from their initial values (zero-initialised corrections would hide a wrong form)."""
    leaves, tree = jax.tree_util.tree_flatten(params)
    keys = jax.random.split(jax.random.key(seed), max(len(leaves), 1))
    return jax.tree_util.tree_unflatten(tree, [p + scale * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


@pytest.mark.parametrize("overrides", [
    {"name": "mlp", "residual": True, "monotone": True},
    {"name": "mlp", "residual": True, "monotone": False, "base": "euclid"},
    {"name": "mlp", "residual": False, "monotone": False},
    {"name": "simnet", "residual": True},
    {"name": "simnet"},
    {"name": "cosine_residual", "rank": 4},
    {"name": "cosine_residual", "rank": 4, "rerank": "alpha_qe"},
    {"name": "cosine_residual", "rank": 4, "rerank": "dba_alpha_qe"},
    {"name": "cosine_residual", "rank": 4, "rerank": "diffusion"},
    {"name": "mlp", "residual": True, "monotone": True, "csls_k": 5},
    {"name": "cosine_residual", "rank": 4, "csls_k": 5},
    {"name": "cosine", "csls_k": 5},
    {"name": "ssim_ratio"},
], ids=lambda o: "-".join(f"{k}={v}" for k, v in o.items()))
def test_fast_changes_speed_never_results(overrides):
    """Every head and scoring option (head.rerank, head.csls_k) scores the same with `fast=False`,
    leave-one-out queries included."""
    from cbir_jax.scoring import compose

    cfg = HeadConfig(**{"hidden": [16, 8], **overrides})
    head = heads.build_head(cfg)
    dim = 12
    params = heads.init_params(head, dim, jax.random.key(0))
    params = _perturbed(params) if params else params
    gallery = np.random.default_rng(0).normal(size=(41, dim)).astype(np.float32)
    self_index = jnp.arange(7, dtype=jnp.int32)  # the first 7 gallery rows are the queries
    scores = []
    for fast in (True, False):
        scorer = compose.head_scorer(cfg, head, params, fast=fast)
        state = scorer.prepare(jnp.asarray(gallery))
        scores.append(np.asarray(ranking.score_all(scorer, state, jnp.asarray(gallery[:7]), self_index, chunk=16)))
    _close(scores[0], scores[1])
