"""Paired bootstrap intervals on cases with known answers."""

import numpy as np

from cbir_jax.evaluation.significance import paired_bootstrap


def test_a_constant_gain_has_a_zero_width_interval_at_the_gain():
    b = np.random.default_rng(0).uniform(size=300)
    r = paired_bootstrap(b + 0.1, b)
    assert abs(r["diff"] - 0.1) < 1e-12 and abs(r["low"] - 0.1) < 1e-12 and abs(r["high"] - 0.1) < 1e-12
    assert r["wins"] == 300 and r["losses"] == 0


def test_symmetric_noise_gives_an_interval_around_zero_and_nan_queries_are_dropped():
    rng = np.random.default_rng(1)
    b = rng.uniform(size=2000)
    a = b + rng.normal(0, 0.05, size=2000)
    a[:10] = np.nan
    r = paired_bootstrap(a, b)
    assert r["queries"] == 1990 and r["low"] < 0 < r["high"] and r["high"] - r["low"] < 0.01
