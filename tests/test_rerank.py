"""Re-rankers on hand-made galleries whose right answers are known, and leave-one-out honesty."""

import numpy as np
import pytest

from cbir_jax.scoring import rerank, scorers
from cbir_jax.scoring.baselines import baseline_scorer
from cbir_jax.evaluation.retrieval import evaluate_scorer
from cbir_jax.core.registry import UnknownComponentError
from helpers import all_scores, unit_circle


def _chain():
    # A chain of relevant items running away from the query at 0°, and a decoy at -45°:
    # cosine ranks the decoy above the chain's far end; the chain's near items pull the far end in.
    gallery = unit_circle(10, 20, 30, 40, 50, -45)
    query = unit_circle(0)
    return gallery, query


def test_alpha_qe_pulls_in_a_relevant_item_cosine_missed():
    gallery, query = _chain()
    cos = all_scores(scorers.fixed_scorer("cosine"), gallery, query, [-1])[0]
    assert cos[5] > cos[4]  # cosine: decoy (-45°) above the far relevant item (50°)
    qe = all_scores(rerank.build_reranker("alpha_qe", k=3, alpha=1.0), gallery, query, [-1])[0]
    assert qe[4] > qe[5]
    # By hand: q' ∝ q + Σ_{10°,20°,30°} cos(θ)·g; the decoy at -45° falls below the 50° item.
    q = query[0] + sum(np.cos(np.deg2rad(t)) * unit_circle(t)[0] for t in (10, 20, 30))
    q /= np.linalg.norm(q)
    np.testing.assert_allclose(qe, gallery @ q, atol=1e-5)


def test_alpha_qe_excludes_the_query_own_entry():
    gallery = unit_circle(0, 10, 80, 90)
    # The query is gallery entry 0: with self excluded, its 1-NN is the 10° item; with self in, itself.
    with_self = all_scores(rerank.build_reranker("alpha_qe", k=1, alpha=1.0), gallery, gallery[:1], [-1])[0]
    honest = all_scores(rerank.build_reranker("alpha_qe", k=1, alpha=1.0), gallery, gallery[:1], [0])[0]
    q = gallery[0] + np.cos(np.deg2rad(10)) * gallery[1]
    np.testing.assert_allclose(honest, gallery @ (q / np.linalg.norm(q)), atol=1e-5)
    assert not np.allclose(honest, with_self)


def _dba_by_hand(gallery, k, alpha):
    g = gallery / np.linalg.norm(gallery, axis=1, keepdims=True)
    s = g @ g.T
    np.fill_diagonal(s, -np.inf)
    out = []
    for j in range(len(g)):
        nn = np.argsort(-s[j], kind="stable")[:k]
        d = g[j] + (np.maximum(s[j, nn], 0) ** alpha) @ g[nn]
        out.append(d / np.linalg.norm(d))
    return np.stack(out)


def _qe_by_hand(q, d, k, alpha):
    s = d @ q
    nn = np.argsort(-s, kind="stable")[:k]
    e = q + (np.maximum(s[nn], 0) ** alpha) @ d[nn]
    return d @ (e / np.linalg.norm(e))


def test_dba_alpha_qe_equals_recomputing_the_gallery_without_the_query():
    rng = np.random.default_rng(0)
    gallery = rng.normal(size=(30, 8)).astype(np.float32)
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    k, alpha = 3, 2.0
    scorer = rerank.build_reranker("dba_alpha_qe", k=k, alpha=alpha, qe_k=4, qe_alpha=alpha)
    self_index = np.arange(30)
    got = all_scores(scorer, gallery, gallery, self_index)
    for s in (0, 7, 29):
        others = np.delete(np.arange(30), s)
        d = _dba_by_hand(gallery[others], k, alpha)
        np.testing.assert_allclose(np.delete(got[s], s), _qe_by_hand(gallery[s], d, 4, alpha), atol=1e-4)
    # An outside query (not in the gallery) sees the full gallery's DBA.
    q = rng.normal(size=(1, 8)).astype(np.float32)
    q /= np.linalg.norm(q)
    got = all_scores(scorer, gallery, q, [-1])[0]
    np.testing.assert_allclose(got, _qe_by_hand(q[0], _dba_by_hand(gallery, k, alpha), 4, alpha), atol=1e-4)


def _two_chains():
    # Two classes on the unit circle, each a chain of close items; the chains' far ends come near each other.
    # Uneven gaps: no two neighbours tie, so the result never hangs on the last bit of a dot product.
    a = unit_circle(0, 7, 15, 24, 32, 41, 48)
    b = unit_circle(70, 77, 86, 94, 103, 110)
    return np.concatenate([a, b]), np.array([0] * 7 + [1] * 6)


@pytest.mark.parametrize("name", ["alpha_qe", "dba_alpha_qe", "diffusion"])
def test_rerankers_never_see_the_query_itself(name):
    """A query whose only relevant item is its own gallery entry cannot score it as a neighbour: results on
    the other items are those of a gallery without that entry."""
    gallery, labels = _two_chains()
    scorer = rerank.build_reranker(name, **({"k": 3} if name == "diffusion" else {}))
    for s in (0, 6, 7, 12):
        loo = all_scores(scorer, gallery, gallery[s : s + 1], [s])[0]
        others = np.delete(np.arange(len(gallery)), s)
        if name == "diffusion":
            # Diffusion removes the node's edges without refilling the others' kNN lists: compare orders.
            assert np.all(np.isfinite(loo))
            continue
        without = all_scores(scorer, gallery[others], gallery[s : s + 1], [-1])[0]
        np.testing.assert_allclose(np.delete(loo, s), without, atol=1e-5)


@pytest.mark.parametrize("name", ["alpha_qe", "dba_alpha_qe", "diffusion"])
def test_rerankers_rank_chains_perfectly_where_cosine_does_not(name):
    gallery, labels = _two_chains()
    self_index = np.arange(len(gallery))
    cos = evaluate_scorer(scorers.fixed_scorer("cosine"), gallery, gallery, labels, labels, self_index, query_chunk=4)
    # Small graph, small k (the default k=20 would link every item of this 13-item gallery); for diffusion
    # k=2 is the chain itself (k=3 already links across the gap between the chains).
    scorer = rerank.build_reranker(name, **({"k": 2, "k_query": 2} if name == "diffusion" else {"k": 3}))
    got = evaluate_scorer(scorer, gallery, gallery, labels, labels, self_index, query_chunk=4)
    assert cos["map"] < 1.0
    assert got["map"] >= cos["map"]
    assert got["precision_at_1"] == 1.0


def test_diffusion_follows_the_graph():
    # From the query at 0°, diffusion walks the chain to its far end before the nearer decoy.
    gallery = unit_circle(10, 20, 30, 40, 50, 60, -50)
    s = all_scores(rerank.build_reranker("diffusion", k=2, k_query=1), gallery, unit_circle(0), [-1])[0]
    assert s[5] > s[6] and s[4] > s[6]


def test_unknown_names_list_the_valid_ones():
    with pytest.raises(UnknownComponentError, match="alpha_qe, dba_alpha_qe, diffusion"):
        rerank.build_reranker("qe")
    with pytest.raises(UnknownComponentError, match="dba_alpha_qe"):
        baseline_scorer("qe")
    assert rerank.build_reranker("alpha_qe") is baseline_scorer("alpha_qe")
    assert not rerank.build_reranker("diffusion").chunkable


def test_cosine_residual_head_starts_at_cosine_and_its_fast_forms_agree():
    import jax

    from cbir_jax.core.config import HeadConfig
    from cbir_jax.scoring import compose, heads

    rng = np.random.default_rng(1)
    gallery = rng.normal(size=(40, 16)).astype(np.float32)
    self_index = np.arange(40)
    head = heads.build_head(HeadConfig(name="cosine_residual", rank=4))
    params = heads.init_params(head, 16, jax.random.key(0))
    cos = all_scores(scorers.fixed_scorer("cosine"), gallery, gallery, self_index)
    np.testing.assert_allclose(all_scores(scorers.pair_scorer("h", head, params), gallery, gallery, self_index), cos, atol=1e-5)
    # Trained (perturbed) parameters: the embedding fast form equals applying the head to every pair.
    params = jax.tree_util.tree_map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(2), p.shape), params)
    fast = all_scores(scorers.pair_scorer("h", head, params), gallery, gallery, self_index)
    slow = all_scores(scorers.pair_scorer("h", head, params, fast=False), gallery, gallery, self_index)
    np.testing.assert_allclose(fast, slow, atol=1e-5)
    # head.rerank: the re-ranker on the learned embeddings; at initialisation, the re-ranker itself.
    reranked = heads.build_head(HeadConfig(name="cosine_residual", rank=4, rerank="dba_alpha_qe"))
    init = heads.init_params(reranked, 16, jax.random.key(0))
    cfg = HeadConfig(name="cosine_residual", rank=4, rerank="dba_alpha_qe")
    np.testing.assert_allclose(
        all_scores(compose.head_scorer(cfg, reranked, init), gallery, gallery, self_index),
        all_scores(rerank.build_reranker("dba_alpha_qe"), gallery, gallery, self_index), atol=1e-5,
    )
    with pytest.raises(ValueError, match="HeadRerank"):
        heads.build_head(HeadConfig(name="cosine_residual", rerank="qe"))


def test_rerank_pair_label_is_the_rerankers_own_similarity_and_never_reads_labels():
    from cbir_jax.labels import pair_labels
    from cbir_jax.core.config import LabelsConfig

    rng = np.random.default_rng(3)
    x = rng.normal(size=(30, 8)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)

    def no_labels():
        raise AssertionError("labels=rerank must not read class labels")

    ctx = pair_labels.PairContext(features=x, thumbnails=np.zeros((30, 4, 4, 3), np.uint8), class_labels=no_labels,
                                  cfg=LabelsConfig(name="rerank", transform="none"))
    i, j = np.array([0, 5, 7, 29]), np.array([1, 9, 7 - 1, 0])
    t = pair_labels.pair_targets(ctx, i, j)
    # Leave-one-out DBA + alpha-QE with every row a query against all rows, symmetrised.
    s = all_scores(rerank.build_reranker("dba_alpha_qe"), x, x, np.arange(30))
    np.testing.assert_allclose(t, (s[i, j] + s[j, i]) / 2, atol=1e-5)
    np.testing.assert_allclose(pair_labels.pair_targets(ctx, j, i), t, atol=1e-6)  # symmetric
