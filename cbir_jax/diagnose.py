"""`python -m cbir_jax.diagnose [checkpoint=RUN] [labels=...] [data=...]` — why a head ranks as it does.

Without a checkpoint it diagnoses the label heuristic (and cosine) before any training; with one, also the
trained head (its `eval.select` checkpoint) on the run's own split:

- label quality: ROC-AUC of the target for same- vs different-class pairs, on training and held-out
  rows; Spearman of the target with cosine; share of its variance that is per-image (t_ij ~ a_i + a_j);
- fit: Spearman of the head's output with the target, on the training pairs of epoch 0 and on fresh pairs;
- ranking: leave-one-out MAP@R on the training rows beside the held-out rows;
- hubness: skewness of N10 and the share of top-10 slots taken by the 1% most frequent items.

Prints two tables (the label, the scorers); writes every number to `diagnostics.json`, and `diagnostics.png`, into `RUN/diagnose/<date>_<time>/` with a checkpoint, else
`outputs/diagnose/<date>/<time>/`.
`train.diagnose=true` runs the same at the end of training (what the `diagnostics` study tabulates).

Examples:
  python -m cbir_jax.diagnose labels=ssim_ratio                     # the label heuristic, before training
  python -m cbir_jax.diagnose checkpoint=outputs/runs/<date>/<time>  # and that run's head
"""

from __future__ import annotations

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
    print(summary(result), flush=True)
    return result


LABEL_COLUMNS = ("auc_same_class", "spearman_with_cosine", "additive_share", "mean_target_same", "mean_target_different")
# (column, where in a scorer's block): the numbers the README's reading of a diagnosis uses.
SCORER_COLUMNS = (
    ("fit (train pairs)", ("fit_train_pairs",)),
    ("fit (fresh pairs)", ("fit_fresh_pairs",)),
    ("AUC same class", ("pairs", "auc_same_class")),
    ("MAP@R train rows", ("train_rows", "map_at_r")),
    ("MAP@R held-out", ("held_out_rows", "map_at_r")),
    ("P@1 held-out", ("held_out_rows", "precision_at_1")),
    ("N10 skew held-out", ("held_out_rows", "n10_skewness")),
    ("top-1% share held-out", ("held_out_rows", "n10_top1pct_share")),
)


def summary(result: dict[str, Any]) -> str:
    """Two markdown tables (the label's quality, each scorer's fit and ranking) instead of the raw JSON,
    which diagnostics.json keeps in full."""
    label, rows = result["label"], result["rows"]
    lines = [f"**label {label['name']}** ({rows['train']} training rows, {rows['held_out']} held-out rows, "
             f"{rows['pairs']:,} training pairs)", "",
             "| rows | " + " | ".join(LABEL_COLUMNS) + " |", "|---" * (len(LABEL_COLUMNS) + 1) + "|"]
    for side in ("train", "held_out"):
        lines.append(f"| {side} | " + " | ".join(_number(label[side].get(c)) for c in LABEL_COLUMNS) + " |")
    lines += ["", "| scorer | " + " | ".join(c for c, _ in SCORER_COLUMNS) + " |", "|---" * (len(SCORER_COLUMNS) + 1) + "|"]
    for name, block in result["scorers"].items():
        lines.append(f"| {name} | " + " | ".join(_number(_at(block, path)) for _, path in SCORER_COLUMNS) + " |")
    return "\n".join(lines)


def _at(block: dict[str, Any], path: tuple[str, ...]) -> Any:
    for key in path:
        block = block.get(key) if isinstance(block, dict) else None
    return block


def _number(value: Any) -> str:
    return "–" if value is None else f"{value:.4f}" if isinstance(value, float) else str(value)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    out_dir = run_dir()
    run_or_exit(lambda: diagnose(cfg, out_dir, overridden_keys()))
    print_outputs(out_dir)


if __name__ == "__main__":
    main()
