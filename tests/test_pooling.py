"""Pooling on toy feature maps whose answers are worked out by hand."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from cbir_jax.core.config import BackboneConfig
from cbir_jax.backbones.pooling import POOLINGS, build_pooling, describe, gap, gem, mac, rmac, rmac_regions
from cbir_jax.core.registry import UnknownComponentError


def _map(*channels) -> np.ndarray:
    """Stacks hxw channel grids into a (1,h,w,C) batch."""
    return np.stack([np.asarray(c, np.float32) for c in channels], axis=-1)[None]


TOY = _map([[1, 2], [3, 4]], [[0, 0], [0, 8]])


def test_gap_and_mac():
    np.testing.assert_allclose(gap(TOY), [[2.5, 2.0]])
    np.testing.assert_allclose(mac(TOY), [[4.0, 8.0]])


def test_gem():
    np.testing.assert_allclose(gem(TOY, p=1.0), [[2.5, 2.0]], rtol=1e-6)  # p=1 is the mean
    np.testing.assert_allclose(gem(TOY, p=2.0), [[np.sqrt(7.5), np.sqrt(16.0)]], rtol=1e-5)
    np.testing.assert_allclose(gem(TOY, p=3.0)[0, 1], (512 / 4) ** (1 / 3), rtol=1e-5)
    # Values are clamped at eps before the power, so negatives count as (almost) zero.
    np.testing.assert_allclose(gem(_map([[-5, 2]]), p=1.0), [[1.0]], rtol=1e-5)


def test_rmac_regions_square():
    # 3x3, L=2: the whole map, the level-1 region (the whole short side), four 2x2 corners.
    assert rmac_regions(3, 3, 2) == [
        (0, 0, 3, 3),
        (0, 0, 3, 3),
        (0, 0, 2, 2), (0, 1, 2, 2), (1, 0, 2, 2), (1, 1, 2, 2),
    ]


def test_rmac_regions_wide():
    # 3x5: one extra region along the long side (overlap 1/3 is closest to 0.4).
    assert rmac_regions(3, 5, 2) == [
        (0, 0, 3, 5),
        (0, 0, 3, 3), (0, 2, 3, 3),
        (0, 0, 2, 2), (0, 1, 2, 2), (0, 3, 2, 2), (1, 0, 2, 2), (1, 1, 2, 2), (1, 3, 2, 2),
    ]


def test_rmac_values():
    x = _map([[3, 0, 0], [0, 0, 0], [0, 0, 0]], [[0, 0, 0], [0, 0, 0], [0, 0, 4]])
    # L=1: whole map twice, each max (3,4) normalised to (0.6,0.8).
    np.testing.assert_allclose(rmac(x, levels=1), [[1.2, 1.6]], rtol=1e-5)
    # L=2 adds corners: top-left (1,0), bottom-right (0,1), two all-zero regions that add nothing.
    np.testing.assert_allclose(rmac(x, levels=2), [[2.2, 2.6]], rtol=1e-5)


def test_registry_binds_config_parameters():
    cfg = BackboneConfig(pooling="gem", gem_p=2.0)
    np.testing.assert_allclose(build_pooling(cfg)(TOY), gem(TOY, 2.0))
    assert describe(cfg) == "gem2"
    assert describe(dataclasses.replace(cfg, pooling="rmac", rmac_levels=2)) == "rmac2"
    assert describe(dataclasses.replace(cfg, pooling="gap")) == "gap"
    assert set(POOLINGS.names()) == {"gap", "mac", "gem", "rmac"}
    with pytest.raises(UnknownComponentError, match="valid: gap, gem, mac, rmac"):
        build_pooling(dataclasses.replace(cfg, pooling="max"))


def test_batch_and_jit():
    import jax

    x = np.random.default_rng(0).random((3, 7, 5, 4)).astype(np.float32)
    for name in POOLINGS:
        pool = build_pooling(BackboneConfig(pooling=name))
        out = jax.jit(pool)(x)
        assert out.shape == (3, 4)
        np.testing.assert_allclose(out[1:2], pool(x[1:2]), rtol=1e-5)
