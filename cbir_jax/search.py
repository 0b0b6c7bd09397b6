"""`python -m cbir_jax.search checkpoint=RUN_DIR query=IMAGE k=10` (or `head=cosine query=IMAGE`)

Ranks the gallery (every image of `data`) for one query image; prints the ranked list and writes a
PNG grid of the query and its top-k with scores into the run directory.
"""

from __future__ import annotations

import logging
from pathlib import Path

import hydra
import jax.numpy as jnp
import numpy as np
from omegaconf import DictConfig

from cbir_jax.evaluation import figures
from cbir_jax.scoring import heads, ranking, scorer as scorers
from cbir_jax.features import postprocess
from cbir_jax.training.checkpointing import CheckpointError
from cbir_jax.runs.cli import overridden_keys, print_outputs, run_dir, run_or_exit, to_typed
from cbir_jax.core.config import CONFIG_DIR
from cbir_jax.data import DataError
from cbir_jax.data.base import load_image_file
from cbir_jax.runs.trained import load_trained, trained_scorer
from cbir_jax.data.imageops import resize_square
from cbir_jax.features.stage import load_stage

log = logging.getLogger(__name__)


def search(cfg_dict: DictConfig, out_dir: Path, overridden: frozenset[str] = frozenset()) -> list[tuple[str, float]]:
    """Ranks the gallery for `cfg.query`; prints the list and writes search.png into `out_dir`."""
    cfg = to_typed(cfg_dict)
    if not cfg.query:
        raise DataError("search needs query=PATH (an image file)")
    if not Path(cfg.query).is_file():
        raise DataError(f"query={cfg.query}: no such file")
    query_image = load_image_file(cfg.query)
    if cfg.checkpoint:
        run = Path(cfg.checkpoint)
        cfg, info = load_trained(run, cfg_dict, overridden)
        stage = load_stage(cfg, split_by="none")
        scorer = trained_scorer(cfg, run, info, stage)
    else:
        if heads.is_learned(cfg.head.name):
            raise CheckpointError(f"head={cfg.head.name} is learned: pass checkpoint=RUN_DIR (or a fixed head, e.g. head=cosine)")
        stage = load_stage(cfg, split_by="none")
        scorer = scorers.fixed_scorer(cfg.head.name)
    fs = stage.features
    backbone = stage.backbone
    query_raw = np.asarray(backbone.forward(jnp.asarray(backbone.preprocess(query_image)[None])))
    post = postprocess.fit(cfg.features, fs.features)
    gallery, query = postprocess.apply(post, fs.features), postprocess.apply(post, query_raw)
    k = min(cfg.k, len(gallery))
    s, idx = ranking.search(scorer, gallery, query, k=k, chunk=cfg.eval.gallery_chunk)
    ids, labels = fs.ids, fs.labels
    results = []
    print(f"query: {cfg.query}   scorer: {scorer.name}   gallery: {fs.dataset.name} ({len(gallery)} images)")
    for rank, (score, i) in enumerate(zip(s[0], idx[0]), start=1):
        if i < 0:
            continue
        label = f"  [{fs.dataset.class_names[labels[i]]}]" if labels is not None and fs.dataset.class_names else ""
        print(f"{rank:4d}  {score: .5f}  {ids[i]}{label}")
        results.append((ids[i], float(score)))
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = {scorer.name: [(fs.image(i), float(v), None) for v, i in zip(s[0], idx[0]) if i >= 0]}
    figures.topk_grid(resize_square(query_image, 128), rows, out_dir / "search.png", title=str(cfg.query))
    return results


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    out_dir = run_dir()
    run_or_exit(lambda: search(cfg, out_dir, overridden_keys()))
    print_outputs(out_dir)


if __name__ == "__main__":
    main()
