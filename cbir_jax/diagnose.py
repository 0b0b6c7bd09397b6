"""`python -m cbir_jax.diagnose [checkpoint=RUN] [labels=...] [data=...]` — why a head ranks as it does.

Without a checkpoint it diagnoses the label heuristic (and cosine) before any training; with one, also the
trained head (its `eval.select` checkpoint) on the run's own split:

- label quality: ROC-AUC of the target for same- vs different-class pairs, on training and held-out
  rows; Spearman of the target with cosine; share of its variance that is per-image (t_ij ~ a_i + a_j);
- fit: Spearman of the head's output with the target, on the training pairs of epoch 0 and on fresh pairs;
- ranking: leave-one-out MAP@R on the training rows beside the held-out rows;
- hubness: skewness of N10 and the share of top-10 slots taken by the 1% most frequent items.

Writes `diagnostics.json` and `diagnostics.png` into `RUN/diagnose/<date>_<time>/` with a checkpoint, else
`outputs/diagnose/<date>/<time>/`.
`train.diagnose=true` runs the same at the end of training (what the `diagnostics` study tabulates).

Examples:
  python -m cbir_jax.diagnose labels=ssim_ratio                     # the label heuristic, before training
  python -m cbir_jax.diagnose checkpoint=outputs/runs/<date>/<time>  # and that run's head
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import hydra
from omegaconf import DictConfig

from cbir_jax.core.config import CONFIG_DIR
from cbir_jax.features.stage import load_stage
from cbir_jax.runs.cli import overridden_keys, print_outputs, run_dir, run_or_exit, to_typed
from cbir_jax.runs.trained import load_trained, restored_head
from cbir_jax.training.diagnosis import run_diagnostics


def diagnose(cfg_dict: DictConfig, out_dir: Path, overridden: frozenset[str] = frozenset()) -> dict[str, Any]:
    """Diagnostics of the configured label (and, with `checkpoint=RUN`, of that run's head)."""
    cfg = to_typed(cfg_dict)
    learned = {}
    if cfg.checkpoint:
        run = Path(cfg.checkpoint)
        cfg, info = load_trained(run, cfg_dict, overridden)
        stage = load_stage(cfg)
        learned[cfg.head.name] = restored_head(cfg, run, info, stage)
    else:
        stage = load_stage(cfg)
    result = run_diagnostics(cfg, stage, learned, out_dir)
    print(json.dumps(result, indent=2), flush=True)
    return result


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    out_dir = run_dir()
    run_or_exit(lambda: diagnose(cfg, out_dir, overridden_keys()))
    print_outputs(out_dir)


if __name__ == "__main__":
    main()
