"""Training a scorer, whatever its kind: a pair head on heuristic pair targets, or a learned re-ranker."""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path
from typing import Any

import jax
import numpy as np

from cbir_jax.core.config import Config
from cbir_jax.data import DataError
from cbir_jax.evaluation import tuning
from cbir_jax.features.stage import Stage, as_gallery
from cbir_jax.labels import pair_labels
from cbir_jax.scoring import heads, learned_rerank
from cbir_jax.scoring.compose import head_scorer
from cbir_jax.scoring.scorers import Scorer
from cbir_jax.training import checkpointing, losses, rerank_training, selection, trainer

log = logging.getLogger(__name__)


def _train_pair_head(cfg: Config, stage: Stage, train_x: np.ndarray, out_dir: Path) -> tuple[Scorer, dict, dict]:
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
        keeper = selection.make_keeper(cfg, stage, lambda p: head_scorer(cfg.head, head, p), out_dir)
        init = heads.init_params(head, train_x.shape[1], jax.random.key(cfg.seed))
        params = trainer.train(cfg, init, trainer.PairBatches.build(cfg, train_x, context),
                               trainer.pair_head_step(head, losses.get_loss(cfg.loss)), out_dir, keeper,
                               title=f"head={cfg.head.name} labels={cfg.labels.name} loss={cfg.loss.name}")
        if keeper is not None:
            print(selection.describe(keeper.selection, heads.base_metric(cfg.head)), flush=True)
        params = selection.selected_params(cfg.eval.select, out_dir, params, keeper)
    diagnosable = {cfg.head.name: (head, params)} if params else {}
    return head_scorer(cfg.head, head, params), {}, diagnosable


def _train_reranker(cfg: Config, stage: Stage, train_x: np.ndarray, out_dir: Path) -> tuple[Scorer, dict, dict]:
    fs, split = stage.features, stage.split
    val_x = as_gallery(cfg, fs.features[split.val]) if len(split.val) else train_x[:0]
    val_y = fs.labels[split.val] if len(split.val) else None
    if cfg.head.reranker.base == "tuned":
        if val_y is None:
            raise DataError("head.reranker.base=tuned needs validation rows: set data.split.val_fraction > 0")
        chosen, _ = tuning.tune_reranker("dba_alpha_qe", val_x, val_y, cfg.cache_dir)
        reranker = dataclasses.replace(cfg.head.reranker, base="fixed", **chosen)
        cfg = dataclasses.replace(cfg, head=dataclasses.replace(cfg.head, reranker=reranker))  # the caller's stays
        log.info("re-ranker base: DBA + alpha-QE tuned on validation rows: %s", chosen)
    params, summary = rerank_training.train_reranker(
        cfg, train_x, lambda: None if fs.labels is None else fs.labels[split.train], val_x, val_y, out_dir
    )
    spec = cfg.head.reranker
    scorer = learned_rerank.learned_scorer(learned_rerank.build_model(spec), params, spec, cfg.head.name)
    return scorer, {"reranker": {**summary, "config": dataclasses.asdict(cfg.head.reranker)}}, {}


# What trains each kind of learned scorer -> (scorer, facts for model.json, heads the diagnostics can read);
# every other head is a pair head.
TRAINERS = {"learned_rerank": _train_reranker}


def fit(cfg: Config, stage: Stage, out_dir: Path) -> tuple[Scorer, dict[str, tuple[Any, Any]]]:
    """Trains the scorer `cfg.head` names on the stage's training rows; writes `model.json` last (a finished
    run). Returns the scorer and the heads the diagnostics can read."""
    raw_train = stage.features.features[stage.split.train]
    train_x = as_gallery(cfg, raw_train)
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
    return scorer, diagnosable
