"""Paired comparisons of two scorers on the same queries: the difference of their mean per-query metric
with a bootstrap confidence interval over queries.

Why paired: both scorers rank the same queries, so per-query differences cancel what makes a query easy
or hard; resampling queries (not scores) asks whether the win would hold on another draw of queries
from the same categories. Seeds are averaged per query first, so the interval is about the queries and
the std over seeds is reported beside it, not mixed into it.
"""

from __future__ import annotations

import numpy as np


def paired_bootstrap(a: np.ndarray, b: np.ndarray, *, samples: int = 10_000, level: float = 0.95, seed: int = 0) -> dict[str, float]:
    """mean(a - b) over queries and its percentile bootstrap interval; queries NaN in either are dropped."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    if a.shape != b.shape:
        raise ValueError(f"paired_bootstrap: per-query arrays differ in shape, {a.shape} vs {b.shape}")
    keep = np.isfinite(a) & np.isfinite(b)
    d = a[keep] - b[keep]
    if d.size == 0:
        return {"diff": float("nan"), "low": float("nan"), "high": float("nan"), "queries": 0, "wins": 0, "losses": 0}
    rng = np.random.default_rng(seed)
    means = np.empty(samples)
    for start in range(0, samples, 1000):  # bounded memory: 1000 resamples at a time
        stop = min(start + 1000, samples)
        means[start:stop] = d[rng.integers(0, d.size, (stop - start, d.size))].mean(axis=1)
    tail = (1.0 - level) / 2
    return {
        "diff": float(d.mean()),
        "low": float(np.quantile(means, tail)),
        "high": float(np.quantile(means, 1.0 - tail)),
        "queries": int(d.size),
        "wins": int((d > 0).sum()),
        "losses": int((d < 0).sum()),
    }
