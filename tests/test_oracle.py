"""Oracle tests through the real path (as big_vision's retrieval evaluators are tested): a toy gallery whose
right answer is known by construction, run through the folder source, the feature stage, `evaluate_stage`
and `Index`, must give exactly MAP@R 1.0 and the exact top-k ids; a constant scorer must give exactly the
chance value of the project's pessimistic tie rule.

The images are built so that pixels are the features: class c lights quadrant c, and item j of a class
adds 10*j grey everywhere, so under cosine a class's items follow j in order, ahead of every other class.
"""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np
import pytest
from PIL import Image

from cbir_jax.api.index import Index
from cbir_jax.evaluation.runner import evaluate_stage
from cbir_jax.features.stage import load_stage
from cbir_jax.runs.cli import to_typed
from cbir_jax.scoring.scorers import Scorer, fixed_scorer
from helpers import compose_config

CLASSES, PER_CLASS, SIDE = 4, 5, 8


def _image(c: int, j: int) -> np.ndarray:
    image = np.full((SIDE, SIDE, 3), 10 * j, np.uint8)
    r, q = divmod(c, 2)
    image[r * SIDE // 2:(r + 1) * SIDE // 2, q * SIDE // 2:(q + 1) * SIDE // 2] = 200 + 10 * j
    return image


@pytest.fixture(scope="module")
def toy(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("toy")
    for c in range(CLASSES):
        (root / f"class{c}").mkdir()
        for j in range(PER_CLASS):
            Image.fromarray(_image(c, j)).save(root / f"class{c}" / f"{j}.png")  # lossless: pixels are exact
    return root


def _cfg(root: Path, tmp_path: Path):
    return to_typed(compose_config(
        "data=folder", f"data.root={root}", "data.split.by=none", "backbone=pixels", f"backbone.image_size={SIDE}",
        f"cache_dir={tmp_path / 'cache'}", fast=False,
    ))


CONSTANT = Scorer(name="constant", prepare=lambda g: ({"g": g}, None),
                  score=lambda rows, shared, q, self_index: jnp.zeros((q.shape[0], rows["g"].shape[0])))


def test_evaluation_of_a_known_answer_is_exactly_perfect_and_a_constant_scorer_exactly_chance(toy, tmp_path):
    cfg = _cfg(toy, tmp_path)
    stage = load_stage(cfg)
    results = evaluate_stage(cfg, stage, {"cosine": fixed_scorer("cosine"), "constant": CONSTANT}, tmp_path / "eval")
    n, relevant = CLASSES * PER_CLASS, PER_CLASS - 1
    assert results["cosine"]["map_at_r"] == 1.0 and results["cosine"]["precision_at_1"] == 1.0
    assert results["cosine"]["queries"] == n
    # ties broken pessimistically: all n - PER_CLASS others first, then the R relevant items
    chance_map = np.mean([(i + 1) / (n - PER_CLASS + i + 1) for i in range(relevant)])
    assert results["constant"]["map_at_r"] == 0.0 and results["constant"]["precision_at_1"] == 0.0
    assert results["constant"]["map"] == pytest.approx(chance_map, abs=1e-12)


def test_the_index_returns_the_exact_top_k(toy, tmp_path):
    cfg = _cfg(toy, tmp_path)
    index = Index.from_stage(cfg, load_stage(cfg), fixed_scorer("cosine"))
    for c in range(CLASSES):
        scores, ids, paths = index.search(_image(c, 0), k=PER_CLASS)
        assert [Path(p).relative_to(toy).as_posix() for p in paths] == [f"class{c}/{j}.png" for j in range(PER_CLASS)]
        assert list(ids) == [index.paths.index(f"class{c}/{j}.png") for j in range(PER_CLASS)]
        assert scores[0] == pytest.approx(1.0, abs=1e-6) and np.all(np.diff(scores) < 0)
    # a gallery row as its own query, left out: its class-mates in order, then nothing of another class
    row = index.paths.index("class2/0.png")
    _, ids = index.rank(index.gallery()[row:row + 1], k=PER_CLASS - 1, exclude=np.asarray([row]))
    assert [index.paths[i] for i in ids[0]] == [f"class2/{j}.png" for j in range(1, PER_CLASS)]
