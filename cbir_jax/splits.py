"""Which images train the head and which are searched: splits by class, by image, or none.

`by=class` holds whole categories out, so evaluation measures generalisation to unseen categories.
`by=none` trains on the gallery itself (the self-supervised protocol): labels are never read for it.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import numpy as np

from cbir_jax.data import DataError


@dataclasses.dataclass(frozen=True)
class Split:
    train: np.ndarray  # rows that train the head
    query: np.ndarray  # rows used as queries
    gallery: np.ndarray  # rows searched
    self_index: np.ndarray  # per query: its position in `gallery`, or -1 if it is not there


def _queries_and_gallery(eval_rows: np.ndarray, query_fraction: Optional[float], rng) -> tuple:
    if query_fraction is None:  # every image a query against all the others
        return eval_rows, eval_rows, np.arange(len(eval_rows))
    n_query = max(1, int(round(query_fraction * len(eval_rows))))
    chosen = np.sort(rng.permutation(len(eval_rows))[:n_query])
    is_query = np.zeros(len(eval_rows), bool)
    is_query[chosen] = True
    return eval_rows[is_query], eval_rows[~is_query], np.full(n_query, -1)


def make_split(cfg, n: int, labels: Callable[[], Optional[np.ndarray]]) -> Split:
    """Builds the split named by a SplitConfig over n rows; `labels` is called only when needed."""
    rng = np.random.default_rng(cfg.seed)
    rows = np.arange(n)
    if cfg.by == "none":
        train, eval_rows = rows, rows
    elif cfg.by == "class":
        y = labels()
        if y is None:
            raise DataError("data.split.by=class needs class labels; this dataset has none (use by=none)")
        classes = np.unique(y)
        if len(classes) < 2:
            raise DataError(f"data.split.by=class needs at least 2 classes, found {len(classes)}")
        n_train = min(len(classes) - 1, max(1, int(round(cfg.train_fraction * len(classes)))))
        train_classes = rng.permutation(classes)[:n_train]
        is_train = np.isin(y, train_classes)
        train, eval_rows = rows[is_train], rows[~is_train]
    elif cfg.by == "image":
        y = labels()
        groups = [rows] if y is None else [rows[y == c] for c in np.unique(y)]
        is_train = np.zeros(n, bool)
        for g in groups:
            is_train[rng.permutation(g)[: int(round(cfg.train_fraction * len(g)))]] = True
        train, eval_rows = rows[is_train], rows[~is_train]
    else:
        raise DataError(f"data.split.by={cfg.by!r}: valid are class, image, none")
    if len(train) < 2 or len(eval_rows) < 2:
        raise DataError(f"data.split.by={cfg.by}: too few images ({len(train)} train, {len(eval_rows)} eval)")
    query, gallery, self_index = _queries_and_gallery(eval_rows, cfg.query_fraction, rng)
    return Split(train=train, query=query, gallery=gallery, self_index=self_index)
