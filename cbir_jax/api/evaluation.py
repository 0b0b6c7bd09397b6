"""Evaluation as the `train` and `evaluate` jobs write it: the table and files of `evaluation/runner.py`,
then the top-k figure, ranked by the evaluation gallery as an `Index` (the one object that ranks a gallery)."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from cbir_jax.api.index import Index
from cbir_jax.core.config import Config
from cbir_jax.data.imageops import resize_square
from cbir_jax.evaluation import figures
from cbir_jax.evaluation.runner import compared_scorers, evaluate_stage
from cbir_jax.features import postprocess
from cbir_jax.features.stage import Stage
from cbir_jax.scoring.scorers import Scorer


def run_evaluation(cfg: Config, stage: Stage, learned: dict[str, Scorer], out_dir: Path) -> dict[str, dict[str, float]]:
    """Learned scorers beside the configured baselines on the stage's queries and gallery: one table,
    metrics.json, metrics.md, per_query.npz and (with `eval.figure`) topk.png in `out_dir`."""
    scorers = compared_scorers(cfg, stage, learned)
    results = evaluate_stage(cfg, stage, scorers, out_dir)
    if cfg.eval.figure:
        topk_figure(cfg, stage, scorers, out_dir / "topk.png")
    return results


def topk_figure(cfg: Config, stage: Stage, scorers: dict[str, Scorer], path: Path) -> Path:
    """The first query's top-k under every scorer, side by side (the seed's figure, for every scorer); a
    green frame marks a relevant item."""
    fs, split = stage.features, stage.split
    index = Index.from_stage(cfg, stage, scorers, rows=split.gallery)
    query = postprocess.apply(index.post, fs.features[split.query[:1]])
    label = fs.labels[split.query[0]]
    rows = {}
    for name in scorers:
        scores, ids = index.rank(query, cfg.eval.k, scorer=name, exclude=split.self_index[:1])
        rows[name] = [(resize_square(index.image(i), 128), float(s), bool(index.labels[i] == label))
                      for s, i in zip(scores[0], ids[0]) if i >= 0]
    figures.topk_grid(fs.image(split.query[0]), rows, path, title=fs.ids[split.query[0]])
    return path
