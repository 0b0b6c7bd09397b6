"""Small components on cases with known answers: heads, post-processing, splits, targets, losses."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cbir_jax.scoring import heads
from cbir_jax.training import losses
from cbir_jax.labels import pair_labels
from cbir_jax.features import postprocess
from cbir_jax.core.config import FeaturesConfig, HeadConfig, LossConfig, SplitConfig
from cbir_jax.data import DataError
from cbir_jax.data.splits import make_split


def test_fixed_metrics_on_known_vectors():
    q = jnp.array([1.0, 0.0, 0.0])
    g = jnp.array([[1.0, 0.0, 0.0], [0.0, 2.0, 0.0], [-3.0, 0.0, 0.0]])
    np.testing.assert_allclose(heads.cosine_similarity(q, g), [1.0, 0.0, -1.0], atol=1e-6)
    np.testing.assert_allclose(heads.FIXED_METRICS["euclid"](q, g), [0.0, -np.sqrt(5.0), -4.0], atol=1e-6)
    assert float(heads.feature_ssim(q, q)) == pytest.approx(1.0, abs=1e-6)


def test_feature_ssim_matches_the_formula():
    rng = np.random.default_rng(0)
    x, y = rng.random(64), rng.random(64)
    L = max(x.max(), y.max()) - min(x.min(), y.min())
    c1, c2 = (0.01 * L) ** 2, (0.03 * L) ** 2
    cov = np.cov(x, y)  # sample covariance, as skimage
    expected = ((2 * x.mean() * y.mean() + c1) * (2 * cov[0, 1] + c2)) / (
        (x.mean() ** 2 + y.mean() ** 2 + c1) * (cov[0, 0] + cov[1, 1] + c2))
    assert float(heads.feature_ssim(jnp.asarray(x), jnp.asarray(y))) == pytest.approx(expected, rel=1e-4)


def test_squared_difference_head_is_symmetric_and_simnet_is_not_forced_to_be():
    rng = np.random.default_rng(1)
    q, g = (jnp.asarray(rng.normal(size=(4, 8)), jnp.float32) for _ in range(2))
    for name, symmetric in [("mlp", True), ("simnet", False)]:
        head = heads.build_head(HeadConfig(name=name, hidden=[16]))
        p = heads.init_params(head, 8, jax.random.key(0))
        a, b = head.apply({"params": p}, q, g), head.apply({"params": p}, g, q)
        assert np.allclose(a, b, atol=1e-6) == symmetric
    assert heads.init_params(heads.build_head(HeadConfig(name="cosine")), 8, jax.random.key(0)) == {}


def test_pca_whitening_fitted_on_the_gallery_whitens_it():
    rng = np.random.default_rng(0)
    x = rng.normal(size=(500, 6)) @ rng.normal(size=(6, 6))
    cfg = FeaturesConfig(l2_normalize=False, whiten="pca_whiten")
    y = postprocess.apply(postprocess.fit(cfg, x), x)
    np.testing.assert_allclose(np.cov(y.T), np.eye(6), atol=0.02)  # eigenvalues regularised by 1e-6 * max
    z = postprocess.apply(postprocess.fit(FeaturesConfig(), x), x)
    np.testing.assert_allclose(np.linalg.norm(z, axis=1), 1.0, rtol=1e-5)


def test_class_split_holds_whole_classes_out():
    labels = np.repeat(np.arange(10), 5)
    split = make_split(SplitConfig(by="class", train_fraction=0.5, seed=3), len(labels), lambda: labels)
    assert not set(labels[split.train]) & set(labels[split.gallery])
    assert len(set(labels[split.train])) == 5
    np.testing.assert_array_equal(split.query, split.gallery)  # leave-one-out
    np.testing.assert_array_equal(split.self_index, np.arange(len(split.query)))


def test_validation_is_carved_from_training_classes_only():
    labels = np.repeat(np.arange(20), 4)
    plain = make_split(SplitConfig(by="class", train_fraction=0.5, seed=3), len(labels), lambda: labels)
    split = make_split(SplitConfig(by="class", train_fraction=0.5, seed=3, val_fraction=0.4), len(labels), lambda: labels)
    np.testing.assert_array_equal(split.gallery, plain.gallery)  # the held-out side does not move
    assert set(split.train) | set(split.val) == set(plain.train) and not set(split.train) & set(split.val)
    assert len(set(labels[split.val])) == 4 and not set(labels[split.val]) & set(labels[split.train])
    few = np.repeat(np.arange(5), 8)
    by_image = make_split(SplitConfig(by="image", val_fraction=0.25), len(few), lambda: few)
    assert set(few[by_image.val]) == set(few[by_image.train]) == set(range(5))  # every class on both sides  # every class on both sides
    with pytest.raises(DataError, match="val_fraction"):
        make_split(SplitConfig(by="class", val_fraction=0.05), len(labels), lambda: labels)


def test_query_fraction_separates_queries_from_gallery():
    labels = np.repeat(np.arange(4), 10)
    split = make_split(SplitConfig(by="image", train_fraction=0.5, query_fraction=0.25), 40, lambda: labels)
    assert not set(split.query) & set(split.gallery) and (split.self_index == -1).all()
    assert not set(split.train) & (set(split.query) | set(split.gallery))


def test_split_none_never_reads_labels_and_class_split_needs_them():
    def labels():
        raise AssertionError("labels read")

    split = make_split(SplitConfig(by="none"), 12, labels)
    assert len(split.train) == 12
    with pytest.raises(DataError, match="needs class labels"):
        make_split(SplitConfig(by="class"), 12, lambda: None)


def test_rank_transform_is_monotone_into_unit_interval():
    t = np.array([5.0, -1.0, 100.0, 0.5])
    r = pair_labels.transform_targets("rank", t)
    assert r.tolist() == pytest.approx([2 / 3, 0.0, 1.0, 1 / 3])


@pytest.mark.parametrize("name", ["mse", "contrastive", "ranking"])
def test_losses_are_lower_for_better_predictions(name):
    loss = losses.get_loss(LossConfig(name=name, margin=0.3))
    target = jnp.array([1.0, 0.0, 0.8, 0.1])
    good, bad = target, 1.0 - target
    assert float(loss(good, target)) < float(loss(bad, target))
