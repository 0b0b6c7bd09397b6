"""Every point of a re-ranker's tuning grid on the validation categories (what `eval.tuned_baselines` picks from).

    python experiments/analysis/validation_grid.py k_reciprocal [OVERRIDES...]

Default overrides: the best_learned split of the dev folder (`experiment=best_learned data=folder
data.root=../shared/data/caltech101-dev data.split.by=class`). Each point is scored by
cbir_jax/evaluation/tuning.py (every validation row a leave-one-out query against the others), whose cache
(`cache_dir/tuning/`) it shares with training and evaluation; held-out rows are never scored.
"""

from __future__ import annotations

import sys

from hydra import compose, initialize_config_dir

from cbir_jax.core.config import CONFIG_DIR
from cbir_jax.evaluation import tuning
from cbir_jax.features.stage import as_gallery, load_stage
from cbir_jax.runs.cli import to_typed

SPLIT = ["experiment=best_learned", "data=folder", "data.root=../shared/data/caltech101-dev", "data.split.by=class"]


def main(argv: list[str]) -> None:
    name, overrides = argv[0], argv[1:] or SPLIT
    with initialize_config_dir(CONFIG_DIR, version_base="1.3"):
        cfg = to_typed(compose("config", overrides))
    stage = load_stage(cfg)
    rows = stage.split.val
    record = tuning.tuning_record(name, as_gallery(cfg, stage.features.features[rows]), stage.features.labels[rows],
                                  cfg.cache_dir, points=True)
    keys = list(tuning.GRIDS[name])
    print(f"{name} on {len(rows)} validation rows ({' '.join(overrides)})\n")
    print("| " + " | ".join(keys) + " | validation MAP@R |\n|" + "---|" * (len(keys) + 1))
    for params, value in sorted(record["points"], key=lambda point: -point[1]):
        print("| " + " | ".join(str(params[k]) for k in keys) + f" | {value:.4f} |")


if __name__ == "__main__":
    main(sys.argv[1:])
