"""Retrieval metrics, as defined in Musgrave et al. 2020 ("A Metric Learning Reality Check").

Conventions, chosen so that degenerate scorers cannot look good:
- the query's own gallery entry (`self_index`) is removed before ranking, never counted;
- ties are broken pessimistically (irrelevant items first), so constant scores earn chance-level
  metrics rather than whatever order the gallery happens to be stored in;
- queries with no relevant gallery item (R = 0) are skipped and counted, not scored as 0 or 1.
"""

from __future__ import annotations

import numpy as np

METRIC_NAMES = ("precision_at_1", "precision_at_10", "r_precision", "map_at_r", "map")


def ranked_relevance(scores: np.ndarray, relevant: np.ndarray, self_index: np.ndarray) -> np.ndarray:
    """Relevance (B, N) of the gallery in ranked order, self-matches removed (placed last as irrelevant)."""
    scores = np.array(scores, dtype=np.float64, copy=True)
    relevant = np.array(relevant, dtype=bool, copy=True)
    rows = np.nonzero(self_index >= 0)[0]
    scores[rows, self_index[rows]] = -np.inf
    relevant[rows, self_index[rows]] = False
    scores = np.nan_to_num(scores, nan=-np.inf)
    # lexsort: last key is primary. Descending score, then irrelevant before relevant within ties.
    order = np.lexsort((relevant, -scores), axis=-1)
    return np.take_along_axis(relevant, order, axis=-1)


def metrics_from_ranked(rel: np.ndarray) -> dict[str, np.ndarray]:
    """Per-query metrics from ranked relevance (B, N); rows with R = 0 give NaN."""
    rel = rel.astype(np.float64)
    b, n = rel.shape
    r_total = rel.sum(axis=1)
    cum = np.cumsum(rel, axis=1)
    ranks = np.arange(1, n + 1, dtype=np.float64)
    precision_at_i = cum / ranks
    within_r = ranks[None, :] <= r_total[:, None]
    with np.errstate(invalid="ignore", divide="ignore"):
        out = {
            "precision_at_1": rel[:, 0].copy(),
            "precision_at_10": cum[:, min(10, n) - 1] / 10.0,
            "r_precision": np.where(within_r, rel, 0).sum(1) / r_total,
            "map_at_r": np.where(within_r, precision_at_i * rel, 0).sum(1) / r_total,
            "map": (precision_at_i * rel).sum(1) / r_total,
        }
    empty = r_total == 0
    for v in out.values():
        v[empty] = np.nan
    return out


class MetricAccumulator:
    """Averages per-query metrics over query chunks; counts queries skipped for having R = 0."""

    def __init__(self) -> None:
        self._values: dict[str, list[np.ndarray]] = {k: [] for k in METRIC_NAMES}
        self.skipped = 0

    def add(self, scores: np.ndarray, relevant: np.ndarray, self_index: np.ndarray) -> None:
        per_query = metrics_from_ranked(ranked_relevance(scores, relevant, self_index))
        self.skipped += int(np.isnan(per_query["map"]).sum())
        for k, v in per_query.items():
            self._values[k].append(v)

    def per_query(self) -> dict[str, np.ndarray]:
        """Each metric for every query added so far, in order (NaN for queries with R = 0)."""
        return {k: np.concatenate(c) if c else np.zeros(0) for k, c in self._values.items()}

    def result(self) -> dict[str, float]:
        out = {}
        for k, chunks in self._values.items():
            v = np.concatenate(chunks) if chunks else np.zeros(0)
            v = v[~np.isnan(v)]
            out[k] = float(v.mean()) if v.size else float("nan")
        out["queries"] = int(sum(len(c) for c in self._values["map"])) - self.skipped
        out["skipped_queries"] = self.skipped
        return out
