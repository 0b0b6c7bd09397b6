"""Retrieval metrics on cases worked out by hand."""

import numpy as np
import pytest

from cbir_jax.evaluation.metrics import MetricAccumulator, metrics_from_ranked, ranked_relevance


def test_hand_computed_case():
    # Ranked relevance 1,0,1 with R = 2.
    m = metrics_from_ranked(np.array([[1, 0, 1]], bool))
    assert m["precision_at_1"][0] == 1.0
    assert m["r_precision"][0] == pytest.approx(0.5)
    assert m["map_at_r"][0] == pytest.approx(0.5)  # (1/2) * (P@1*1 + P@2*0)
    assert m["map"][0] == pytest.approx((1 + 2 / 3) / 2)
    assert m["precision_at_10"][0] == pytest.approx(2 / 10)  # hits / k, as Musgrave et al.


def test_self_match_never_counts():
    # Query 0 is gallery item 0 and scores highest with itself; the only other relevant item is last.
    scores = np.array([[1.0, 0.9, 0.8, 0.1]])
    relevant = np.array([[True, False, False, True]])
    acc = MetricAccumulator()
    acc.add(scores, relevant, self_index=np.array([0]))
    r = acc.result()
    assert r["precision_at_1"] == 0.0
    assert r["map_at_r"] == 0.0
    assert r["map"] == pytest.approx(1 / 3)


def test_constant_scores_do_not_score_perfectly():
    # Gallery stored with relevant items first: a stable sort would give a perfect score.
    scores = np.zeros((1, 6))
    relevant = np.array([[True, True, True, False, False, False]])
    rel = ranked_relevance(scores, relevant, np.array([-1]))
    assert rel.tolist() == [[False, False, False, True, True, True]]
    m = metrics_from_ranked(rel)
    assert m["precision_at_1"][0] == 0.0 and m["map_at_r"][0] == 0.0


def test_queries_without_relevant_items_are_skipped_and_counted():
    acc = MetricAccumulator()
    acc.add(np.array([[0.5, 0.2], [0.3, 0.9]]), np.array([[False, False], [False, True]]), np.array([-1, -1]))
    r = acc.result()
    assert r["skipped_queries"] == 1 and r["queries"] == 1
    assert r["precision_at_1"] == 1.0


def test_nan_scores_rank_last():
    rel = ranked_relevance(np.array([[np.nan, 0.1]]), np.array([[True, False]]), np.array([-1]))
    assert rel.tolist() == [[False, True]]
