"""`python -m cbir_jax.train head=mlp labels=ssim_ratio` — the main job.

Extracts (or loads cached) features, trains the pair head on pairs of training images with heuristic
targets, checkpoints it, then evaluates it beside the fixed metrics on the held-out images.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig

from cbir_jax import checkpointing, heads, pair_labels, scorers, selection, trainer
from cbir_jax.cli import run_dir, run_or_exit, to_typed
from cbir_jax.config import CONFIG_DIR, Config
from cbir_jax.evaluate import evaluate_stage, verdict
from cbir_jax.pipeline import load_stage, postprocessed

log = logging.getLogger(__name__)


def train(cfg: Config, out_dir: Path) -> dict[str, dict[str, float]]:
    """Trains and (if `train.evaluate`) evaluates; returns {scorer: {metric: value}} or {}."""
    stage = load_stage(cfg)
    fs, split = stage.features, stage.split
    raw_train = fs.features[split.train]
    train_x = postprocessed(cfg, raw_train, fit_on=raw_train)
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
    checkpointing.write_model_info(
        out_dir,
        {
            "head": cfg.head.name,
            "feature_dim": int(train_x.shape[1]),
            "backbone": stage.backbone.name,
            "backbone_fingerprint": stage.backbone.fingerprint,
            "backbone_feature_dim": stage.backbone.feature_dim,
            "train_images": int(len(split.train)),
        },
    )
    if cfg.train.diagnose:
        from cbir_jax.diagnose import run_diagnostics

        run_diagnostics(cfg, stage, {cfg.head.name: (head, params)} if params else {}, out_dir)
    if not cfg.train.evaluate:
        return {}
    results = evaluate_stage(cfg, stage, {cfg.head.name: scorers.head_scorer(cfg.head, head, params)}, out_dir)
    note = verdict(results, cfg.head.name)
    if note:
        print(note, flush=True)
    return results


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    results = run_or_exit(lambda: train(to_typed(cfg), run_dir()))
    # The value a Hydra sweeper optimises: the trained head's mAP@R on held-out images.
    return results.get(cfg.head.name, {}).get("map_at_r") if results else None


if __name__ == "__main__":
    main()
