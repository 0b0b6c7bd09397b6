"""`python -m cbir_jax.train head=mlp labels=ssim_ratio` — the main job.

Extracts (or loads cached) features, trains the scorer `head` names, checkpoints it, then evaluates it
beside the fixed metrics on the held-out images. Everything goes into the run folder it prints at the end
(`outputs/runs/<date>/<time>/`): checkpoints, metrics.jsonl, curves.png, tensorboard/, metrics.md.

Examples:
  python -m cbir_jax.train head=mlp labels=ssim_ratio
  python -m cbir_jax.train head=cosine_residual data=folder data.root=DIR train.epochs=20
  python -m cbir_jax.train experiment=best_learned data=folder data.root=DIR
  python -m cbir_jax.train -m head=mlp,simnet seed=0,1,2    # a sweep, one job each: outputs/multirun/
  python -m cbir_jax.train head=mlp labels=ssim_ratio train.resume=true hydra.run.dir=outputs/runs/<date>/<time>
  tensorboard --logdir outputs/                               # the runs' curves, live
"""

from __future__ import annotations

import json
from pathlib import Path

import hydra
from omegaconf import DictConfig

from cbir_jax.core.config import CONFIG_DIR, Config
from cbir_jax.core.files import atomic_write_text
from cbir_jax.api.evaluation import run_evaluation
from cbir_jax.evaluation.runner import validation_metrics, verdict
from cbir_jax.features.stage import load_stage
from cbir_jax.runs.cli import print_outputs, run_dir, run_or_exit, to_typed
from cbir_jax.training.diagnosis import run_diagnostics
from cbir_jax.training.fit import fit


def train(cfg: Config, out_dir: Path) -> dict[str, dict[str, float]]:
    """Trains and (if `train.evaluate`) evaluates; returns {scorer: {metric: value}} (metrics.json) or {}."""
    return train_and_validate(cfg, out_dir)[0]


def train_and_validate(cfg: Config, out_dir: Path) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """`train`, plus the trained scorer's metrics on the validation rows (validation.json; {} without any):
    what a hyper-parameter search may choose by (`optimized_metric=val_*`), never the held-out rows."""
    stage = load_stage(cfg)
    scorer, diagnosable = fit(cfg, stage, out_dir)
    if cfg.train.diagnose:
        run_diagnostics(cfg, stage, diagnosable, out_dir)
    if not cfg.train.evaluate:
        return {}, {}
    results = run_evaluation(cfg, stage, {cfg.head.name: scorer}, out_dir)
    note = verdict(results, cfg.head.name)
    if note:
        print(note, flush=True)
    validation = {}
    if len(stage.split.val) and stage.features.labels is not None:
        validation = {f"val_{k}": v for k, v in validation_metrics(cfg, stage, scorer).items()}
        atomic_write_text(out_dir / "validation.json", json.dumps({cfg.head.name: validation}, indent=2))
    return results, validation


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    out_dir = run_dir()
    results, validation = run_or_exit(lambda: train_and_validate(to_typed(cfg), out_dir))
    print_outputs(out_dir)
    # The value a Hydra sweeper optimises (`optimized_metric`): the trained scorer's; `val_*` on validation rows.
    return {**results.get(cfg.head.name, {}), **validation}.get(cfg.optimized_metric)


if __name__ == "__main__":
    main()
