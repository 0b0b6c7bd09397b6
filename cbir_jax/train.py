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
from cbir_jax.evaluation.runner import evaluate_stage, validation_metrics, verdict
from cbir_jax.features.stage import load_stage
from cbir_jax.runs.cli import print_outputs, run_dir, run_or_exit, to_typed
from cbir_jax.training.diagnosis import run_diagnostics
from cbir_jax.training.fit import fit


def train(cfg: Config, out_dir: Path) -> dict[str, dict[str, float]]:
    """Trains and (if `train.evaluate`) evaluates; returns {scorer: {metric: value}} or {}."""
    stage = load_stage(cfg)
    scorer, diagnosable = fit(cfg, stage, out_dir)
    if cfg.train.diagnose:
        run_diagnostics(cfg, stage, diagnosable, out_dir)
    if not cfg.train.evaluate:
        return {}
    results = evaluate_stage(cfg, stage, {cfg.head.name: scorer}, out_dir)
    note = verdict(results, cfg.head.name)
    if note:
        print(note, flush=True)
    if len(stage.split.val) and stage.features.labels is not None:
        # What a hyper-parameter search may choose by (`optimized_metric=val_map_at_r`): never the held-out rows.
        val = {f"val_{k}": v for k, v in validation_metrics(cfg, stage, scorer).items()}
        atomic_write_text(out_dir / "validation.json", json.dumps({cfg.head.name: val}, indent=2))
        results[cfg.head.name] = {**results[cfg.head.name], **val}
    return results


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    out_dir = run_dir()
    results = run_or_exit(lambda: train(to_typed(cfg), out_dir))
    print_outputs(out_dir)
    # The value a Hydra sweeper optimises (`optimized_metric`): the trained scorer's; `val_*` on validation rows.
    return results.get(cfg.head.name, {}).get(cfg.optimized_metric) if results else None


if __name__ == "__main__":
    main()
