"""Scorers: a pair head (or re-ranker) bound to its parameters, in the form ranking needs.

`prepare` runs once per gallery and returns `(rows, shared)`: `rows` is a pytree whose leaves all have
the gallery axis first (so ranking can slice it into chunks), `shared` is everything else (parameters,
precomputed terms). `score(rows, shared, queries, self_index)` returns (B, n) similarities for the n
gallery rows given; `self_index` is each query's position among those rows (or negative), which only
neighbourhood re-rankers need. A `chunkable=False` scorer needs the whole gallery at once.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp

from cbir_jax import heads as heads_lib
from cbir_jax.registry import Registry

GalleryState = tuple[Any, Any]


@dataclasses.dataclass(frozen=True, eq=False)
class Scorer:
    name: str
    prepare: Callable[[jax.Array], GalleryState]
    score: Callable[[Any, Any, jax.Array, jax.Array], jax.Array]
    chunkable: bool = True


# Fast forms keyed by head class: build(head, params) -> (prepare, score). Anything else is scored by
# applying the head to every (query, gallery) pair, which is correct for any head but slower.
FAST_FORMS: Registry[Callable[..., tuple[Callable, Callable]]] = Registry("fast scoring form")


def _pairwise_form(head: nn.Module, params) -> tuple[Callable, Callable]:
    def prepare(gallery):
        return {"g": gallery}, params

    def score(rows, shared, queries, self_index):
        del self_index
        apply = lambda q: head.apply({"params": shared}, q[None, :], rows["g"])  # noqa: E731
        return jax.lax.map(apply, queries, batch_size=8)

    return prepare, score


def _fixed_name(head: nn.Module) -> str | None:
    if isinstance(head, heads_lib.FixedMetric):
        for name, fn in heads_lib.FIXED_METRICS.items():
            if fn is head.fn:
                return name
    return None


@FAST_FORMS.register("cosine")
def _cosine_form(head, params):
    def prepare(gallery):
        return {"g": gallery / (jnp.linalg.norm(gallery, axis=-1, keepdims=True) + heads_lib.EPS)}, None

    def score(rows, shared, queries, self_index):
        qn = queries / (jnp.linalg.norm(queries, axis=-1, keepdims=True) + heads_lib.EPS)
        return qn @ rows["g"].T

    return prepare, score


@FAST_FORMS.register("euclid")
def _euclid_form(head, params):
    def prepare(gallery):
        return {"g": gallery, "g2": jnp.sum(gallery**2, axis=-1)}, None

    def score(rows, shared, queries, self_index):
        q2 = jnp.sum(queries**2, axis=-1, keepdims=True)
        d2 = q2 + rows["g2"][None, :] - 2.0 * (queries @ rows["g"].T)
        return -jnp.sqrt(jnp.maximum(d2, 0.0))

    return prepare, score


def form_key(head: nn.Module) -> str:
    """The name a fast form is registered under: the fixed metric's name or the head class name."""
    return _fixed_name(head) or type(head).__name__


def pair_scorer(name: str, head: nn.Module, params, *, fast: bool = True) -> Scorer:
    """Binds a head to its parameters; uses its registered fast form unless `fast=False`."""
    key = form_key(head)
    if fast and key in FAST_FORMS:
        prepare, score = FAST_FORMS.get(key)(head, params)
    else:
        prepare, score = _pairwise_form(head, params)
    return Scorer(name=name, prepare=prepare, score=score, chunkable=True)


def fixed_scorer(name: str) -> Scorer:
    """A scorer for one of the parameter-free metrics."""
    return pair_scorer(name, heads_lib.FixedMetric(heads_lib.FIXED_METRICS[name]), {})
