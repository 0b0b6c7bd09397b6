"""The Grain decode pipeline: worker processes give the same stream as the main process; poisoned images
(a worker killed or hung) are skipped by name and the run goes on."""

import os
import signal
import time

import numpy as np
import pytest

from cbir_jax.backbones import build_backbone
from cbir_jax.core.config import BackboneConfig, DataConfig
from cbir_jax.data import build_dataset
from cbir_jax.data.pipeline import decode_stream
from cbir_jax.features.store import FeatureStore, build_store

from faults import image_folder

POISON_KILL, POISON_HANG = 5, 9


def poisoned_load(i: int) -> np.ndarray:
    """Image i; image 5 kills the process decoding it (a decoder crash), image 9 never returns."""
    if i == POISON_KILL:
        os.kill(os.getpid(), signal.SIGKILL)
    if i == POISON_HANG:
        time.sleep(3600)
    return np.full((6, 7, 3), i * 10, np.uint8)


def test_workers_give_the_same_stream_in_the_same_order(tmp_path):
    root = image_folder(tmp_path / "data", classes=3, per_class=5)
    dataset = build_dataset(DataConfig(name="folder", root=str(root)))
    order = list(range(len(dataset)))[::-1]
    transform = lambda image: image[:4, :4].astype(np.float32)  # noqa: E731
    inline = list(decode_stream(order, transform, paths=dataset.paths, workers=0))
    parallel = list(decode_stream(order, transform, paths=dataset.paths, workers=2))
    assert [d.index for d in parallel] == order == [d.index for d in inline]
    for a, b in zip(inline, parallel):
        np.testing.assert_array_equal(a.array, b.array)


@pytest.mark.slow
def test_poisoned_images_are_skipped_by_name_and_the_run_goes_on(tmp_path, monkeypatch):
    """A worker killed by an image, and one hung on another (past data.decode_timeout_s): both named."""
    from cbir_jax.data import ImageDataset, pipeline

    monkeypatch.setattr(pipeline, "MIN_IMAGES_PER_WORKER", 1)  # workers even for 14 images

    n = 14
    dataset = ImageDataset(name="poisoned", ids=[f"img{i:02d}" for i in range(n)], load=poisoned_load, labels=None,
                           class_names=[], content_key="poisoned-v1")
    backbone = build_backbone(BackboneConfig(name="pixels", image_size=4))
    report = build_store(tmp_path / "s", dataset, backbone, shard_rows=4, batch_size=4, workers=2,
                         decode_timeout_s=1, progress=False)
    reasons = dict(report.skipped)
    assert set(reasons) == {"img05", "img09"}
    assert all("killed or hung its decode worker" in r for r in reasons.values())
    store = FeatureStore.open(tmp_path / "s")
    assert store.ids == [f"img{i:02d}" for i in range(n) if i not in (POISON_KILL, POISON_HANG)]
    healthy = ImageDataset(name="healthy", ids=store.ids, load=lambda k: poisoned_load(int(store.ids[k][3:])),
                           labels=None, class_names=[], content_key="healthy-v1")
    build_store(tmp_path / "ok", healthy, backbone, shard_rows=4, batch_size=4, workers=0, progress=False)
    ok = FeatureStore.open(tmp_path / "ok")
    by_id = dict(zip(ok.ids, ok.features()))  # the surviving rows hold their own images' features
    np.testing.assert_array_equal(store.features(), np.stack([by_id[i] for i in store.ids]))
    again = build_store(tmp_path / "s", dataset, backbone, shard_rows=4, workers=2, decode_timeout_s=2,
                        progress=False)
    assert again.added == 0  # a poisoned image is a permanent skip: not tried again until its file changes
