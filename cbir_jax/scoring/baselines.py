"""Baselines by name: the fixed metrics and the non-learned re-rankers a learned scorer is compared with."""

from __future__ import annotations

from cbir_jax.core.registry import UnknownComponentError
from cbir_jax.scoring import heads, rerank
from cbir_jax.scoring.scorers import Scorer, fixed_scorer


def baseline_names() -> list[str]:
    return sorted(heads.FIXED_METRICS) + rerank.RERANKERS.names()


def baseline_scorer(name: str) -> Scorer:
    """A fixed metric or a non-learned re-ranker, by name."""
    if name in heads.FIXED_METRICS:
        return fixed_scorer(name)
    if name in rerank.RERANKERS:
        return rerank.build_reranker(name)
    raise UnknownComponentError(f"unknown baseline {name!r} in eval.baselines; valid: {', '.join(baseline_names())}")
