"""`python -m cbir_jax.train head=mlp labels=ssim_ratio` — the main job.

Extracts (or loads cached) features, trains the scorer `head` names, checkpoints it, then evaluates it
beside the fixed metrics on the held-out images. Everything goes into the run folder it prints at the end
(`outputs/runs/<date>/<time>/`): checkpoints, metrics.jsonl, curves.png, tensorboard/, metrics.md.

From Python or a notebook: `cbir_jax.fit("head=mlp", "train.epochs=2")` (below) runs the same job and
returns the run and its metrics.

Examples:
  python -m cbir_jax.train head=mlp labels=ssim_ratio
  python -m cbir_jax.train head=cosine_residual data=folder data.root=DIR train.epochs=20
  python -m cbir_jax.train experiment=best_learned data=folder data.root=DIR
  python -m cbir_jax.train -m head=mlp,simnet seed=0,1,2    # a sweep, one job each: outputs/multirun/
  python -m cbir_jax.train head=mlp labels=ssim_ratio train.resume=true hydra.run.dir=outputs/runs/<date>/<time>
  tensorboard --logdir outputs/                               # the runs' curves, live
"""

from __future__ import annotations

import dataclasses
import datetime
import json
import os
from pathlib import Path
from typing import Any, Optional, Union

import hydra
from omegaconf import DictConfig, OmegaConf

import cbir_jax.training.fit
from cbir_jax.core.config import CONFIG_DIR, Config, run_dir_for
from cbir_jax.core.files import atomic_write_text
from cbir_jax.api.evaluation import run_evaluation
from cbir_jax.evaluation.runner import validation_metrics, verdict
from cbir_jax.features.stage import load_stage
from cbir_jax.runs import lifecycle
from cbir_jax.runs.cli import print_outputs, run_dir, run_or_exit, to_typed
from cbir_jax.runs.trained import Run, load_run
from cbir_jax.training.diagnosis import run_diagnostics
from cbir_jax.training.metrics_log import read_records


def train(cfg: Config, out_dir: Path) -> dict[str, dict[str, float]]:
    """Trains and (if `train.evaluate`) evaluates; returns {scorer: {metric: value}} (metrics.json) or {}."""
    return train_and_validate(cfg, out_dir)[0]


def train_and_validate(cfg: Config, out_dir: Path) -> tuple[dict[str, dict[str, float]], dict[str, float]]:
    """`train`, plus the trained scorer's metrics on the validation rows (validation.json; {} without any):
    what a hyper-parameter search may choose by (`optimized_metric=val_*`), never the held-out rows."""
    stage = load_stage(cfg)
    scorer, diagnosable = cbir_jax.training.fit.fit(cfg, stage, out_dir)  # `fit` below is the public call
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


@dataclasses.dataclass(frozen=True)
class Trained:
    """What `fit` returns: the finished `run` (as `load_run` reads it), the held-out table `metrics`
    ({scorer: {metric: value}}, as metrics.json; {} with `train.evaluate=false`), the trained scorer's
    `validation` metrics, and `history`, the records of metrics.jsonl (the curves)."""

    run: Run
    metrics: dict[str, dict[str, float]]
    validation: dict[str, float]
    history: list[dict[str, Any]]

    @property
    def path(self) -> Path:
        return self.run.path

    def __repr__(self) -> str:
        return f"Trained({self.run!r}, scorers={sorted(map(str, self.metrics))}, {len(self.history)} records)"


def fit(*overrides: str, out_dir: Optional[Union[str, os.PathLike]] = None) -> Trained:
    """Trains as `python -m cbir_jax.train OVERRIDES...` does (e.g. `fit("head=mlp", "train.epochs=2")`) into
    `out_dir` (default `outputs/runs/<date>/<time>/`, relative to the working directory, as the command)."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        cfg_dict = compose("config", overrides=list(overrides))
    cfg = to_typed(cfg_dict)  # every value in its range before anything is written
    if out_dir is None:
        stamp = datetime.datetime.now().strftime("%Y-%m-%d/%H-%M-%S-%f")
        out_dir = run_dir_for("train", None, stamp)
    run_dir = Path(out_dir)
    lifecycle.check_output_dir(run_dir, cfg_dict, app="train")
    (run_dir / ".hydra").mkdir(parents=True, exist_ok=True)
    OmegaConf.save(cfg_dict, run_dir / ".hydra" / "config.yaml")  # what Hydra saves: load_run reads it
    OmegaConf.save(OmegaConf.create(list(overrides)), run_dir / ".hydra" / "overrides.yaml")
    metrics, validation = train_and_validate(cfg, run_dir)
    print_outputs(run_dir)
    return Trained(run=load_run(run_dir, cache_dir=cfg.cache_dir), metrics=metrics, validation=validation,
                   history=read_records(run_dir))


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float | None:
    out_dir = run_dir()
    results, validation = run_or_exit(lambda: train_and_validate(to_typed(cfg), out_dir))
    print_outputs(out_dir)
    # The value a Hydra sweeper optimises (`optimized_metric`): the trained scorer's; `val_*` on validation rows.
    return {**results.get(cfg.head.name, {}), **validation}.get(cfg.optimized_metric)


if __name__ == "__main__":
    main()
