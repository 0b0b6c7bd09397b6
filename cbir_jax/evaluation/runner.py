"""Evaluation of scorers on a stage's queries and gallery: one table, `metrics.json`, per-query MAP@R.

Every learned scorer is compared with the configured baselines on the same queries, so rows of one table
(and `report --versus`) are paired comparisons.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np

from cbir_jax.core.config import Config
from cbir_jax.core.files import atomic_write_text
from cbir_jax.data import DataError
from cbir_jax.evaluation import tuning
from cbir_jax.evaluation.retrieval import check_evaluable, evaluate_scorer, format_table, leave_one_out
from cbir_jax.features import postprocess
from cbir_jax.features.stage import Stage, as_gallery
from cbir_jax.scoring.baselines import baseline_scorer
from cbir_jax.scoring.scorers import Scorer

log = logging.getLogger(__name__)


def compared_scorers(cfg: Config, stage: Stage, learned: dict[str, Scorer]) -> dict[str, Scorer]:
    """The learned scorers, then `eval.baselines`, then `eval.tuned_baselines` tuned on the validation rows:
    every row of one table."""
    all_scorers = dict(learned)
    for name in cfg.eval.baselines:
        if name not in all_scorers:
            all_scorers[name] = baseline_scorer(name)
    if cfg.eval.tuned_baselines:
        if len(stage.split.val) == 0:
            raise DataError("eval.tuned_baselines needs validation rows: set data.split.val_fraction > 0")
        rows = stage.split.val
        val = as_gallery(cfg, stage.features.features[rows])
        for name in cfg.eval.tuned_baselines:
            scorer = tuning.tuned_scorer(name, val, stage.features.labels[rows], cfg.cache_dir)
            all_scorers[scorer.name] = scorer
    return all_scorers


def evaluate_stage(cfg: Config, stage: Stage, all_scorers: dict[str, Scorer], out_dir: Path) -> dict[str, dict[str, float]]:
    """Evaluates every scorer on the stage's queries and gallery; prints one table and writes metrics.json,
    metrics.md and per_query.npz into `out_dir`."""
    fs, split = stage.features, stage.split
    labels = fs.labels
    if labels is None:
        raise DataError(f"{fs.dataset.name}: no class labels (a flat folder); it is searchable but not evaluable")
    check_evaluable(labels[split.query], labels[split.gallery], split.self_index, fs.dataset.name)
    post = postprocess.fit(cfg.features, fs.features[split.gallery])
    gallery, queries = postprocess.apply(post, fs.features[split.gallery]), postprocess.apply(post, fs.features[split.query])
    results: dict[str, dict[str, float]] = {}
    per_query: dict[str, np.ndarray] = {}
    for name, scorer in all_scorers.items():
        values: dict[str, np.ndarray] = {}
        results[name] = evaluate_scorer(
            scorer, queries, gallery, labels[split.query], labels[split.gallery], split.self_index,
            query_chunk=cfg.eval.query_chunk, gallery_chunk=cfg.eval.gallery_chunk, per_query=values,
        )
        per_query[name] = values["map_at_r"]
    table = format_table(results, title=f"{fs.dataset.name} · {stage.backbone.name} · {len(split.query)} queries × {len(split.gallery)} gallery")
    print(table, flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "metrics.json", json.dumps(results, indent=2))
    atomic_write_text(out_dir / "metrics.md", table + "\n")
    # Per-query MAP@R of every scorer, same query order: paired comparisons (cbir_jax.evaluation.significance).
    np.savez(out_dir / "per_query.npz", **{name: v for name, v in per_query.items()})
    return results


def validation_metrics(cfg: Config, stage: Stage, scorer: Scorer) -> dict[str, float]:
    """The scorer's leave-one-out metrics on the split's validation rows, post-processed as a gallery of their
    own (as training's model selection sees them)."""
    rows = stage.split.val
    return leave_one_out(scorer, as_gallery(cfg, stage.features.features[rows]), stage.features.labels[rows],
                         query_chunk=cfg.eval.query_chunk, gallery_chunk=cfg.eval.gallery_chunk)


def verdict(results: dict[str, dict[str, float]], learned: str, metric: str = "map_at_r") -> str:
    """One line when the learned scorer ranks below the best baseline in the table, else ''."""
    if learned not in results:
        return ""
    others = {k: v[metric] for k, v in results.items() if k != learned}
    if not others:
        return ""
    best = max(others, key=others.get)
    ours = results[learned][metric]
    if ours >= others[best]:
        return ""
    return (
        f"note: the learned head ({learned}) is below {best} on {metric}: {ours:.4f} vs {others[best]:.4f}. "
        "See `python -m cbir_jax.diagnose` and experiments/README.md (why learned heads fail)."
    )


