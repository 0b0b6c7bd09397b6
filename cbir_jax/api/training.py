"""`cbir_jax.fit(...)`: the main job called from Python or a notebook, with the command line's overrides.

It composes the same config as `python -m cbir_jax.train` (the package's configs, the same defaults and
checks), writes the same run folder, and returns the run ready to search with and its metrics, instead of
exiting: a mistake raises its one-line `UserError` in the notebook rather than ending the kernel.
"""

from __future__ import annotations

import dataclasses
import datetime
import os
from pathlib import Path
from typing import Any, Optional, Union

from omegaconf import OmegaConf

from cbir_jax.core.config import CONFIG_DIR, run_dir_for
from cbir_jax.runs.trained import Run


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

    from cbir_jax.runs import lifecycle
    from cbir_jax.runs.cli import print_outputs, to_typed
    from cbir_jax.runs.trained import load_run
    from cbir_jax.train import train_and_validate
    from cbir_jax.training.metrics_log import read_records

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
