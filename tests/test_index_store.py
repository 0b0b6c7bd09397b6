"""The index folder (format 2): features in a feature store, ranked from disk chunk by chunk exactly as in
memory, updated in place (`Index.add`, `Index.remove`, `python -m cbir_jax.index` again), version-1 files
still loading, and a crafted index from elsewhere contained: one line each, never a file outside its root.

Real photos (the embedded ones, as class folders of JPEG files), backbone=pixels.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import cbir_jax
from cbir_jax.api import IndexFileError, QueryError, store
from cbir_jax.api.faiss_export import FaissExportError
from cbir_jax.core.cache import digest
from cbir_jax.core.config import FeaturesConfig
from cbir_jax.features.store import FeatureStore
from test_api import photo_folder


@pytest.fixture(scope="module")
def photos(tmp_path_factory) -> Path:
    """21 photos x 2 views in class folders, and a file that is not an image."""
    return photo_folder(tmp_path_factory.mktemp("stored") / "photos", views=2)


@pytest.fixture(scope="module")
def cache(tmp_path_factory) -> str:
    return str(tmp_path_factory.mktemp("cache"))


def _saved(photos: Path, cache: str, tmp_path: Path, **build) -> tuple[cbir_jax.Index, Path]:
    """An in-memory index of a copy of `photos`, saved beside it in shards of 10 rows (5 shards)."""
    root = tmp_path / "photos"
    shutil.copytree(photos, root)
    index = cbir_jax.Index.build("pixels", root, cache_dir=cache, **build)
    return index, index.save(tmp_path / "photos.index", shard_rows=10)


@pytest.mark.parametrize("whiten", ["none", "pca_whiten"])
def test_a_stored_index_ranks_from_disk_as_in_memory(photos, cache, tmp_path, whiten):
    """Streamed chunk by chunk (memory=stream), loaded (ram) and never saved: the same ids and scores, for a
    row-local metric, a second metric, a re-ranker that needs the whole gallery, and leave-one-out."""
    features = FeaturesConfig(whiten=whiten, whiten_dim=16 if whiten != "none" else None)
    built, path = _saved(photos, cache, tmp_path, features=features)
    assert len(list((path / "features" / "shards").glob("*.npy"))) == 5
    queries = [built.path(i) for i in (0, 17, 41)]
    others = {"euclid": "euclid", "dba_alpha_qe": "dba_alpha_qe"}
    from cbir_jax.scoring.baselines import baseline_scorer

    built.with_scorers({n: baseline_scorer(n) for n in others})
    for memory in ("stream", "ram"):
        loaded = cbir_jax.Index.load(path, memory=memory).with_scorers({n: baseline_scorer(n) for n in others})
        assert isinstance(loaded._data.features, FeatureStore)
        for scorer in (None, "euclid", "dba_alpha_qe"):
            want = built.search(queries, k=7, scorer=scorer)
            got = loaded.search(queries, k=7, scorer=scorer)
            np.testing.assert_array_equal(got[1], want[1], err_msg=f"{memory} {scorer}")
            # euclid at distance 0 is the sqrt of a rounded difference: 1e-7 there reads as 3e-4
            np.testing.assert_allclose(got[0], want[0], rtol=1e-5, atol=1e-3 if scorer == "euclid" else 1e-5)
            assert got[2] == want[2]
        q = built.gallery()[[3, 30]]
        np.testing.assert_allclose(loaded.rows([3, 30]), q, rtol=1e-6, atol=1e-6)  # read alone: nothing loaded
        want = built.rank(q, 5, exclude=np.asarray([3, 30]))
        got = loaded.rank(q, 5, exclude=np.asarray([3, 30]))
        np.testing.assert_array_equal(got[1], want[1])
        assert not (got[1] == np.asarray([[3], [30]])).any()
    assert loaded._streams(loaded.scorer) is False  # ram: loaded once
    assert cbir_jax.Index.load(path, memory="stream")._streams(loaded.scorer) is True


def test_remove_and_add_update_the_index_folder_in_place(photos, cache, tmp_path):
    built, path = _saved(photos, cache, tmp_path)
    index = cbir_jax.Index.load(path, memory="stream")
    gone = [built.paths[i] for i in (0, 11, 12, 40)]
    assert index.remove([40, 11, 0, 12, 11]) == 4
    reopened = cbir_jax.Index.load(path)
    assert len(reopened) == len(built) - 4 and not set(gone) & set(reopened.paths)
    keep = [i for i in range(len(built)) if built.paths[i] not in gone]
    assert reopened.paths == [built.paths[i] for i in keep]
    np.testing.assert_array_equal(reopened.labels, built.labels[keep])
    np.testing.assert_array_equal(reopened._features(), built._features()[keep])
    with pytest.raises(QueryError, match="remove"):
        reopened.remove([len(reopened)])
    # add: the store's own update extracts only the new file, as a new shard; a fresh build agrees
    new = tmp_path / "photos" / "cat" / "new.jpg"
    shutil.copy(built.path(0), new)
    assert reopened.add([new]).tolist() == [len(built) - 4]
    again = cbir_jax.Index.load(path)
    assert again.paths[-1] == "cat/new.jpg" and again.labels[-1] == again.class_names.index("cat")
    assert again.skipped == built.skipped
    fresh = cbir_jax.Index.build("pixels", tmp_path / "photos", cache_dir=cache)
    order = [fresh.paths.index(p) for p in again.paths if p in fresh.paths]
    np.testing.assert_array_equal(again._features(), fresh._features()[order][: len(again)])


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300, cwd=cwd)


def test_the_index_command_updates_an_index_in_place(photos, cache, tmp_path):
    """A second `python -m cbir_jax.index` after a file is added and one deleted extracts only the new one
    and says what it added, removed and kept; `faiss=` writes a trained faiss index beside it."""
    shutil.copytree(photos, tmp_path / "photos")
    args = ("cbir_jax.index", "data=folder", "data.root=photos", "out=photos.index", "backbone=pixels",
            f"cache_dir={cache}")
    first = _run(*args, cwd=tmp_path)
    assert first.returncode == 0, first.stderr[-2000:]
    assert "(42 images, 1 skipped, scorer cosine; added 42, removed 0, kept 0)" in first.stdout
    shutil.copy(tmp_path / "photos" / "cat" / "view_00.jpg", tmp_path / "photos" / "cat" / "copy.jpg")
    (tmp_path / "photos" / "brick" / "view_01.jpg").unlink()
    second = _run(*args, "faiss='IVF2,Flat'", cwd=tmp_path)
    assert second.returncode == 0, second.stderr[-2000:]
    assert "(42 images, 1 skipped, scorer cosine; added 1, removed 1, kept 41)" in second.stdout
    assert (tmp_path / "photos.index" / "faiss.index").is_file()
    index = cbir_jax.Index.load(tmp_path / "photos.index")
    assert "cat/copy.jpg" in index.paths and "brick/view_01.jpg" not in index.paths
    bad = _run(*args, "faiss=NotAFactory", cwd=tmp_path)
    assert bad.returncode == 2 and bad.stderr.strip().count("\n") == 0 and "index_factory" in bad.stderr


def test_a_trained_faiss_index_ranks_as_exact_search_when_it_probes_every_list(photos, cache, tmp_path):
    built, path = _saved(photos, cache, tmp_path)
    import faiss

    index = cbir_jax.Index.load(path, memory="stream")
    ivf = index.to_faiss("IVF4,Flat", nprobe=4, train_rows=40)
    assert ivf.ntotal == len(index)
    raw = index.embed([built.path(i) for i in (2, 9, 33)], raw=True)
    _, got = ivf.search(raw, 5)
    np.testing.assert_array_equal(got, built.search([built.path(i) for i in (2, 9, 33)], k=5)[1])
    assert isinstance(faiss.downcast_index(ivf.index), faiss.IndexIVFFlat)
    with pytest.raises(FaissExportError, match="index_factory") as e:
        index.to_faiss("IVF4,Nonsense")
    assert "\n" not in str(e.value)


def _write_v1(index: cbir_jax.Index, path: Path) -> Path:
    """A version-1 index file as cbir_jax wrote them before format 2 (one safetensors file)."""
    from safetensors.numpy import save_file

    blob = [p.encode() for p in index.paths]
    offsets = np.zeros(len(blob) + 1, np.int64)
    offsets[1:] = np.cumsum([len(b) for b in blob])
    d = index._data
    tensors = {"features": np.asarray(index._features(), np.float32), "ids": np.arange(len(index), dtype=np.int64),
               "paths.utf8": np.frombuffer(b"".join(blob), np.uint8).copy(), "paths.offsets": offsets,
               "labels": np.asarray(d.labels, np.int32)}
    meta = {"format": "cbir_jax.index", "format_version": "1", "cbir_jax_version": "0.1.0", "root": "photos",
            "backbone": d.backbone, "backbone_fingerprint": d.backbone_fingerprint,
            "backbone_config": json.dumps(d.backbone_config), "features_config": json.dumps(d.features_config),
            "post_l2": "true", "scorer": d.scorer, "run": "", "run_select": "", "class_names": json.dumps(d.class_names),
            "skipped": json.dumps([list(s) for s in d.skipped])}
    meta["sha256"] = digest(tensors)
    save_file(tensors, str(path), metadata=meta)
    return path


def test_a_version_1_file_loads_and_saves_as_a_folder(photos, cache, tmp_path):
    built, _ = _saved(photos, cache, tmp_path)
    old = cbir_jax.Index.load(_write_v1(built, tmp_path / "old.index"))
    queries = [built.path(i) for i in (5, 25)]
    np.testing.assert_array_equal(old.search(queries, k=6)[1], built.search(queries, k=6)[1])
    converted = cbir_jax.Index.load(old.save(tmp_path / "new.index"))
    np.testing.assert_array_equal(converted.search(queries, k=6)[1], built.search(queries, k=6)[1])
    with pytest.raises(IndexFileError, match="damaged header .class_names must be a list"):
        cbir_jax.Index.load(_write_v1_with(built, tmp_path / "bad.index", class_names="5"))


def test_a_damaged_version_1_file_is_one_line(photos, cache, tmp_path):
    built, _ = _saved(photos, cache, tmp_path)
    data = _write_v1(built, tmp_path / "good.index").read_bytes()
    flipped = bytearray(data)
    flipped[-5] ^= 0x40  # one bit inside the arrays: the header still reads
    cases = {"truncated": (data[: len(data) // 2], "not a readable index file"),
             "garbage": (bytes(range(256)) * 2, "not a readable index file"),
             "empty": (b"", "not a readable index file"),
             "bit flip": (bytes(flipped), "SHA-256")}
    for name, (content, message) in cases.items():
        (tmp_path / name).write_bytes(content)
        _one_line(tmp_path / name, message)
    _one_line(_write_v1_with(built, tmp_path / "newer", format_version="3"), "index format 3 .* upgrade cbir_jax")
    _one_line(_write_v1_with(built, tmp_path / "bad", class_names="[oops"), "damaged header")
    _one_line(tmp_path / "missing.index", "no such index")


def _write_v1_with(index, path, **meta):
    from safetensors import safe_open
    from safetensors.numpy import save_file

    _write_v1(index, path)
    with safe_open(str(path), framework="np") as f:
        old, tensors = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    save_file(tensors, str(path), metadata={**old, **meta})
    return path


# ---- a crafted index from elsewhere (issue: foreign index files are contained) -----------------------------


def _craft(path: Path, **fields) -> Path:
    """The header edited as an attacker would: values changed and its SHA-256 made to match again."""
    header = json.loads((path / "index.json").read_text())
    header.update(fields)
    header["sha256"] = store._header_digest(header)
    (path / "index.json").write_text(json.dumps(header))
    return path


def _copy(path: Path, name: str) -> Path:
    out = path.parent / name
    shutil.copytree(path, out)
    return out


def _one_line(path: Path, match: str, **load) -> None:
    with pytest.raises(IndexFileError, match=match) as e:
        cbir_jax.Index.load(path, **load)
    assert "\n" not in str(e.value)


def test_a_crafted_or_damaged_index_is_one_line_and_never_reads_outside_its_root(photos, cache, tmp_path):
    built, path = _saved(photos, cache, tmp_path)
    # edited without its hash, damaged header, a shard changed, a newer format
    edited = _copy(path, "edited.index")
    header = json.loads((edited / "index.json").read_text())
    (edited / "index.json").write_text(json.dumps({**header, "scorer": "euclid"}))
    _one_line(edited, "header does not match its SHA-256")
    (edited / "index.json").write_text("{not json")
    _one_line(edited, "damaged header")
    shard = _copy(path, "shard.index")
    first = sorted((shard / "features" / "shards").glob("*.npy"))[0]
    data = bytearray(first.read_bytes())
    data[-3] ^= 0x40
    first.write_bytes(bytes(data))
    _one_line(shard, "do not match their SHA-256")
    _one_line(_craft(_copy(path, "newer.index"), format_version=3), "index format 3 .* upgrade cbir_jax")
    _one_line(_craft(_copy(path, "foreign.index"), format="else"), "not a cbir_jax index")
    _one_line(_craft(_copy(path, "fingerprint.index"), backbone_fingerprint="pixels-8-squash"), "damaged features")
    other = _craft(_copy(path, "other.index"), backbone_fingerprint="pixels-8-squash")
    manifest = json.loads((other / "features" / "manifest.json").read_text())
    (other / "features" / "manifest.json").write_text(json.dumps({**manifest, "fingerprint": "pixels-8-squash"}))
    _one_line(other, "now computes .* build the index again")
    # every header field type-checked, with a matching hash
    for field, value, why in [("class_names", 5, "class_names must be a list of strings"),
                              ("skipped", "x", "skipped must be a list"),
                              ("backbone_config", None, "backbone_config must be an object"),
                              ("features_config", 7, "features_config must be an object"),
                              ("run_select", "worst", "run_select must be")]:
        _one_line(_craft(_copy(path, f"{field}.index"), **{field: value}), f"damaged header .{why}")
    # a root outside the index's folder needs the caller's root=; then it is used as given
    outside = _craft(_copy(path, "outside.index"), root="../../../../../../../../..")
    _one_line(outside, "lies outside the index's folder .* pass root=")
    assert cbir_jax.Index.load(outside, root=str(tmp_path / "photos")).root == str(tmp_path / "photos")
    # non-finite whitening or features, zero rows, a row path that climbs out
    nan = _copy(path, "nan.index")
    mean = np.full(built._data.dim, np.nan, np.float32)
    np.save(nan / "post.mean.npy", mean)
    np.save(nan / "post.projection.npy", np.eye(built._data.dim, 4, dtype=np.float32))
    _craft(nan, arrays={**json.loads((nan / "index.json").read_text())["arrays"],
                        "post.mean": digest({"post.mean": mean}),
                        "post.projection": digest({"post.projection": np.eye(built._data.dim, 4, dtype=np.float32)})})
    _one_line(nan, "non-finite whitening")
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "photos").mkdir()
    _one_line(_empty_index(built, empty), "holds no images")
    climbing = _copy(path, "climb.index")
    manifest = json.loads((climbing / "features" / "manifest.json").read_text())
    manifest["shards"][0]["items"][0][1] = "../../etc/passwd"
    (climbing / "features" / "manifest.json").write_text(json.dumps(manifest))
    _one_line(climbing, "leaves the indexed folder")


def _empty_index(built: cbir_jax.Index, folder: Path) -> Path:
    import dataclasses

    data = dataclasses.replace(built._data, features=np.zeros((0, built._data.dim), np.float32), paths=[],
                               labels=np.zeros(0, np.int32), root=str(folder / "photos"))
    return store.save(data, folder / "x.index")


def test_non_finite_features_are_refused_when_verified_and_when_streamed(photos, cache, tmp_path):
    built, path = _saved(photos, cache, tmp_path)
    data = built._data
    bad = np.asarray(built._features()).copy()
    bad[7, 3] = np.nan
    import dataclasses

    nan = store.save(dataclasses.replace(data, features=bad), tmp_path / "nan.index")
    _one_line(nan, "non-finite features")
    streamed = cbir_jax.Index.load(nan, verify=False, memory="stream")  # a large index is checked as it is read
    with pytest.raises(IndexFileError, match="non-finite stored features"):
        streamed.search(built.path(0), k=3)
