"""L2 normalisation, the one implementation every stage uses (features, pooling, heads, re-rankers)."""

from __future__ import annotations

from typing import TypeVar

import jax.numpy as jnp
import numpy as np

EPS = 1e-12  # norms are floored here: a zero vector stays zero instead of becoming NaN
ArrayT = TypeVar("ArrayT", np.ndarray, jnp.ndarray)


def l2_normalise(x: ArrayT, axis: int = -1) -> ArrayT:
    """x / max(|x|, EPS) along `axis`; numpy in, numpy out (host-side post-processing), JAX in, JAX out."""
    xp = np if isinstance(x, np.ndarray) else jnp
    return x / xp.maximum(xp.linalg.norm(x, axis=axis, keepdims=True), EPS)
