"""Re-ranker parameters chosen on validation rows, so a learned scorer is compared with each re-ranker at
its best on the same data, never at defaults picked for another dataset, and never tuned on the queries.

`tune_reranker(name, x, y)` grid-searches the re-ranker's parameters for MAP@R with every validation row a
leave-one-out query against the others (`data.split.val_fraction` carves those rows out of the training
categories). Results are stored per (name, grid, rows) under `<cache_dir>/tuning/` like the feature cache,
so the jobs of a sweep on one split tune once.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import logging
import os
from pathlib import Path

import numpy as np

from cbir_jax.scoring import rerank
from cbir_jax.evaluation.retrieval import leave_one_out
from cbir_jax.core.registry import UnknownComponentError
from cbir_jax.scoring.scorers import Scorer

log = logging.getLogger(__name__)

# The grids searched, around each method's published defaults (rerank.py), wide in the neighbourhood size.
GRIDS: dict[str, dict[str, list]] = {
    "alpha_qe": {"k": [5, 10, 20, 30, 50], "alpha": [1.0, 3.0]},
    "dba_alpha_qe": {"k": [10, 20, 30, 50, 75, 100], "alpha": [1.0, 3.0], "qe_k": [5, 10, 15, 20], "qe_alpha": [1.0, 3.0]},
    "diffusion": {"k": [10, 20, 30, 50], "gamma": [1.0, 3.0], "k_query": [5, 10, 20]},
    "k_reciprocal": {"k1": [10, 20, 30, 50, 75], "k2": [1, 3, 6, 10, 15, 20], "lam": [0.0, 0.1, 0.3]},
}


def grid_scores(name: str, x: np.ndarray, y: np.ndarray) -> list[tuple[dict, float]]:
    """Every grid point of re-ranker `name` with its leave-one-out MAP@R on rows (x, y), in grid order
    (points whose neighbourhood does not fit the rows are left out)."""
    out = []
    grid = GRIDS[name]
    for values in itertools.product(*grid.values()):
        params = dict(zip(grid, values))
        if params.get("k", params.get("k1", 0)) >= len(x) - 2:
            continue
        scorer = rerank.build_reranker(name, **params)
        out.append((params, leave_one_out(scorer, x, y, gallery_chunk=len(x))["map_at_r"]))
    return out


def tuning_record(
    name: str, x: np.ndarray, y: np.ndarray, cache_dir: str | None = None, *, points: bool = False
) -> dict:
    """{params, map_at_r, grid, rows, points}: the best grid point of re-ranker `name` by leave-one-out MAP@R
    on rows (x, y) (the first, in grid order, of equal ones), and every point's MAP@R; cached. A cached record
    written before points were kept serves as it is unless `points` asks for them."""
    if name not in GRIDS:
        raise UnknownComponentError(f"no tuning grid for re-ranker {name!r}; valid: {', '.join(GRIDS)}")
    x = np.ascontiguousarray(x, np.float32)
    digest = hashlib.sha256(json.dumps(GRIDS[name]).encode() + x.tobytes() + np.asarray(y).tobytes()).hexdigest()[:24]
    path = Path(os.path.expanduser(cache_dir)) / "tuning" / f"{name}-{digest}.json" if cache_dir else None
    if path is not None and path.exists():
        saved = json.loads(path.read_text())
        if "points" in saved or not points:
            return saved
    scored = grid_scores(name, x, y)
    params, value = max(scored, key=lambda point: point[1], default=({}, -1.0))
    log.info("tuned %s on %d validation rows: %s (MAP@R %.4f)", name, len(x), params, value)
    record = {"params": params, "map_at_r": value, "grid": GRIDS[name], "rows": len(x), "points": scored}
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(record))
        os.replace(tmp, path)
    return record


def tune_reranker(name: str, x: np.ndarray, y: np.ndarray, cache_dir: str | None = None) -> tuple[dict, float]:
    """The grid point of re-ranker `name` with the best leave-one-out MAP@R on rows (x, y), and that MAP@R."""
    record = tuning_record(name, x, y, cache_dir)
    return record["params"], record["map_at_r"]


def tuned_scorer(name: str, x: np.ndarray, y: np.ndarray, cache_dir: str | None = None) -> Scorer:
    """Re-ranker `name` at its validation-tuned parameters, named so a table shows what was chosen."""
    params, _ = tune_reranker(name, x, y, cache_dir)
    shown = ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
    return dataclasses.replace(rerank.build_reranker(name, **params), name=f"{name}[val: {shown}]")
