"""`python -m cbir_jax.index data=folder data.root=DIR out=FILE [backbone=...] [checkpoint=RUN]`

Indexes a folder once into one file (`cbir_jax/api/store.py`); `python -m cbir_jax.search index=FILE
query=IMAGE` then ranks against it without extracting the gallery again. The scorer is the run's learned
one with `checkpoint=`, else `head=` when it names a fixed metric (default: cosine). Hydra's record of
the command (`.hydra/`, `index.log`) goes to `outputs/index/<date>/<time>/` (`RUN/index/<date>_<time>/` with
a checkpoint); the last line names both.

Examples:
  python -m cbir_jax.index data=folder data.root=photos out=photos.index
  python -m cbir_jax.index data=folder data.root=photos out=photos.index checkpoint=outputs/runs/<date>/<time>
  python -m cbir_jax.search index=photos.index query=photo.jpg k=10
"""

from __future__ import annotations

from pathlib import Path

import hydra
from omegaconf import DictConfig

from cbir_jax.api import Index
from cbir_jax.core.config import CONFIG_DIR
from cbir_jax.data import DataError
from cbir_jax.runs.cli import overridden_keys, run_dir, run_or_exit, to_typed, written
from cbir_jax.runs.trained import load_run
from cbir_jax.scoring import heads
from cbir_jax.core.errors import CheckpointError


def index(cfg_dict: DictConfig, overridden: frozenset[str] = frozenset()) -> tuple[Path, Index]:
    """Builds the index of `data.root` and writes it to `out`."""
    cfg = to_typed(cfg_dict)
    if not cfg.out:
        raise DataError("index needs out=FILE (where the index is written)")
    if cfg.data.name != "folder":
        raise DataError(f"index reads a folder: pass data=folder data.root=DIR (not data={cfg.data.name})")
    if cfg.checkpoint:
        source = load_run(cfg.checkpoint, select=cfg.eval.select, cache_dir=cfg.cache_dir)
        scorer = cfg.head.name if "head" in overridden else None
    else:
        if "head" in overridden and heads.is_learned(cfg.head.name):
            raise CheckpointError(
                f"head={cfg.head.name} is learned: pass checkpoint=RUN_DIR (or a fixed head, e.g. head=cosine)"
            )
        source, scorer = cfg.backbone, (cfg.head.name if "head" in overridden else "cosine")
    features = cfg.features if not cfg.checkpoint or "features" in overridden else None  # None: the run's
    built = Index.build(source, cfg.data.root, scorer=scorer, features=features, cache_dir=cfg.cache_dir)
    return built.save(cfg.out), built


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    path, built = run_or_exit(lambda: index(cfg, overridden_keys()))
    summary = f"{len(built)} images, {len(built.skipped)} skipped, scorer {built.scorer_name}"
    logs = run_dir()  # Hydra's record of the command (.hydra/, index.log): named too, not left unsaid
    print(f"outputs: {path} ({summary}); {logs}/ ({', '.join(written(logs)) or 'nothing written'})", flush=True)


if __name__ == "__main__":
    main()
