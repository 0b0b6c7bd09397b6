"""`python -m cbir_jax.evaluate [checkpoint=RUN_DIR] [data=folder data.root=DIR]`

Compares the trained scorer (if a checkpoint is given) with the fixed metrics and re-rankers on the same
queries and gallery; prints one table and writes `metrics.json` ({scorer: {metric: value}}), `metrics.md`,
`per_query.npz` and `topk.png` under `RUN_DIR/eval/<date>_<time>/` (without a checkpoint:
`outputs/eval/<date>/<time>/`).

Examples:
  python -m cbir_jax.evaluate checkpoint=outputs/runs/<date>/<time>                  # its held-out split
  python -m cbir_jax.evaluate checkpoint=outputs/runs/<date>/<time> eval.select=last  # the last checkpoint
  python -m cbir_jax.evaluate checkpoint=outputs/runs/<date>/<time> data=folder data.root=DIR
  python -m cbir_jax.evaluate data=folder data.root=DIR                               # fixed metrics alone
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from cbir_jax.core.config import CONFIG_DIR
from cbir_jax.api.evaluation import run_evaluation
from cbir_jax.features.stage import load_stage
from cbir_jax.runs.cli import overridden_keys, print_outputs, run_dir, run_or_exit, to_typed
from cbir_jax.runs.trained import load_trained, trained_scorer
from cbir_jax.scoring.scorers import Scorer


def evaluate(cfg_dict: DictConfig, out_dir: Path, overridden: frozenset[str] = frozenset()) -> dict[str, dict[str, float]]:
    """Evaluates a checkpoint (or, without one, the fixed metrics alone) on the configured data."""
    cfg = to_typed(cfg_dict)
    learned: dict[str, Scorer] = {}
    if cfg.checkpoint:
        run = Path(cfg.checkpoint)
        cfg, info = load_trained(run, cfg_dict, overridden)
        on = cfg.eval.on if cfg.eval.on != "auto" else ("all" if "data" in overridden else "held_out")
        stage = load_stage(cfg, split_by="none" if on == "all" else None)
        learned[cfg.head.name] = trained_scorer(cfg, run, info, stage)
    else:
        on = "held_out" if cfg.eval.on == "held_out" else "all"
        stage = load_stage(cfg, split_by="none" if on == "all" else None)
    return run_evaluation(cfg, stage, learned, out_dir)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    out_dir = run_dir()
    results = run_or_exit(lambda: evaluate(cfg, out_dir, overridden_keys()))
    print_outputs(out_dir)
    first = next(iter(results.values()))
    return first[cfg.optimized_metric]


if __name__ == "__main__":
    main()
