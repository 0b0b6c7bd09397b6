"""How far can learned DBA weights go? An upper bound with oracle weights (learned_reranking study).

    python experiments/analysis/oracle_weights.py

DBA + alpha-QE at the validation-tuned parameters (k=50, alpha=3, qe_k=15, qe_alpha=1) on the
learned_reranking split, three ways: DBA's own weights max(cos, 0)^alpha; the same weights zeroed for
every neighbour of another category on the database side (what a perfect learned database side could do);
and zeroed on the query side as well. Labels are read here only to build the bound: no scorer sees them.
Leave-one-out is approximate here (each row is removed from its own neighbours, not from the others'),
so the first row is compared with the exact DBA + alpha-QE of the study's table.
"""

from __future__ import annotations

import numpy as np
from hydra import compose, initialize_config_dir

from cbir_jax.runs.cli import to_typed
from cbir_jax.core.config import CONFIG_DIR
from cbir_jax.evaluation.metrics import MetricAccumulator
from cbir_jax.features.stage import load_stage, postprocessed

K, ALPHA, QE_K, QE_ALPHA = 50, 3.0, 15, 1.0


def augmented(x: np.ndarray, nbr: np.ndarray, w: np.ndarray) -> np.ndarray:
    d = x + np.einsum("nk,nkd->nd", w, x[nbr])
    return d / np.linalg.norm(d, axis=1, keepdims=True)


def map_at_r(x: np.ndarray, y: np.ndarray, oracle_gallery: bool, oracle_query: bool) -> float:
    s = x @ x.T
    np.fill_diagonal(s, -np.inf)
    nbr = np.argsort(-s, axis=1)[:, :K]
    w = np.maximum(np.take_along_axis(s, nbr, 1), 0) ** ALPHA
    same = y[nbr] == y[:, None]
    d = augmented(x, nbr, w * same if oracle_gallery else w)
    v = augmented(x, nbr, w * same) if oracle_query else x
    s1 = v @ d.T
    np.fill_diagonal(s1, -np.inf)
    top = np.argsort(-s1, axis=1)[:, :QE_K]
    qe_w = np.maximum(np.take_along_axis(s1, top, 1), 0) ** QE_ALPHA
    expanded = v + np.einsum("nt,ntd->nd", qe_w, d[top])
    expanded /= np.linalg.norm(expanded, axis=1, keepdims=True)
    acc = MetricAccumulator()
    acc.add(expanded @ d.T, y[:, None] == y[None, :], np.arange(len(y)))
    return acc.result()["map_at_r"]


def main() -> None:
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = to_typed(compose("config", ["experiment=learned_reranking"]))
    stage = load_stage(cfg)
    fs, split = stage.features, stage.split
    print("| rows | DBA + α-QE | oracle database side | oracle both sides |\n|---|---|---|---|")
    for name, rows in (("validation categories", split.val), ("held-out categories", split.gallery)):
        x = postprocessed(cfg, fs.features[rows], fit_on=fs.features[rows])
        y = fs.labels[rows]
        cells = [map_at_r(x, y, g, q) for g, q in ((False, False), (True, False), (True, True))]
        print(f"| {name} ({len(rows)}) | " + " | ".join(f"{c:.4f}" for c in cells) + " |")


if __name__ == "__main__":
    main()
