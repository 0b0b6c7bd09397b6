"""Which images train the head and which are searched: splits by class, by image, or none.

`by=class` holds whole categories out, so evaluation measures generalisation to unseen categories.
`by=none` trains on the gallery itself (the self-supervised protocol): labels are never read for it.

Validation (`val_fraction`) is carved from the *training* side only, the same way the held-out side is:
whole training categories for `by=class`, images of every category for `by=image`. Model selection and
hyper-parameters are chosen on it, so the held-out categories are never looked at before the final table.
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
    # Validation rows, taken out of the training side (empty unless `val_fraction` > 0); each is a
    # leave-one-out query against the others.
    val: np.ndarray = dataclasses.field(default_factory=lambda: np.zeros(0, np.int64))


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
    train, val = _carve_validation(cfg, train, labels, np.random.default_rng([cfg.seed, 1]))
    return Split(train=train, query=query, gallery=gallery, self_index=self_index, val=val)


def _carve_validation(cfg, train: np.ndarray, labels, rng) -> tuple[np.ndarray, np.ndarray]:
    """(train, val): a `val_fraction` share of the training side, by class or by image as the split is."""
    fraction = getattr(cfg, "val_fraction", 0.0) or 0.0
    if fraction <= 0 or cfg.by == "none":  # by=none reads no labels, so it has no labelled validation
        return train, np.zeros(0, np.int64)
    y = labels()[train]
    classes = np.unique(y)
    if cfg.by == "class":
        n_val = int(round(fraction * len(classes)))
        if n_val < 2 or len(classes) - n_val < 1:
            raise DataError(
                f"data.split.val_fraction={fraction}: {len(classes)} training classes give {n_val} validation "
                "classes; at least 2 are needed (and 1 left to train)"
            )
        is_val = np.isin(y, rng.permutation(classes)[:n_val])
    else:
        is_val = np.zeros(len(train), bool)
        for c in classes:
            members = np.flatnonzero(y == c)
            is_val[rng.permutation(members)[: int(round(fraction * len(members)))]] = True
    if is_val.sum() < 2 or (~is_val).sum() < 2:
        raise DataError(f"data.split.val_fraction={fraction}: too few images on one side of the validation split")
    return train[~is_val], train[is_val]
