"""k-reciprocal re-ranking (Zhong et al., CVPR 2017): a case worked by hand, the authors' released loop
transcribed, exact leave-one-out, and the ranking / evaluation / tuning entry points every re-ranker uses."""

import numpy as np
import pytest

from cbir_jax.evaluation import tuning
from cbir_jax.evaluation.retrieval import leave_one_out
from cbir_jax.scoring import ranking, rerank
from cbir_jax.scoring.baselines import baseline_names, baseline_scorer
from helpers import all_scores, unit_circle


# The hand-worked case. Eight points on the unit circle at A=0°, B=2°, C=8°, D=18°, E=30°, F=44°, G=64°,
# H=68° (a Golomb ruler x2: every pairwise gap differs, so no neighbour list has a tie; all within 68°, so
# the nearer in angle is the nearer in cosine). k1 = 6, so round(k1/2) = 3.
#
# Nearest lists of k1+1 = 7 items (the point itself first) are all 8 but the farthest one: H for A..E
# (each lies below 34°), A for F, G, H.
#   R(B, 6) = {y in list(B) : B in list(y)}: list(B) drops H, and B is in every list -> {A,B,C,D,E,F,G}.
#   R(H, 6): list(H) drops A; H is missing from the lists of B..E -> {F, G, H}.
# Nearest lists of 3+1 = 4 items: B {B,A,C,D}, A {A,B,C,D}, C {C,B,A,D}, D {D,C,E,B}, E {E,D,F,C},
#   F {F,E,G,H}, G {G,H,F,E}, H {H,G,F,E}.
#   R(F, 3) = {F,E,G,H} (F is in the lists of E, G and H);  R(G, 3) = {G,H,F} (G is not in E's list).
# 1/2 expansion of B: a member c of R(B, 6) adds R(c, 3) when |R(c,3) ∩ R(B,6)| > 2/3 |R(c,3)|.
#   c = F: {F,E,G} in R(B,6): 3 > 8/3, added -> H joins.   c = G: {G,F}: 2 > 2 fails (the strict rule).
#   R*(B) = all eight.
# 1/2 expansion of H: c = F: {F,G,H} in R(H,6): 3 > 8/3 -> E joins. c = G: R(G,3) ⊆ R(H,6), nothing new.
#   R*(H) = {E, F, G, H}.
# V_p(x) = exp(-(1 - cos(p, x))) on R*(p), normalised to sum 1; Jaccard(B, H) = 1 - Σ min / Σ max.
ANGLES = dict(A=0, B=2, C=8, D=18, E=30, F=44, G=64, H=68)


def _encoding(p, members):
    w = {x: np.exp(np.cos(np.deg2rad(ANGLES[p] - ANGLES[x])) - 1.0) for x in members}
    total = sum(w.values())
    return {x: w[x] / total if x in members else 0.0 for x in ANGLES}


def _jaccard(u, v):
    return 1.0 - sum(min(u[x], v[x]) for x in ANGLES) / sum(max(u[x], v[x]) for x in ANGLES)


def _hand_case():
    gallery = unit_circle(*ANGLES.values())
    full_b = _encoding("B", "ABCDEFGH")
    full_h = _encoding("H", "EFGH")
    return gallery, full_b, full_h


def test_hand_worked_case_without_query_expansion():
    gallery, v_b, v_h = _hand_case()
    jac = _jaccard(v_b, v_h)
    cos_bh = np.cos(np.deg2rad(66))
    assert jac == pytest.approx(0.73834, abs=1e-5)  # the sets above, the weights on a calculator
    lam = 0.3
    want = -((1 - lam) * jac + lam * (1 - cos_bh))
    scorer = rerank.build_reranker("k_reciprocal", k1=6, k2=1, lam=lam)
    # B as gallery row 1 (leave-one-out) and B as an outside query against the other seven: one set.
    loo = all_scores(scorer, gallery, gallery[1:2], [1])[0]
    others = np.delete(gallery, 1, axis=0)
    outside = all_scores(scorer, others, gallery[1:2], [-1])[0]
    assert loo[7] == pytest.approx(want, abs=1e-5)
    assert outside[6] == pytest.approx(want, abs=1e-5)
    np.testing.assert_allclose(np.delete(loo, 1), outside, atol=1e-5)


def test_hand_worked_case_with_local_query_expansion():
    # k2 = 2: each encoding becomes the mean of its own and its nearest neighbour's: B's is A (2°), H's is G (4°).
    # R*(A): R(A,6) = {A..E} (A is not in the lists of F, G, H); the only candidate that could add, E with
    # R(E,3) = {E,D,F}, has 2 > 2 false -> R*(A) = {A,B,C,D,E}.
    # R*(G): R(G,6) = {B..H}; c = B adds R(B,3) = {B,A,C,D} (3 of 4 in) -> R*(G) = all eight.
    gallery, v_b, v_h = _hand_case()
    v_a, v_g = _encoding("A", "ABCDE"), _encoding("G", "ABCDEFGH")
    qb = {x: (v_b[x] + v_a[x]) / 2 for x in ANGLES}
    qh = {x: (v_h[x] + v_g[x]) / 2 for x in ANGLES}
    jac = _jaccard(qb, qh)
    assert jac == pytest.approx(0.66753, abs=1e-5)
    got = all_scores(rerank.build_reranker("k_reciprocal", k1=6, k2=2, lam=0.0), gallery, gallery[1:2], [1])[0]
    assert got[7] == pytest.approx(-jac, abs=1e-5)


def _released_code(feat, k1, k2, lam):
    """Zhong et al.'s released `re_ranking`, loop for loop (distance 1 - cos; feat[0] is the probe): row 0 of
    the final distance. An independent implementation to hold the vectorised one to."""
    d = 1.0 - feat.astype(np.float64) @ feat.T.astype(np.float64)
    n = len(feat)
    rank = np.argsort(d - 10.0 * np.eye(n), axis=1, kind="stable")
    v = np.zeros((n, n))
    for i in range(n):
        forward = rank[i, : k1 + 1]
        r = forward[np.where(rank[forward, : k1 + 1] == i)[0]]
        expansion = r
        for c in r:
            half = int(np.around(k1 / 2))
            c_forward = rank[c, : half + 1]
            c_r = c_forward[np.where(rank[c_forward, : half + 1] == c)[0]]
            if len(np.intersect1d(c_r, r)) > 2 / 3 * len(c_r):
                expansion = np.append(expansion, c_r)
        expansion = np.unique(expansion)
        w = np.exp(-d[i, expansion])
        v[i, expansion] = w / w.sum()
    if k2 != 1:
        v = np.stack([v[rank[i, :k2]].mean(0) for i in range(n)])
    inter = np.minimum(v[0][None], v).sum(1)
    return (1 - lam) * (1 - inter / (2 - inter)) + lam * d[0]


@pytest.mark.parametrize("k1,k2,lam", [(5, 1, 0.3), (8, 4, 0.1), (20, 6, 0.3)])
def test_equals_the_released_loop_for_outside_and_leave_one_out_queries(k1, k2, lam):
    rng = np.random.default_rng(k1)
    # Clustered points, so reciprocal sets and expansions are non-trivial.
    centres = rng.normal(size=(4, 6))
    x = (centres[rng.integers(0, 4, 40)] + 0.6 * rng.normal(size=(40, 6))).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    scorer = rerank.build_reranker("k_reciprocal", k1=k1, k2=k2, lam=lam)
    gallery = x[:36]
    # Three outside queries, then gallery rows 0, 17, 35 as leave-one-out queries, in one batch.
    queries, self_index = np.concatenate([x[36:39], gallery[[0, 17, 35]]]), [-1, -1, -1, 0, 17, 35]
    got = all_scores(scorer, gallery, queries, self_index)
    for b, s in enumerate(self_index):
        others = np.delete(gallery, s, axis=0) if s >= 0 else gallery
        want = _released_code(np.concatenate([queries[b : b + 1], others]), k1, k2, lam)[1:]
        np.testing.assert_allclose(np.delete(-got[b], s) if s >= 0 else -got[b], want, atol=1e-5)


def test_leave_one_out_is_exact_and_the_own_entry_is_never_used():
    rng = np.random.default_rng(5)
    gallery = rng.normal(size=(30, 8)).astype(np.float32)
    scorer = rerank.build_reranker("k_reciprocal", k1=6, k2=3)
    loo = all_scores(scorer, gallery, gallery, np.arange(30))
    # Row s as a leave-one-out query = the same vector as an outside query against the gallery without row s;
    # a query given as row 13 but with another vector is that vector, in the gallery without row 13.
    moved = gallery[13] + 0.1
    for s, q, want in ((0, gallery[0], loo[0]), (29, gallery[29], loo[29]), (13, moved, None)):
        without = all_scores(scorer, np.delete(gallery, s, axis=0), q[None], [-1])[0]
        got = want if want is not None else all_scores(scorer, gallery, np.stack([q, q]), [s, s])[0]
        np.testing.assert_allclose(np.delete(got, s), without, atol=1e-5)
    # The same vector without self_index sees its own entry (and a set of N+1): different scores. A query's
    # score never depends on the others in its batch.
    pair = all_scores(scorer, gallery, gallery[[0, 13]], [-1, 13])
    assert not np.allclose(np.delete(pair[0], 0), np.delete(loo[0], 0), atol=1e-4)
    np.testing.assert_allclose(pair[1], loo[13], atol=1e-6)


def test_runs_through_the_same_ranking_evaluation_and_tuning_entry_points(monkeypatch, tmp_path):
    assert "k_reciprocal" in baseline_names()
    scorer = baseline_scorer("k_reciprocal")
    assert scorer is rerank.build_reranker("k_reciprocal") and not scorer.chunkable
    # Two chains on the circle whose far ends come close: k-reciprocal keeps every nearest hit in its chain.
    gallery = np.concatenate([unit_circle(0, 7, 15, 24, 32, 41, 48), unit_circle(70, 77, 86, 94, 103, 110)])
    labels = np.array([0] * 7 + [1] * 6)
    small = rerank.build_reranker("k_reciprocal", k1=3, k2=2, lam=0.3)
    got = leave_one_out(small, gallery, labels)
    assert got["precision_at_1"] == 1.0
    # ranking.top_k (what Index.search and search use) orders as score_all does, the query's entry excluded.
    self_index = np.arange(13, dtype=np.int32)
    full = all_scores(small, gallery, gallery, self_index).copy()
    full[self_index, self_index] = -np.inf
    s, i = ranking.top_k(small, small.prepare(gallery), gallery, k=5, self_index=self_index, exclude_self=True)
    np.testing.assert_allclose(np.asarray(s), -np.sort(-full, axis=1)[:, :5], atol=1e-6)
    # Tuning on validation rows: a grid over k1, k2, λ and a table name that shows what was chosen.
    monkeypatch.setitem(tuning.GRIDS, "k_reciprocal", {"k1": [2, 3], "k2": [1], "lam": [0.3]})
    record = tuning.tuning_record("k_reciprocal", gallery, labels, str(tmp_path), points=True)
    by_hand = [leave_one_out(rerank.build_reranker("k_reciprocal", k1=k1, k2=1, lam=0.3), gallery, labels)["map_at_r"]
               for k1 in (2, 3)]
    assert [(p["k1"], v) for p, v in record["points"]] == [(2, by_hand[0]), (3, by_hand[1])]
    assert record["map_at_r"] == max(by_hand) and record["params"]["k1"] == (2 if by_hand[0] >= by_hand[1] else 3)
    tuned = tuning.tuned_scorer("k_reciprocal", gallery, labels, str(tmp_path))  # read from the cache
    assert tuned.name == f"k_reciprocal[val: k1={record['params']['k1']},k2=1,lam=0.3]"
