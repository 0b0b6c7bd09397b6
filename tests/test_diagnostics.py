"""Diagnostics on toy data whose answers are known, and once end to end on the embedded photos."""

import json

import numpy as np
import pytest
from omegaconf import OmegaConf

from cbir_jax.evaluation import diagnostics
from cbir_jax.runs.cli import to_typed
from cbir_jax.features.stage import as_gallery, load_stage
from cbir_jax.train import train

from helpers import compose_config


def test_roc_auc_by_hand():
    # positives {0.4, 0.8} vs negatives {0.1, 0.5}: 3 of the 4 (pos, neg) pairs are ordered right
    assert diagnostics.roc_auc(np.array([0.1, 0.4, 0.5, 0.8]), np.array([0, 1, 0, 1], bool)) == pytest.approx(0.75)
    assert diagnostics.roc_auc(np.array([1.0, 2.0, 3.0]), np.array([0, 1, 1], bool)) == 1.0
    assert diagnostics.roc_auc(np.array([3.0, 2.0, 1.0]), np.array([0, 1, 1], bool)) == 0.0  # inverted
    assert diagnostics.roc_auc(np.ones(4), np.array([0, 1, 0, 1], bool)) == 0.5  # ties count 1/2


def test_spearman_sees_order_only():
    x = np.random.default_rng(0).normal(size=50)
    assert diagnostics.spearman(x, np.exp(3 * x)) == pytest.approx(1.0)
    assert diagnostics.spearman(x, -x) == pytest.approx(-1.0)


def _pairs(n=40, m=3000, seed=0):
    rng = np.random.default_rng(seed)
    i, j = rng.integers(0, n, (2, m))
    keep = i != j
    return i[keep], j[keep], rng


def test_additive_share_separates_per_image_from_pair_effects():
    i, j, rng = _pairs()
    a = rng.normal(size=40)
    assert diagnostics.additive_share(i, j, a[i] + a[j], 40) == pytest.approx(1.0, abs=1e-6)
    x = rng.normal(size=(40, 16))
    pair = np.sum(x[i] * x[j], -1)  # a pure pair effect: zero-mean vectors, no per-image propensity
    assert diagnostics.additive_share(i, j, pair, 40) < 0.1
    mixed = 3 * (a[i] + a[j]) + pair
    share = diagnostics.additive_share(i, j, mixed, 40)
    expected = np.var(3 * (a[i] + a[j])) / np.var(mixed)
    assert share == pytest.approx(expected, abs=0.1)
    # the pair part of the mixture is the pair effect again
    assert diagnostics.spearman(diagnostics.pair_part(i, j, mixed, 40), pair) > 0.95


def test_hubness_of_known_lists():
    n, k = 200, 10
    uniform = (np.arange(n)[:, None] + np.arange(1, k + 1)[None, :]) % n  # every item in exactly k lists
    h = diagnostics.hubness(uniform, n)
    assert h["skewness"] == 0.0 and h["top1pct_share"] == pytest.approx(2 * k / (n * k))
    hub = uniform.copy()
    hub[:, 0] = 0  # item 0 in every list
    h = diagnostics.hubness(hub, n)
    assert h["top1pct_share"] >= 1 / k and h["skewness"] > 5


def test_ranking_diagnostics_on_perfect_and_inverted_scores():
    """Through the one leave-one-out path: classes on orthogonal axes are retrieved perfectly by cosine and
    not at all by its negation, and the hubness columns come from the same ranking."""
    import jax.numpy as jnp

    from cbir_jax.evaluation.retrieval import leave_one_out
    from cbir_jax.scoring.scorers import Scorer, fixed_scorer

    labels = np.repeat(np.arange(4), 5)
    x = np.eye(4, dtype=np.float32)[labels] + 0.01 * np.random.default_rng(0).normal(size=(20, 4)).astype(np.float32)
    cosine = fixed_scorer("cosine")
    inverted = Scorer("inverted", cosine.prepare, lambda rows, shared, q, si: -cosine.score(rows, shared, q, si))
    for scorer, want in ((cosine, 1.0), (inverted, 0.0)):
        values: dict = {}
        metrics = leave_one_out(scorer, x, labels, per_query=values, keep_top=3)
        out = diagnostics.ranking_diagnostics(metrics, values["top_ids"], len(x), k=3)
        assert out["map_at_r"] == pytest.approx(want) and out["precision_at_1"] == pytest.approx(want)
        same = labels[values["top_ids"]] == labels[:, None]
        assert same.all() if want else not same.any()
        assert not (values["top_ids"] == np.arange(20)[:, None]).any()  # never itself


def test_train_writes_diagnostics_that_agree_with_each_other(tmp_path):
    cfg = compose_config("train.diagnose=true", "train.evaluate=false", "data.split.val_fraction=0.2")
    run = tmp_path / "run"
    run.mkdir()
    train(to_typed(cfg), run)
    d = json.loads((run / "diagnostics.json").read_text())
    assert (run / "diagnostics.png").stat().st_size > 0
    cosine, mlp = d["scorers"]["cosine"], d["scorers"]["mlp"]
    # cosine's fit to the target is the label's correlation with cosine: two code paths, one number
    assert cosine["fit_train_pairs"] == pytest.approx(d["label"]["train"]["spearman_with_cosine"], abs=1e-6)
    assert cosine["pairs"]["spearman_with_cosine"] == pytest.approx(1.0)
    # cosine's leave-one-out MAP@R, worked out here by brute force (ties: irrelevant first)
    stage = load_stage(to_typed(cfg))
    x, y = as_gallery(to_typed(cfg), stage.features.features[stage.split.train]), stage.features.labels[stage.split.train]
    assert cosine["train_rows"]["map_at_r"] == pytest.approx(_brute_force_map_at_r(x, y), abs=1e-9)
    for block in (cosine, mlp):
        for rows in ("train_rows", "held_out_rows"):
            assert np.isfinite(block[rows]["map_at_r"]) and np.isfinite(block[rows]["n10_skewness"])
    assert 0.0 <= d["label"]["train"]["auc_same_class"] <= 1.0
    assert d["rows"]["train"] + d["rows"]["held_out"] < 21 * 4  # validation rows are in neither
    OmegaConf.create(d)  # plain JSON types only


def _brute_force_map_at_r(x: np.ndarray, y: np.ndarray) -> float:
    values = []
    for i in range(len(x)):
        others = [j for j in range(len(x)) if j != i]
        order = sorted(others, key=lambda j: (-float(x[i] @ x[j]), y[j] == y[i]))
        rel = [y[j] == y[i] for j in order]
        r = sum(rel)
        if r:
            values.append(sum(sum(rel[:n + 1]) / (n + 1) for n in range(r) if rel[n]) / r)
    return float(np.mean(values))
