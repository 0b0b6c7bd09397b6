"""The sharded feature store: equal to in-memory extraction, resumable, incremental, and safe with bad input."""

import errno
import json
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from cbir_jax.backbones import build_backbone
from cbir_jax.core.config import BackboneConfig
from cbir_jax.data import ImageDataset, build_dataset
import cbir_jax.features.store
from cbir_jax.features.extract import extract_features, forward_batches, store_path
from cbir_jax.features.store import FeatureStore, StoreError, build_store
from cbir_jax.runs.cli import to_typed

from faults import image_folder
from helpers import compose_config

SHARED_DEV = Path(__file__).resolve().parents[1] / ".." / "shared" / "data" / "caltech101-dev"


def _folder(root: Path, **kw):
    cfg = to_typed(compose_config("data=folder", f"data.root={root}", "backbone.image_size=8"))
    return build_dataset(cfg.data), build_backbone(cfg.backbone)


def _build(path, dataset, backbone, **kw):
    kw = {"shard_rows": 4, "batch_size": 4, "progress": False, **kw}
    return build_store(path, dataset, backbone, **kw)


def _files(path: Path) -> dict[str, bytes]:
    """Every file the store holds that a reader uses (shards, records, manifest), by relative name."""
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*"))
            if p.is_file() and p.suffix in (".npy", ".json")}


def test_store_equals_in_memory_extraction_on_embedded_data(tmp_path):
    cfg = to_typed(compose_config())
    dataset, backbone = build_dataset(cfg.data), build_backbone(cfg.backbone)
    fs = extract_features(dataset, backbone, thumb_size=16, cache_dir=str(tmp_path), batch_size=8, shard_rows=20,
                          progress=False)
    want = forward_batches(backbone, (dataset.load(i) for i in range(len(dataset))), 8)
    assert fs.ids == dataset.ids and len(fs.store.shards) == -(-len(dataset) // 20)
    np.testing.assert_allclose(fs.features, want, rtol=1e-6, atol=1e-6)


@pytest.mark.shared_data
@pytest.mark.skipif(not SHARED_DEV.is_dir(), reason="needs ../shared/data/caltech101-dev")
def test_store_equals_in_memory_extraction_on_the_dev_folder(tmp_path):
    cfg = to_typed(compose_config("data=folder", f"data.root={SHARED_DEV.resolve()}", "data.max_per_class=3"))
    dataset, backbone = build_dataset(cfg.data), build_backbone(cfg.backbone)
    fs = extract_features(dataset, backbone, thumb_size=16, cache_dir=str(tmp_path), batch_size=8, shard_rows=32,
                          progress=False)
    keep = [dataset.ids.index(i) for i in fs.ids]
    want = forward_batches(backbone, (dataset.load(i) for i in keep), 8)
    np.testing.assert_allclose(fs.features, want, rtol=1e-6, atol=1e-6)


def test_reader_chunks_cross_shard_boundaries(tmp_path):
    dataset, backbone = _folder(image_folder(tmp_path / "data"))
    _build(tmp_path / "s", dataset, backbone)
    store = FeatureStore.open(tmp_path / "s", fingerprint=backbone.fingerprint)
    full = store.features()
    assert len(store.shards) == 3 and full.shape == (12, backbone.feature_dim)
    for rows in (1, 5, 12, 50):
        chunks = list(store.iter_chunks(rows))
        assert [first for first, _ in chunks] == list(range(0, 12, rows))
        np.testing.assert_array_equal(np.concatenate([c for _, c in chunks]), full)
    np.testing.assert_array_equal(np.concatenate(store.features_memmap()), full)
    assert store.ids == dataset.ids


def test_float16_storage_halves_the_shards_and_stays_close(tmp_path):
    dataset, backbone = _folder(image_folder(tmp_path / "data"))
    _build(tmp_path / "f32", dataset, backbone)
    _build(tmp_path / "f16", dataset, backbone, storage="float16")
    f32, f16 = FeatureStore.open(tmp_path / "f32"), FeatureStore.open(tmp_path / "f16")
    assert f16.shard(0).dtype == np.float16 and f16.features().dtype == np.float32
    np.testing.assert_allclose(f16.features(), f32.features(), rtol=1e-3, atol=1e-3)
    with pytest.raises(StoreError, match="float16 features"):  # one store, one dtype
        _build(tmp_path / "f16", dataset, backbone, storage="float32")


def test_incremental_add_extracts_only_new_files_and_deleted_files_leave(tmp_path):
    root = image_folder(tmp_path / "data", classes=4, per_class=4)
    dataset, backbone = _folder(root)
    first = _build(tmp_path / "s", dataset, backbone)
    assert (first.added, first.removed, first.kept) == (16, 0, 0)
    image_folder(tmp_path / "more", classes=1, per_class=2, seed=5)
    for f in (tmp_path / "more" / "c0").iterdir():
        shutil.copy(f, root / "c2" / f"new{f.name}")
    (root / "c1" / "0.png").unlink()
    dataset, _ = _folder(root)
    report = _build(tmp_path / "s", dataset, backbone)
    assert (report.added, report.removed, report.kept) == (2, 1, 15)
    store = FeatureStore.open(tmp_path / "s")
    assert sorted(store.ids) == sorted(dataset.ids)
    _build(tmp_path / "fresh", dataset, backbone)  # the same folder from scratch: the same features per id
    fresh = FeatureStore.open(tmp_path / "fresh")
    by_id = dict(zip(fresh.ids, fresh.features()))
    np.testing.assert_array_equal(store.features(), np.stack([by_id[i] for i in store.ids]))
    again = _build(tmp_path / "s", dataset, backbone)
    assert (again.added, again.removed, again.kept, again.written_bytes) == (0, 0, 17, 0)


def test_a_changed_file_is_extracted_again(tmp_path):
    root = image_folder(tmp_path / "data")
    dataset, backbone = _folder(root)
    _build(tmp_path / "s", dataset, backbone)
    changed = root / "c0" / "1.png"
    shutil.copy(root / "c3" / "2.png", changed)  # new content (and size or mtime)
    dataset, _ = _folder(root)
    report = _build(tmp_path / "s", dataset, backbone)
    assert (report.added, report.removed) == (1, 1)
    store = FeatureStore.open(tmp_path / "s")
    by_id = dict(zip(store.ids, store.features()))
    np.testing.assert_array_equal(by_id["c0/1.png"], by_id["c3/2.png"])


def test_interrupted_build_resumes_missing_shards_only_and_is_bit_identical(tmp_path, monkeypatch):
    dataset, backbone = _folder(image_folder(tmp_path / "data", classes=4, per_class=5))
    _build(tmp_path / "full", dataset, backbone)
    real = cbir_jax.features.store._Store.write_shard
    written = []

    def dies_after_two(self, name, *a, **kw):
        if len(written) == 2:
            raise KeyboardInterrupt  # stands in for a kill: nothing after this point runs
        written.append(name)
        return real(self, name, *a, **kw)

    monkeypatch.setattr(cbir_jax.features.store._Store, "write_shard", dies_after_two)
    with pytest.raises(KeyboardInterrupt):
        _build(tmp_path / "resumed", dataset, backbone)
    monkeypatch.setattr(cbir_jax.features.store._Store, "write_shard", real)
    assert (tmp_path / "resumed" / "plan.json").exists() and not (tmp_path / "resumed" / "manifest.json").exists()
    report = _build(tmp_path / "resumed", dataset, backbone)
    assert (report.kept, report.added) == (8, 12)  # 2 of 5 shards were committed: only the other 3 redone
    assert _files(tmp_path / "resumed") == _files(tmp_path / "full")


def test_summary_line_and_progress_resume(tmp_path, caplog):
    dataset, backbone = _folder(image_folder(tmp_path / "data"))
    with caplog.at_level(logging.INFO, logger="cbir_jax.features.store"):
        _build(tmp_path / "s", dataset, backbone)
    line = [r.getMessage() for r in caplog.records if r.getMessage().startswith("features: 12 images")]
    assert len(line) == 1 and "3 shards, 0 skipped" in line[0] and "GB written" in line[0] and line[0].endswith(
        "(added 12, removed 0, kept 0)")


def test_thumbnails_are_made_only_for_the_rows_asked_and_cached(tmp_path, monkeypatch):
    root = image_folder(tmp_path / "data")
    dataset, backbone = _folder(root)
    loads = []
    real = dataset.load
    dataset.paths = None  # decode through dataset.load, so the test can count the decodes
    dataset.load = lambda i: (loads.append(i), real(i))[1]
    fs = extract_features(dataset, backbone, thumb_size=8, cache_dir=str(tmp_path / "c"), shard_rows=4, progress=False)
    extracted = len(loads)
    assert extracted == 12 and not (fs.store.root / "thumbnails").exists()
    thumbs = fs.thumbnails[np.asarray([1, 5, 7])]
    assert thumbs.shape == (3, 8, 8, 3) and len(loads) == extracted + 3
    np.testing.assert_array_equal(thumbs[1], np.asarray(__import__("PIL.Image").Image.fromarray(real(5)).resize(
        (8, 8), 2)))
    again = fs.thumbnails[np.asarray([1, 5, 7])]
    np.testing.assert_array_equal(again, thumbs)
    assert len(loads) == extracted + 3  # cached (apart from the features, in thumbnails/)
    assert len(list((fs.store.root / "thumbnails").glob("thumbs-8-*.npz"))) == 1


# --------------------------------------------------------------------------------------- bad input and faults


def test_damaged_manifest_is_moved_aside_and_rebuilt_without_extraction(tmp_path, caplog):
    dataset, backbone = _folder(image_folder(tmp_path / "data"))
    _build(tmp_path / "s", dataset, backbone)
    before = _files(tmp_path / "s")
    manifest = tmp_path / "s" / "manifest.json"
    manifest.write_bytes(manifest.read_bytes()[:100])
    with pytest.raises(StoreError, match="not a finished feature store"):
        FeatureStore.open(tmp_path / "s")
    with caplog.at_level(logging.WARNING):
        report = _build(tmp_path / "s", dataset, backbone)
    assert report.added == 0 and report.kept == 12  # rebuilt from the shards' commit records
    assert _files(tmp_path / "s") == before
    assert len(list((tmp_path / "s").glob("manifest.json.bad-*"))) == 1


def test_full_disk_during_a_shard_write_keeps_earlier_shards_and_resumes(tmp_path, monkeypatch):
    dataset, backbone = _folder(image_folder(tmp_path / "data"))
    real = cbir_jax.features.store.atomic_write
    calls = []

    def full_on_third(path, write, *a, **kw):
        calls.append(path)
        if len(calls) == 3:  # shard 2's .npy: the disk fills half-way through the write

            def half(f):
                f.write(b"\x93NUMPY")
                raise OSError(errno.ENOSPC, "No space left on device")

            return real(path, half, *a, **kw)
        return real(path, write, *a, **kw)

    monkeypatch.setattr(cbir_jax.features.store, "atomic_write", full_on_third)
    with pytest.raises(StoreError) as e:
        _build(tmp_path / "s", dataset, backbone)
    assert "No space left on device" in str(e.value) and "resume" in str(e.value) and "\n" not in str(e.value)
    assert sorted(p.name for p in (tmp_path / "s" / "shards").iterdir()) == [
        "000000.json", "000000.npy", "000001.json", "000001.npy"]  # no temporary left, earlier shards intact
    monkeypatch.setattr(cbir_jax.features.store, "atomic_write", real)
    report = _build(tmp_path / "s", dataset, backbone)
    assert (report.kept, report.added) == (8, 4)


def test_store_of_another_backbone_is_one_clear_line(tmp_path):
    dataset, backbone = _folder(image_folder(tmp_path / "data"))
    _build(tmp_path / "s", dataset, backbone)
    other = build_backbone(BackboneConfig(name="pixels", image_size=16))
    for attempt in (lambda: _build(tmp_path / "s", dataset, other),
                    lambda: FeatureStore.open(tmp_path / "s", fingerprint=other.fingerprint)):
        with pytest.raises(StoreError) as e:
            attempt()
        assert "built by backbone 'pixels'" in str(e.value) and "\n" not in str(e.value)
    (tmp_path / "s" / "manifest.json").unlink()  # as a killed first build leaves it: shard records only
    with pytest.raises(StoreError, match="built by backbone 'pixels'"):
        _build(tmp_path / "s", dataset, other)
    assert not list((tmp_path / "s").rglob("*.bad-*"))  # refused, nothing moved aside


def test_undecodable_and_vanished_files_are_skipped_by_name(tmp_path, monkeypatch):
    root = image_folder(tmp_path / "data")
    (root / "c0" / "broken.png").write_bytes(b"not an image")
    dataset, backbone = _folder(root)
    (root / "c2" / "1.png").unlink()  # vanishes between the listing and the read
    report = _build(tmp_path / "s", dataset, backbone)
    reasons = dict(report.skipped)
    assert set(reasons) == {"c0/broken.png", "c2/1.png"} and "No such file" in reasons["c2/1.png"]
    assert len(FeatureStore.open(tmp_path / "s")) == 11
    dataset, _ = _folder(root)  # the next listing no longer has it; the decode failure stays a skip
    report = _build(tmp_path / "s", dataset, backbone)
    assert report.added == 0 and [s[0] for s in report.skipped] == ["c0/broken.png"]


_BUILDER = textwrap.dedent("""
    import sys, time
    from cbir_jax.backbones import build_backbone
    from cbir_jax.core.config import BackboneConfig, DataConfig
    from cbir_jax.data import build_dataset
    from cbir_jax.features import store

    dataset = build_dataset(DataConfig(name="folder", root=sys.argv[1]))
    load = dataset.load
    def slow(i):
        time.sleep(0.05)  # the other builder arrives while this one extracts
        return load(i)
    dataset.load, dataset.paths = slow, None
    report = store.build_store(sys.argv[2], dataset, build_backbone(BackboneConfig(name="pixels", image_size=8)),
                               shard_rows=4, progress=False, workers=0)
    print("ADDED", report.added)
""")


def test_two_concurrent_builders_are_serialised_by_the_lock(tmp_path):
    root = image_folder(tmp_path / "data")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                        os.environ.get("PYTHONPATH", "")])}
    procs = [subprocess.Popen([sys.executable, "-c", _BUILDER, str(root), str(tmp_path / "s")], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    outs = [p.communicate(timeout=300) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1][-2000:] for o in outs]
    added = sorted(int(o[0].split("ADDED")[1]) for o in outs)
    assert added == [0, 12]  # one extracted everything, the other found it done
    assert sorted(p.name for p in (tmp_path / "s" / "shards").iterdir() if "tmp" in p.name) == []
    assert FeatureStore.open(tmp_path / "s").verify() == []
