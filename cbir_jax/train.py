"""`python -m cbir_jax.train head=mlp labels=ssim_ratio` — the main job.

Extracts (or loads cached) features, trains the pair head on pairs of training images with heuristic
targets, checkpoints it, then evaluates it beside the fixed metrics on the held-out images.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import hydra
import numpy as np
from omegaconf import DictConfig

from cbir_jax import checkpointing, heads, learned_rerank, pair_labels, rerank_training, scorers, selection, trainer, tuning
from cbir_jax.cli import run_dir, run_or_exit, to_typed
from cbir_jax.config import CONFIG_DIR, Config
from cbir_jax.data import DataError
from cbir_jax.evaluate import evaluate_stage, verdict
from cbir_jax.pipeline import Stage, load_stage, postprocessed

log = logging.getLogger(__name__)


def _train_pair_head(cfg: Config, stage: Stage, train_x: np.ndarray, out_dir: Path) -> tuple[scorers.Scorer, dict, dict]:
    fs, split = stage.features, stage.split
    head = heads.build_head(cfg.head)
    params = {}
    if heads.is_learned(cfg.head.name):

        def train_labels():
            labels = fs.labels
            return None if labels is None else labels[split.train]

        context = pair_labels.PairContext(
            features=train_x, thumbnails=fs.thumbnails[split.train], class_labels=train_labels, cfg=cfg.labels
        )
        keeper = selection.make_keeper(cfg, stage, head, out_dir)
        params = trainer.train_head(cfg, head, train_x, context, out_dir, keeper)
        if keeper is not None:
            print(selection.describe(keeper.selection, heads.base_metric(cfg.head)), flush=True)
        params = selection.selected_params(cfg.eval.select, out_dir, params, keeper)
    diagnosable = {cfg.head.name: (head, params)} if params else {}
    return scorers.head_scorer(cfg.head, head, params), {}, diagnosable


def _train_reranker(cfg: Config, stage: Stage, train_x: np.ndarray, out_dir: Path) -> tuple[scorers.Scorer, dict, dict]:
    fs, split = stage.features, stage.split
    val_x = postprocessed(cfg, fs.features[split.val], fit_on=fs.features[split.val]) if len(split.val) else train_x[:0]
    val_y = fs.labels[split.val] if len(split.val) else None
    if cfg.head.reranker.base == "tuned":
        if val_y is None:
            raise DataError("head.reranker.base=tuned needs validation rows: set data.split.val_fraction > 0")
        chosen, _ = tuning.tune_reranker("dba_alpha_qe", val_x, val_y, cfg.cache_dir)
        cfg.head.reranker = dataclasses.replace(cfg.head.reranker, base="fixed", **chosen)
        log.info("re-ranker base: DBA + alpha-QE tuned on validation rows: %s", chosen)
    params, summary = rerank_training.train_reranker(
        cfg, train_x, lambda: None if fs.labels is None else fs.labels[split.train], val_x, val_y, out_dir
    )
    spec = rerank_training.spec_from_config(cfg.head.reranker)
    scorer = learned_rerank.learned_scorer(learned_rerank.build_model(spec), params, spec, cfg.head.name)
    return scorer, {"reranker": {**summary, "config": dataclasses.asdict(cfg.head.reranker)}}, {}


# What trains each kind of learned scorer -> (scorer, facts for model.json, heads the diagnostics can read);
# every other head is a pair head.
TRAINERS = {"learned_rerank": _train_reranker}


def train(cfg: Config, out_dir: Path) -> dict[str, dict[str, float]]:
    """Trains and (if `train.evaluate`) evaluates; returns {scorer: {metric: value}} or {}."""
    stage = load_stage(cfg)
    raw_train = stage.features.features[stage.split.train]
    train_x = postprocessed(cfg, raw_train, fit_on=raw_train)
    scorer, extra, diagnosable = TRAINERS.get(cfg.head.name, _train_pair_head)(cfg, stage, train_x, out_dir)
    checkpointing.write_model_info(
        out_dir,
        {
            "head": cfg.head.name,
            "feature_dim": int(train_x.shape[1]),
            "backbone": stage.backbone.name,
            "backbone_fingerprint": stage.backbone.fingerprint,
            "backbone_feature_dim": stage.backbone.feature_dim,
            "train_images": int(len(stage.split.train)),
            "val_images": int(len(stage.split.val)),
            **extra,
        },
    )
    if cfg.train.diagnose:
        from cbir_jax.diagnose import run_diagnostics

        run_diagnostics(cfg, stage, diagnosable, out_dir)
    if not cfg.train.evaluate:
        return {}
    results = evaluate_stage(cfg, stage, {cfg.head.name: scorer}, out_dir)
    note = verdict(results, cfg.head.name)
    if note:
        print(note, flush=True)
    return results


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    results = run_or_exit(lambda: train(to_typed(cfg), run_dir()))
    # The value a Hydra sweeper optimises (`optimized_metric`): the trained scorer's, on held-out images.
    return results.get(cfg.head.name, {}).get(cfg.optimized_metric) if results else None


if __name__ == "__main__":
    main()
