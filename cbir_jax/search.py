"""`python -m cbir_jax.search checkpoint=RUN_DIR query=IMAGE k=10` (or `head=cosine query=IMAGE`, or
`index=FILE query=IMAGE`)

Ranks the gallery (every image of `data`, or a saved index from `python -m cbir_jax.index`) for one query
image; prints the ranked list and writes a PNG grid of the query and its top-k with scores (search.png),
under `RUN_DIR/search/<date>_<time>/` with a checkpoint, else `outputs/search/<date>/<time>/`.

Examples:
  python -m cbir_jax.search checkpoint=outputs/runs/<date>/<time> query=photo.jpg k=10
  python -m cbir_jax.search head=cosine query=photo.jpg data=folder data.root=DIR
  python -m cbir_jax.search index=photos.index query=photo.jpg k=20
"""

from __future__ import annotations

import dataclasses
import functools
import logging
from pathlib import Path
from typing import Callable, Optional

import hydra
import numpy as np
from omegaconf import DictConfig

from cbir_jax.api.index import Index, from_command_line
from cbir_jax.core.config import CONFIG_DIR
from cbir_jax.data import DataError, ImageLoadError
from cbir_jax.data.base import load_image_file
from cbir_jax.data.imageops import resize_square
from cbir_jax.evaluation import figures
from cbir_jax.runs.cli import overridden_keys, print_outputs, run_dir, run_or_exit, to_typed

log = logging.getLogger(__name__)


@dataclasses.dataclass(frozen=True)
class Hit:
    """One ranked gallery item: its id (a path under the gallery), score, class name, and how to show it."""

    id: str
    score: float
    label: Optional[str]
    image: Callable[[], np.ndarray]  # its picture, 128 x 128


def _hits(index: Index, query_image: np.ndarray, k: int) -> list[Hit]:
    """The index's own scorer's top-k for the query, with class names and pictures."""
    scores, ids, _ = index.search(query_image, k=k)

    def picture(i: int) -> np.ndarray:
        try:
            return resize_square(index.image(i), 128)
        except ImageLoadError:  # the folder moved: the ranking stands, its picture is grey
            return np.full((128, 128, 3), 128, np.uint8)

    labels, names = index.labels, index.class_names
    return [Hit(index.paths[i], float(score), names[labels[i]] if labels is not None and names and labels[i] >= 0 else None,
                functools.partial(picture, int(i))) for score, i in zip(scores, ids) if i >= 0]


def search(cfg_dict: DictConfig, out_dir: Path, overridden: frozenset[str] = frozenset()) -> list[tuple[str, float]]:
    """Ranks the gallery (`data`, or the saved `index`) for `cfg.query`; prints the list and writes
    search.png into `out_dir`."""
    cfg = to_typed(cfg_dict)
    if not cfg.query:
        raise DataError("search needs query=PATH (an image file)")
    if not Path(cfg.query).is_file():
        raise DataError(f"query={cfg.query}: no such file")
    query_image = load_image_file(cfg.query)
    _, index = from_command_line(cfg_dict, overridden)
    hits = _hits(index, query_image, cfg.k)
    scorer_name = index.scorer.name
    gallery = f"index {cfg.index}" if cfg.index else index.name
    print(f"query: {cfg.query}   scorer: {scorer_name}   gallery: {gallery} ({len(index)} images)")
    for rank, hit in enumerate(hits, start=1):
        print(f"{rank:4d}  {hit.score: .5f}  {hit.id}" + (f"  [{hit.label}]" if hit.label else ""))
    out_dir.mkdir(parents=True, exist_ok=True)
    rows = {scorer_name: [(hit.image(), hit.score, None) for hit in hits]}
    figures.topk_grid(resize_square(query_image, 128), rows, out_dir / "search.png", title=str(cfg.query))
    return [(hit.id, hit.score) for hit in hits]


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    out_dir = run_dir()
    run_or_exit(lambda: search(cfg, out_dir, overridden_keys()))
    print_outputs(out_dir)


if __name__ == "__main__":
    main()
