"""Data sources: every mode converts to RGB, bad files are skipped by name and counted, bad setups fail
with one line."""

import logging

import numpy as np
import pytest
from PIL import Image

from cbir_jax.backbones import build_backbone
from cbir_jax.core.config import BackboneConfig, DataConfig
from cbir_jax.data import DataError, build_dataset
from cbir_jax.features.extract import extract_features


def _photo(rng, size=(40, 30)):
    return (rng.random((size[1], size[0], 3)) * 255).astype(np.uint8)


@pytest.fixture
def messy_folder(tmp_path):
    rng = np.random.default_rng(0)
    good = tmp_path / "good"
    good.mkdir()
    rgb = Image.fromarray(_photo(rng))
    rgb.save(good / "rgb.jpg")
    rgb.convert("L").save(good / "grey.png")
    rgb.convert("RGBA").save(good / "rgba.png")
    rgb.convert("P").save(good / "palette.png")
    rgb.convert("CMYK").save(good / "cmyk.jpg")
    Image.fromarray((rng.random((30, 40)) * 65535).astype(np.uint16)).save(good / "sixteen.png")
    bad = tmp_path / "bad"
    bad.mkdir()
    Image.fromarray(_photo(rng)).save(bad / "ok.jpg")
    data = (good / "rgb.jpg").read_bytes()
    (bad / "truncated.jpg").write_bytes(data[: len(data) // 2])
    (bad / "notes.txt").write_text("not an image")
    (bad / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"\x00" * 50)
    (bad / ".hidden.jpg").write_bytes(b"ignored")
    (tmp_path / "README.md").write_text("a loose file beside the class folders")
    return tmp_path


def test_folder_converts_modes_and_skips_bad_files(messy_folder, tmp_path_factory, caplog):
    dataset = build_dataset(DataConfig(name="folder", root=str(messy_folder)))
    assert dataset.class_names == ["bad", "good"]
    assert len(dataset) == 10  # hidden file ignored
    backbone = build_backbone(BackboneConfig(name="pixels", image_size=8))
    with caplog.at_level(logging.WARNING):
        fs = extract_features(dataset, backbone, thumb_size=16, cache_dir=str(tmp_path_factory.mktemp("c")), batch_size=4)
    skipped = sorted(name for name, _ in fs.skipped)
    assert skipped == ["README.md", "bad/corrupt.png", "bad/notes.txt", "bad/truncated.jpg"]
    assert len(fs) == 7 and fs.features.shape == (7, 8 * 8 * 3)
    assert fs.thumbnails.shape == (7, 16, 16, 3) and fs.thumbnails.dtype == np.uint8
    for name in skipped:
        assert any(name in r.getMessage() for r in caplog.records)
    assert any("skipped 4 of 11" in r.getMessage() for r in caplog.records)
    assert fs.labels.tolist() == [0] + [1] * 6


def test_every_mode_loads_as_rgb(messy_folder):
    dataset = build_dataset(DataConfig(name="folder", root=str(messy_folder / "good")))
    assert dataset.labels is None  # a flat folder: searchable, not evaluable
    for i in range(len(dataset)):
        image = dataset.load(i)
        assert image.dtype == np.uint8 and image.ndim == 3 and image.shape[2] == 3, dataset.ids[i]
    sixteen = dataset.load(dataset.ids.index("sixteen.png"))
    assert sixteen.max() > 200 and sixteen.min() < 50  # rescaled from 16-bit, not clipped to white


def test_missing_and_empty_folders_fail_with_one_line(tmp_path):
    with pytest.raises(DataError, match="no such folder") as e:
        build_dataset(DataConfig(name="folder", root=str(tmp_path / "nope")))
    assert "\n" not in str(e.value)
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="no files"):
        build_dataset(DataConfig(name="folder", root=str(tmp_path / "empty")))


def test_all_files_unreadable_is_an_error(tmp_path):
    (tmp_path / "a.jpg").write_bytes(b"junk")
    dataset = build_dataset(DataConfig(name="folder", root=str(tmp_path)))
    with pytest.raises(DataError, match="none of the 1 files"):
        extract_features(dataset, build_backbone(BackboneConfig(name="pixels", image_size=8)),
                         thumb_size=8, cache_dir=str(tmp_path / "c"))


def test_embedded_is_deterministic_and_grouped():
    a = build_dataset(DataConfig(name="embedded", views_per_image=2))
    b = build_dataset(DataConfig(name="embedded", views_per_image=2))
    assert a.content_key == b.content_key and len(a) == 2 * len(a.class_names)
    np.testing.assert_array_equal(a.load(3), b.load(3))
    assert not np.array_equal(a.load(0), a.load(1))  # two different views of one photo
    assert a.labels[0] == a.labels[1] != a.labels[2]


def test_caltech101_through_tfds_mock_data():
    tfds = pytest.importorskip("tensorflow_datasets")
    with tfds.testing.mock_data(num_examples=9):
        dataset = build_dataset(DataConfig(name="caltech101"))
        assert len(dataset) == 9 and len(dataset.class_names) == 102
        image = dataset.load(0)
        assert image.dtype == np.uint8 and image.shape[2] == 3
        assert dataset.labels.shape == (9,)


def test_caltech101_not_prepared_is_one_line_error(tmp_path):
    with pytest.raises(DataError, match="not prepared"):
        build_dataset(DataConfig(name="caltech101", tfds_data_dir=str(tmp_path)))


def test_folder_listing_order_hidden_entries_and_links(tmp_path):
    """Which files a folder lists, and in what order (its ids and so every store's row order): Path order
    (part by part, so `a b.jpg` < `a-b/q.jpg` < `a.jpg`), nothing hidden, links to files kept, links to
    folders not entered, a dangling link left out."""
    for name in ["c1/x.jpg", "c1/.h.jpg", "c1/.hid/y.jpg", "c1/sub/z.jpg", "c1/sub/deeper/w.jpg", "c1/a-b/q.jpg",
                 "c1/a b.jpg", "c1/a.jpg", "c2/B.jpg", "c2/a.jpg"]:
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    (tmp_path / "c2" / "folder_link").symlink_to(tmp_path / "c1" / "sub")
    (tmp_path / "c2" / "file_link.jpg").symlink_to(tmp_path / "c1" / "x.jpg")
    (tmp_path / "c2" / "dangling.jpg").symlink_to(tmp_path / "nowhere.jpg")
    ds = build_dataset(DataConfig(name="folder", root=str(tmp_path)))
    assert ds.ids == ["c1/a b.jpg", "c1/a-b/q.jpg", "c1/a.jpg", "c1/sub/deeper/w.jpg", "c1/sub/z.jpg", "c1/x.jpg",
                      "c2/B.jpg", "c2/a.jpg", "c2/file_link.jpg"]
    assert list(ds.labels) == [0] * 6 + [1] * 3
    assert ds.paths == [str(tmp_path.resolve() / i) for i in ds.ids]
