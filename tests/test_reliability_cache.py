"""Caches that heal and never lie: damaged, misplaced or concurrent cache files, and passing read errors."""

import logging
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from cbir_jax.core import cache
from cbir_jax.backbones import build_backbone
from cbir_jax.backbones import weights
from cbir_jax.runs.cli import to_typed
from cbir_jax.data import ImageReadError, build_dataset
from cbir_jax.data import base
from cbir_jax.features.extract import extract_features, store_path
from cbir_jax.features.store import FeatureStore

from faults import image_folder, read_only
from helpers import compose_config


def _features(root: Path, cache_dir: Path, **kw):
    cfg = to_typed(compose_config("data=folder", f"data.root={root}", "backbone.image_size=8"))
    dataset, backbone = build_dataset(cfg.data), build_backbone(cfg.backbone)
    fs = extract_features(dataset, backbone, thumb_size=8, cache_dir=str(cache_dir), batch_size=4, **kw)
    return fs, store_path(str(cache_dir), dataset, backbone, "float32")


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def _bit_flip(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x10
    path.write_bytes(bytes(data))


@pytest.mark.parametrize("damage", [_truncate, _bit_flip])
def test_damaged_feature_shard_is_moved_aside_and_rebuilt(tmp_path, caplog, damage):
    root = image_folder(tmp_path / "data")
    first, path = _features(root, tmp_path / "cache")
    shard = path / "shards" / "000000.npy"
    damage(shard)
    with caplog.at_level(logging.WARNING, logger="cbir_jax.core.cache"):
        again, _ = _features(root, tmp_path / "cache")
    np.testing.assert_array_equal(again.features, first.features)
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and shard.name in warnings[0] and "\n" not in warnings[0]
    aside = sorted(p.name for p in shard.parent.glob("000000.*.bad-*"))
    assert len(aside) == 2  # the shard and its record, kept for inspection, never deleted
    assert FeatureStore.open(path).verify() == []  # the rebuilt shard is sound


def test_another_datasets_shard_copied_into_place_is_not_trusted(tmp_path, caplog):
    small = image_folder(tmp_path / "small", classes=2, per_class=2)
    big = image_folder(tmp_path / "big", classes=4, per_class=3, seed=1)
    _, small_path = _features(small, tmp_path / "cache")
    _, big_path = _features(big, tmp_path / "cache")
    for suffix in (".npy", ".json"):  # a shard copied over another, with its own (valid) record
        (big_path / "shards" / f"000000{suffix}").write_bytes((small_path / "shards" / f"000000{suffix}").read_bytes())
    fs, _ = _features(big, tmp_path / "cache")
    assert len(fs) == 12  # all of the big folder, not the 4 images of the copied shard
    assert set(fs.ids) == {f"c{c}/{i}.png" for c in range(4) for i in range(3)}


def test_damaged_weights_cache_is_rebuilt(tmp_path, monkeypatch):
    monkeypatch.setenv("CBIR_JAX_CACHE", str(tmp_path))
    calls = []

    def convert():
        calls.append(1)
        return {"conv": {"kernel": np.arange(6, dtype=np.float32).reshape(2, 3)}}

    first = weights.cached_params("test-v1", "ab" * 32, convert)
    path = next(tmp_path.glob("test-v1-*.npz"))
    _truncate(path)
    again = weights.cached_params("test-v1", "ab" * 32, convert)
    np.testing.assert_array_equal(again["conv"]["kernel"], first["conv"]["kernel"])
    assert len(calls) == 2 and list(tmp_path.glob("test-v1-*.npz.bad-*"))
    weights.cached_params("test-v1", "ab" * 32, convert)
    assert len(calls) == 2  # the rebuilt file is used


_BUILDER = textwrap.dedent("""
    import sys, time
    import numpy as np
    from cbir_jax.core import cache

    def build():
        with open(sys.argv[2], "a") as f:
            f.write("built\\n")
        time.sleep(1.0)  # a slow write: the other process arrives while this one builds
        return {"x": np.arange(1000, dtype=np.float32)}

    out = cache.cached(sys.argv[1], "key", build)
    assert out["x"].sum() == 499500.0
""")


def test_concurrent_builders_both_succeed_and_leave_one_file(tmp_path):
    target, log = tmp_path / "c" / "x.npz", tmp_path / "builds.txt"
    procs = [subprocess.Popen([sys.executable, "-c", _BUILDER, str(target), str(log)], stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    errors = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errors
    assert log.read_text().count("built") == 1  # serialised: the second found the first one's file
    assert sorted(p.name for p in target.parent.iterdir()) == ["x.npz", "x.npz.lock"]  # no temporary left


def test_read_only_cache_folder_computes_without_caching(tmp_path, caplog):
    root = image_folder(tmp_path / "data")
    with read_only(tmp_path / "cache") as cache_dir, caplog.at_level(logging.WARNING, logger="cbir_jax.core.cache"):
        fs, path = _features(root, cache_dir)
    assert len(fs) == 12 and not path.exists()
    assert any("not writable" in r.getMessage() for r in caplog.records)


def test_read_errors_are_retried_decode_errors_are_cached(tmp_path, monkeypatch):
    """A file that cannot be read (e.g. chmod 000) is skipped now and read again once it can be."""
    root = image_folder(tmp_path / "data")
    (root / "c0" / "broken.png").write_bytes(b"not an image")
    denied = str(root / "c1" / "0.png")
    real_read = base.read_file

    def read_file(path):
        if path == denied:
            raise ImageReadError("cannot read: Permission denied")
        return real_read(path)

    monkeypatch.setattr(base, "read_file", read_file)
    fs, path = _features(root, tmp_path / "cache")
    assert len(fs) == 11 and {s[0] for s in fs.skipped} == {"c0/broken.png", "c1/0.png"}
    monkeypatch.setattr(base, "read_file", real_read)  # permission restored
    fs, _ = _features(root, tmp_path / "cache")
    assert len(fs) == 12 and [s[0] for s in fs.skipped] == ["c0/broken.png"]


def test_unreadable_and_empty_class_folders_are_named(tmp_path, monkeypatch, caplog):
    root = image_folder(tmp_path / "data")
    (root / "empty").mkdir()
    import os

    real_scandir = os.scandir

    def scandir(path="."):
        if Path(path) == root / "c3":
            raise PermissionError(13, "Permission denied", str(path))
        return real_scandir(path)

    monkeypatch.setattr(os, "scandir", scandir)
    cfg = to_typed(compose_config("data=folder", f"data.root={root}"))
    with caplog.at_level(logging.WARNING):
        dataset = build_dataset(cfg.data)
    assert dict(dataset.skipped) == {"c3/": "unreadable class folder: Permission denied", "empty/": "empty class folder"}
    assert dataset.class_names == ["c0", "c1", "c2"] and len(dataset) == 9
    assert any("c3/ (unreadable" in r.getMessage() and "empty/" in r.getMessage() for r in caplog.records)


def test_exif_orientation_is_applied(tmp_path):
    from PIL import Image

    pixels = np.zeros((10, 30, 3), np.uint8)
    pixels[:, :10] = 255  # white on the left
    image = Image.fromarray(pixels)
    exif = image.getexif()
    exif[0x0112] = 6  # "rotate 90 CW to display": a phone held upright
    image.save(tmp_path / "p.jpg", exif=exif, quality=95)
    loaded = base.load_image_file(str(tmp_path / "p.jpg"))
    assert loaded.shape == (30, 10, 3)  # upright: tall, not wide
    assert loaded[:10].mean() > 200 and loaded[-10:].mean() < 50  # the white band is now on top
