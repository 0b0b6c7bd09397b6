"""Numbers are checked: a diverged run stops at the step it diverged, not after writing NaN everywhere.

The loss is already on the host at every step (the loop sums it for the log), so checking it costs
nothing; parameters are checked before each checkpoint, so a checkpoint never holds NaN and the last one
on disk is the last good state. The trainer adds which checkpoint that is to the message.
"""

from __future__ import annotations

import math
from typing import Any

import jax
import jax.numpy as jnp

from cbir_jax.core.errors import DivergedError

_ADVICE = "lower train.learning_rate or set train.grad_clip"


def all_finite(tree: Any) -> bool:
    """True if every floating-point leaf of `tree` is finite."""
    leaves = [jnp.asarray(x) for x in jax.tree_util.tree_leaves(tree)]
    return all(bool(jnp.all(jnp.isfinite(x))) for x in leaves if jnp.issubdtype(x.dtype, jnp.floating))


def check_loss(step: int, loss: float) -> None:
    if not math.isfinite(loss):
        raise DivergedError(f"training diverged at step {step} (loss {loss}); {_ADVICE}")


def check_params(step: int, params: Any) -> None:
    if not all_finite(params):
        raise DivergedError(f"training diverged at step {step} (non-finite parameters); {_ADVICE}")
