"""Evaluates scorers on the same queries and gallery, so every row of a table is comparable."""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np

from cbir_jax.core.progress import progress
from cbir_jax.scoring import ranking
from cbir_jax.evaluation.metrics import METRIC_NAMES, MetricAccumulator
from cbir_jax.scoring.scorers import Scorer


def evaluate_scorer(
    scorer: Scorer,
    queries: np.ndarray,
    gallery: np.ndarray,
    query_labels: np.ndarray,
    gallery_labels: np.ndarray,
    self_index: np.ndarray,
    *,
    query_chunk: int = 256,
    gallery_chunk: int | None = None,
    per_query: dict[str, np.ndarray] | None = None,
    keep_top: int = 0,
) -> dict[str, float]:
    """Full-ranking metrics of one scorer; relevance = same label; the self-match is excluded.

    `per_query`, if given, receives each metric per query (NaN where R = 0): what paired comparisons of
    two scorers on the same queries need (cbir_jax/evaluation/significance.py); with `keep_top` > 0 also
    `top_ids`, each query's best `keep_top` gallery rows (self excluded), from the same scores.
    """
    state = scorer.prepare(jnp.asarray(gallery))
    acc = MetricAccumulator()
    top: list[np.ndarray] = []
    n = len(queries)
    for start in progress(range(0, n, query_chunk), desc=f"eval {scorer.name}", unit="chunk", leave=False, mininterval=2.0):
        stop = min(start + query_chunk, n)
        q = np.zeros((query_chunk,) + queries.shape[1:], queries.dtype)
        q[: stop - start] = queries[start:stop]  # fixed shape: one compilation per scorer
        si = np.full(query_chunk, -1, np.int32)
        si[: stop - start] = self_index[start:stop]
        scores = np.asarray(ranking.score_all(scorer, state, jnp.asarray(q), jnp.asarray(si), chunk=gallery_chunk))
        relevant = query_labels[start:stop, None] == gallery_labels[None, :]
        acc.add(scores[: stop - start], relevant, self_index[start:stop])
        if keep_top:
            top.append(_top_ids(scores[: stop - start], self_index[start:stop], keep_top))
    if per_query is not None:
        per_query.update(acc.per_query())
        if keep_top:
            per_query["top_ids"] = np.concatenate(top)
    return acc.result()


def leave_one_out(
    scorer: Scorer, x: np.ndarray, labels: np.ndarray, *, query_chunk: int = 256, gallery_chunk: int | None = None,
    per_query: dict[str, np.ndarray] | None = None, keep_top: int = 0,
) -> dict[str, float]:
    """Every row a query against all the others (its own entry removed): the one definition of validation
    metrics, used by model selection, the tuned baselines, the learned re-ranker and the diagnostics."""
    n = len(x)
    return evaluate_scorer(scorer, x, x, labels, labels, np.arange(n), query_chunk=max(1, min(query_chunk, n)),
                           gallery_chunk=gallery_chunk, per_query=per_query, keep_top=keep_top)


def _top_ids(scores: np.ndarray, self_index: np.ndarray, k: int) -> np.ndarray:
    s = np.array(scores, np.float32)
    rows = np.nonzero(self_index >= 0)[0]
    s[rows, self_index[rows]] = -np.inf
    return np.argsort(-s, axis=1, kind="stable")[:, :k]


def check_evaluable(query_labels: np.ndarray, gallery_labels: np.ndarray, self_index: np.ndarray, name: str) -> None:
    """Fails with one line unless some query has a relevant gallery item other than itself.

    Without one every metric is undefined: a table of `nan` would look like a result.
    """
    from cbir_jax.data import DataError

    relevant = np.zeros(len(query_labels), np.int64)
    for label, count in zip(*np.unique(gallery_labels, return_counts=True)):
        relevant[query_labels == label] = count
    own = self_index >= 0  # a query's own gallery entry is never relevant to it
    relevant[own] -= (gallery_labels[self_index[own]] == query_labels[own])
    if not (relevant > 0).any():
        raise DataError(
            f"{name}: no query has a relevant item in the gallery (every class needs at least 2 images); nothing to evaluate"
        )


def format_table(results: dict[str, dict[str, float]], title: str = "") -> str:
    """A markdown table: one row per scorer, one column per metric."""
    header = "| scorer | " + " | ".join(METRIC_NAMES) + " | queries |"
    lines = ([f"**{title}**", ""] if title else []) + [header, "|" + "---|" * (len(METRIC_NAMES) + 2)]
    for name, m in results.items():
        cells = [("nan" if math.isnan(m[k]) else f"{m[k]:.4f}") for k in METRIC_NAMES]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {m.get('queries', '')} |")
    return "\n".join(lines)
