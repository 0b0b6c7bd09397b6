"""The Python API (`cbir_jax.Index`, `cbir_jax.load_run`) and the persistent index file, on real photos.

The gallery is the embedded photos written out as a labelled folder of JPEG files (plus one file that is
not an image), with backbone=pixels unless a test needs the real CNN.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from omegaconf import OmegaConf
from PIL import Image

import cbir_jax
from cbir_jax.api import IndexFileError, QueryError
from cbir_jax.core.config import DataConfig, FeaturesConfig
from cbir_jax.core.registry import UnknownComponentError
from cbir_jax.data import DataError, ImageLoadError
from cbir_jax.data import embedded
from helpers import compose_config

README = Path(__file__).resolve().parents[1] / "README.md"


def _write_photos(root: Path, views: int, photos: int | None = None) -> Path:
    dataset = embedded.build(DataConfig(views_per_image=views))
    keep = set(dataset.class_names[:photos]) if photos else None
    for i, image_id in enumerate(dataset.ids):
        if keep is None or image_id.split("/")[0] in keep:
            path = root / f"{image_id}.jpg"
            path.parent.mkdir(parents=True, exist_ok=True)
            Image.fromarray(dataset.load(i)).save(path, quality=92)
    return root


def photo_folder(root: Path, views: int) -> Path:
    """The embedded photos x `views` in class folders, and a file that is not an image."""
    _write_photos(root, views=views)
    (root / "cat" / "notes.jpg").write_bytes(b"not an image")
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """21 photos x 4 views in class folders, and a file that is not an image."""
    return photo_folder(tmp_path_factory.mktemp("api") / "photos", views=4)


@pytest.fixture(scope="module")
def pixels_index(photos, tmp_path_factory):
    return cbir_jax.Index.build("pixels", photos, cache_dir=str(tmp_path_factory.mktemp("cache")))


def _readme_example() -> list[str]:
    section = README.read_text().split("## Python API and persistent index", 1)[1]
    block = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    return [line for line in block.splitlines() if line.strip()]


def test_the_readme_example_as_written(tmp_path, monkeypatch):
    """The README's lines, run verbatim with the real default backbone: build, search a path, save, load
    and search again (identical), then add two files, each then its own best match."""
    _write_photos(tmp_path / "photos", views=2, photos=5)
    shutil.copy(tmp_path / "photos" / "cat" / "view_01.jpg", tmp_path / "query.jpg")
    new = _write_photos(tmp_path / "more", views=3, photos=2)
    shutil.copy(new / "astronaut" / "view_02.jpg", tmp_path / "new1.jpg")
    shutil.copy(new / "brick" / "view_02.jpg", tmp_path / "new2.jpg")
    monkeypatch.chdir(tmp_path)
    lines = _readme_example()
    assert lines[0] == "import cbir_jax" and "Index.build(\"efficientnet_lite0\"" in lines[1] and "add(" in lines[-1]
    ns: dict = {}
    exec("\n".join(lines[:-1]), ns)  # noqa: S102  (the README's own lines)
    index = ns["index"]
    assert len(index) == 10 and index.backbone.name == "efficientnet_lite0"
    assert ns["paths"][0] == str(tmp_path / "photos" / "cat" / "view_01.jpg")  # the query is in the gallery
    again = index.search("query.jpg", k=10)
    np.testing.assert_array_equal(again[1], ns["ids"])
    np.testing.assert_array_equal(again[0], ns["scores"])
    assert again[2] == ns["paths"]
    with pytest.raises(DataError, match=r"^add: new1.jpg is outside the indexed folder .*photos; move it there"):
        index.add(["new1.jpg"])  # "../new1.jpg" would be lost when the folder and its index move
    assert len(index) == 10 and not (tmp_path / "photos" / "new1.jpg").exists()
    exec(lines[-1], ns)  # noqa: S102
    assert len(index) == 12 and index.paths[-2:] == ["new1.jpg", "new2.jpg"]
    assert (tmp_path / "photos" / "new1.jpg").read_bytes() == (tmp_path / "new1.jpg").read_bytes()
    assert list(index.labels[-2:]) == [-1, -1]  # outside the class folders: no class
    for name, expected_id in (("new1.jpg", 10), ("new2.jpg", 11)):
        scores, ids, _ = index.search(name, k=3)
        assert ids[0] == expected_id and scores[0] == pytest.approx(1.0, abs=1e-5)


def test_the_readme_fit_example_as_written(tmp_path, monkeypatch, capsys):
    """The README's notebook lines, verbatim: a run folder like the command's, its metrics, its curves, and
    a search with the trained head."""
    section = README.read_text().split("## Training from Python or a notebook", 1)[1]
    lines = [line for line in re.search(r"```python\n(.*?)```", section, re.S).group(1).splitlines() if line.strip()]
    assert len(lines) == 5 and lines[0] == "import cbir_jax" and "cbir_jax.fit(" in lines[1]
    _write_photos(tmp_path / "photos", views=2, photos=5)
    shutil.copy(tmp_path / "photos" / "cat" / "view_01.jpg", tmp_path / "query.jpg")
    monkeypatch.chdir(tmp_path)
    ns: dict = {}
    exec("\n".join(lines), ns)  # noqa: S102  (the README's own lines)
    result = ns["result"]
    assert isinstance(result, cbir_jax.Trained) and result.path.parent.parent == Path("outputs/runs")
    assert json.loads((result.path / "metrics.json").read_text()) == result.metrics
    assert result.metrics["mlp"]["map_at_r"] > 0 and "val_map_at_r" in result.validation
    assert result.history and result.history[-1]["step"] > 0
    assert result.run.head == "mlp" and repr(result).startswith("Trained(Run(")
    assert ns["paths"][0] == str(tmp_path / "photos" / "cat" / "view_01.jpg") and len(ns["ids"]) == 5
    assert f"outputs: {result.path}/ (" in capsys.readouterr().out


def test_search_accepts_paths_pil_images_arrays_and_batches(pixels_index, photos):
    query = photos / "coffee" / "view_02.jpg"
    scores, ids, paths = pixels_index.search(query, k=5)
    assert ids.shape == (5,) and scores.shape == (5,) and len(paths) == 5
    assert paths[0] == str(query) and np.all(np.diff(scores) <= 0)
    array = np.asarray(Image.open(query))
    for same in (str(query), Image.open(query), array):
        np.testing.assert_array_equal(pixels_index.search(same, k=5)[1], ids)
    other = photos / "moon" / "view_00.jpg"
    s, i, p = pixels_index.search([query, Image.open(other), array], k=5)
    assert s.shape == i.shape == (3, 5) and len(p) == 3
    np.testing.assert_array_equal(i[0], ids)
    np.testing.assert_array_equal(i[2], ids)
    assert p[1][0] == str(other)
    batch = np.stack([array, array])
    np.testing.assert_array_equal(pixels_index.search(batch, k=5)[1], np.stack([ids, ids]))
    grey = np.asarray(Image.open(query).convert("L"))
    assert pixels_index.search(grey, k=1)[1].shape == (1,)
    assert pixels_index.search(query, k=10_000)[1].shape == (len(pixels_index),)  # k capped at the gallery
    for bad, message in ((array.astype(np.float32), "uint8"), (array[..., :2], "shape"), ([], "empty")):
        with pytest.raises(QueryError, match=message):
            pixels_index.search(bad)
    with pytest.raises(ImageLoadError, match="notes.jpg"):
        pixels_index.search(photos / "cat" / "notes.jpg")


def test_build_names_and_counts_what_it_skips(pixels_index, photos):
    assert len(pixels_index) == 21 * 4
    assert [name for name, _ in pixels_index.skipped] == ["cat/notes.jpg"]
    assert pixels_index.class_names[:2] == ["astronaut", "brick"] and pixels_index.labels.shape == (84,)
    assert pixels_index.paths[0] == "astronaut/view_00.jpg" and pixels_index.root == str(photos.resolve())
    assert "84 images" in repr(pixels_index) and "1 skipped" in repr(pixels_index)


def test_add_grows_the_index_and_refit_equals_a_fresh_build(photos, tmp_path):
    """Index part of the folder, add the rest: each added image is its own top-1, duplicates and undecodable
    files are left out, and after `refit` the index equals one built on the whole folder."""
    root = tmp_path / "photos"
    shutil.copytree(photos, root)
    later = sorted((root / "rocket").glob("view_*.jpg")) + [root / "zebra" / "one.jpg"]
    moved = tmp_path / "later"
    moved.mkdir()
    for f in later[:-1]:
        shutil.move(f, moved / f.name)
    features = FeaturesConfig(whiten="pca", whiten_dim=16)
    index = cbir_jax.Index.build("pixels", root, features=features, cache_dir=str(tmp_path / "cache"))
    n = len(index)
    for f in later[:-1]:
        shutil.move(moved / f.name, f)
    (root / "zebra").mkdir()
    shutil.copy(photos / "cat" / "view_00.jpg", later[-1])
    broken = root / "rocket" / "broken.jpg"
    broken.write_bytes(b"\x89PNG truncated")
    new = index.add([str(f) for f in later] + [str(later[0]), broken])
    np.testing.assert_array_equal(new, np.arange(n, n + len(later)))
    assert len(index) == n + len(later) and index.skipped[-1][0] == "rocket/broken.jpg"
    assert index.class_names[-1] == "zebra" and index.labels[-1] == len(index.class_names) - 1
    assert index.labels[n] == index.class_names.index("rocket")
    _, ids, paths = index.search([str(f) for f in later[:-1]], k=1)
    np.testing.assert_array_equal(ids[:, 0], new[:-1])
    assert index.add(later[0]).size == 0  # already indexed
    broken.unlink()
    index.refit()
    fresh = cbir_jax.Index.build("pixels", root, features=features, cache_dir=str(tmp_path / "cache"))
    order = [index.paths.index(p) for p in fresh.paths]
    np.testing.assert_allclose(np.abs(index.gallery()[order]), np.abs(fresh.gallery()), atol=1e-5)  # PCA sign


def test_add_copies_files_from_outside_only_when_asked_and_never_overwrites(photos, tmp_path):
    root = tmp_path / "photos"
    shutil.copytree(photos / "cat", root / "cat")
    index = cbir_jax.Index.build("pixels", root, cache_dir=str(tmp_path / "cache"))
    n = len(index)
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    shutil.copy(photos / "moon" / "view_00.jpg", tmp_path / "a" / "new.jpg")
    shutil.copy(photos / "coffee" / "view_00.jpg", tmp_path / "b" / "new.jpg")
    with pytest.raises(DataError, match="is outside the indexed folder") as e:
        index.add([root / "cat" / ".." / ".." / "a" / "new.jpg"])
    assert "\n" not in str(e.value) and len(index) == n
    assert list(index.add(tmp_path / "a" / "new.jpg", copy=True)) == [n] and index.paths[-1] == "new.jpg"
    assert index.add(tmp_path / "a" / "new.jpg", copy=True).size == 0  # the same file: already indexed
    with pytest.raises(DataError, match="new.jpg is already another file there"):
        index.add(tmp_path / "b" / "new.jpg", copy=True)
    with pytest.raises(DataError, match="cannot copy .*missing.jpg: no such file"):
        index.add(tmp_path / "b" / "missing.jpg", copy=True)
    assert (root / "new.jpg").read_bytes() == (tmp_path / "a" / "new.jpg").read_bytes() and len(index) == n + 1


def test_save_load_round_trip_moves_with_its_folder(photos, tmp_path):
    """The folder is stored relative to the index file: move both together and the index still finds it."""
    place = tmp_path / "a"
    shutil.copytree(photos, place / "photos")
    index = cbir_jax.Index.build("pixels", place / "photos", cache_dir=str(tmp_path / "cache"))
    query = photos / "horse" / "view_01.jpg"
    before = index.search(query, k=8)
    index.save(place / "photos.index")
    moved = tmp_path / "b"
    shutil.move(place, moved)
    loaded = cbir_jax.Index.load(moved / "photos.index")
    assert loaded.root == str(moved / "photos") and loaded.paths == index.paths
    assert loaded.skipped == index.skipped and loaded.class_names == index.class_names
    np.testing.assert_array_equal(loaded.labels, index.labels)
    after = loaded.search(query, k=8)
    np.testing.assert_array_equal(after[1], before[1])
    np.testing.assert_array_equal(after[0], before[0])
    assert after[2][0] == str(moved / "photos" / "horse" / "view_01.jpg")
    assert loaded.image(int(after[1][0])).shape[2] == 3
    elsewhere = cbir_jax.Index.load(moved / "photos.index", root=str(photos))
    assert elsewhere.search(query, k=1)[2][0] == str(query)


def _run(*args: str, ok: bool = True, cwd: Path | None = None) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300, cwd=cwd)
    if ok:
        assert out.returncode == 0, out.stderr[-2000:]
    return out


def test_index_then_search_commands(photos, tmp_path):
    """`python -m cbir_jax.index` writes the index folder and says so, and its Hydra record under outputs/index/ (never
    outputs/runs/, which holds training runs); `search index=FILE` ranks against it without `data=`; a damaged
    index is one line and exit 2."""
    out_file = tmp_path / "photos.index"
    out = _run("cbir_jax.index", "data=folder", f"data.root={photos}", f"out={out_file}", "backbone=pixels",
               "backbone.image_size=16", f"cache_dir={tmp_path / 'cache'}", cwd=tmp_path)
    (day,) = (tmp_path / "outputs" / "index").iterdir()
    (logs,) = day.iterdir()
    assert [p.name for p in (tmp_path / "outputs").iterdir()] == ["index"]
    assert out.stdout.strip().splitlines()[-1] == (
        f"outputs: {out_file} (84 images, 1 skipped, scorer cosine; added 84, removed 0, kept 0); "
        f"{logs}/ (.hydra/, index.log)")
    query = photos / "gravel" / "view_03.jpg"
    out = _run("cbir_jax.search", f"index={out_file}", f"index_root={photos}", f"query={query}", "k=3",
               f"hydra.run.dir={tmp_path / 'search'}")
    lines = out.stdout.strip().splitlines()
    assert lines[0].startswith(f"query: {query}   scorer: cosine   gallery: index {out_file} (84 images)")
    assert lines[1].split() == ["1", "1.00000", "gravel/view_03.jpg", "[gravel]"]
    assert len(lines) == 5 and (tmp_path / "search" / "search.png").exists()
    header = out_file / "index.json"
    header.write_text(header.read_text()[:100])
    bad = _run("cbir_jax.search", f"index={out_file}", f"query={query}", f"hydra.run.dir={tmp_path / 's2'}", ok=False)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "damaged header" in bad.stderr


def _train(run: Path, *overrides: str) -> None:
    from cbir_jax.runs.cli import to_typed
    from cbir_jax.train import train

    cfg = compose_config(*overrides)
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")  # what Hydra writes for a real run
    train(to_typed(cfg), run)


def test_load_run_and_an_index_with_its_learned_head(photos, tmp_path):
    """A tiny trained run through `load_run`: `Index.build(run, folder)` ranks as `python -m cbir_jax.search
    checkpoint=RUN data=folder` does, and a saved index reloads the head from the run."""
    from cbir_jax.api.faiss_export import FaissExportError
    from cbir_jax.search import search

    run_dir = tmp_path / "run"
    _train(run_dir, "train.evaluate=false")
    run = cbir_jax.load_run(run_dir)
    assert isinstance(run, cbir_jax.Run) and run.head == "mlp" and run.backbone.name == "pixels"
    assert repr(run) == f"Run({str(run_dir)!r}, head=mlp, backbone=pixels, features=768-d, select=best)"
    assert run.info["feature_dim"] == 16 * 16 * 3 and run.config.backbone.image_size == 16
    index = cbir_jax.Index.build(run, photos, cache_dir=str(tmp_path / "cache"))
    assert index.scorer_name == "mlp" and index.scorer is run.scorer
    query = photos / "camera" / "view_02.jpg"
    scores, ids, paths = index.search(query, k=6)
    cfg = compose_config(f"checkpoint={run_dir}", "data=folder", f"data.root={photos}", f"query={query}", "k=6",
                         f"cache_dir={tmp_path / 'cache'}")
    expected = search(cfg, tmp_path / "search", overridden=frozenset({"data"}))
    assert [index.paths[i] for i in ids] == [name for name, _ in expected]
    np.testing.assert_allclose(scores, [s for _, s in expected], rtol=1e-5, atol=1e-6)
    saved = index.save(tmp_path / "learned.index")
    loaded = cbir_jax.Index.load(saved, root=str(photos))  # the photos lie outside the index's folder
    assert loaded.scorer_name == "mlp" and Path(loaded.run.path) == run_dir
    np.testing.assert_array_equal(loaded.search(query, k=6)[1], ids)
    with pytest.raises(FaissExportError, match="mlp has no faiss form") as e:
        loaded.to_faiss()
    assert "\n" not in str(e.value)
    cosine = cbir_jax.Index.build(run, photos, scorer="cosine", cache_dir=str(tmp_path / "cache"))
    assert cosine.scorer_name == "cosine" and cosine.run is None
    with pytest.raises(UnknownComponentError, match="comes with its run"):
        cbir_jax.Index.build("pixels", photos, scorer="mlp")
    shutil.move(run_dir, tmp_path / "elsewhere")
    with pytest.raises(IndexFileError, match="pass run=RUN_DIR"):
        cbir_jax.Index.load(saved, root=str(photos))
    assert cbir_jax.Index.load(saved, root=str(photos), run=str(tmp_path / "elsewhere")).scorer_name == "mlp"


@pytest.mark.slow
def test_an_index_with_the_learned_reranker(photos, tmp_path):
    run_dir = tmp_path / "run"
    _train(run_dir, "head=learned_rerank", "head.reranker.k=5", "head.reranker.qe_k=3", "head.reranker.dim=16",
           "head.reranker.depth=1", "head.reranker.queries_per_step=16", "train.epochs=1", "train.evaluate=false")
    index = cbir_jax.Index.build(cbir_jax.load_run(run_dir), photos, cache_dir=str(tmp_path / "cache"))
    assert index.scorer_name == "learned_rerank" and not index.scorer.chunkable
    query = photos / "coins" / "view_01.jpg"
    scores, ids, paths = index.search(query, k=5)
    assert paths[0] == str(query) and np.all(np.diff(scores) <= 0)
    loaded = cbir_jax.Index.load(index.save(tmp_path / "rerank.index"), root=str(photos))
    np.testing.assert_array_equal(loaded.search(query, k=5)[1], ids)


@pytest.mark.parametrize("scorer", ["cosine", "euclid"])
def test_faiss_export_ranks_as_the_index(photos, tmp_path, scorer):
    faiss = pytest.importorskip("faiss", reason="faiss is not installed (the [bench] extra)")
    index = cbir_jax.Index.build("pixels", photos, scorer=scorer, features=FeaturesConfig(whiten="pca_whiten", whiten_dim=32),
                                 cache_dir=str(tmp_path / "cache"))
    queries = [photos / name / "view_01.jpg" for name in ("cat", "coffee", "text", "moon", "clock")]
    scores, ids, _ = index.search(queries, k=10)
    raw = index.embed(queries, raw=True)
    distances, labels = index.to_faiss().search(raw, 10)
    np.testing.assert_array_equal(labels, ids)
    # euclid: faiss gives squared distances; compared squared, as the square root magnifies rounding at 0
    ours, theirs = (scores, distances) if scorer == "cosine" else (scores**2, distances)
    np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)
    path, sidecar = index.save_faiss(tmp_path / "photos.faiss")
    np.testing.assert_array_equal(faiss.read_index(str(path)).search(raw, 10)[1], ids)
    meta = json.loads(sidecar.read_text())
    assert meta["paths"] == index.paths and meta["ids"] == list(range(len(index))) and meta["scorer"] == scorer


def test_the_api_is_imported_lazily():
    script = (
        "import sys, cbir_jax.core.errors, cbir_jax\n"
        "assert not [m for m in sys.modules if m.startswith('cbir_jax.api') or m == 'jax'], sorted(sys.modules)\n"
        "assert cbir_jax.Index.__module__ == 'cbir_jax.api.index' and callable(cbir_jax.load_run)\n"
        "assert 'Index' in dir(cbir_jax) and cbir_jax.__version__\n"
        "try:\n    cbir_jax.nope\nexcept AttributeError:\n    pass\nelse:\n    raise SystemExit('no AttributeError')\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True, timeout=120)
