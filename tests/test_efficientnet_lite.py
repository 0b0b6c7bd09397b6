"""EfficientNet-Lite0 in Flax: right classes on photos, the reference's logits, strict loading, no torch.

Golden values were recorded from the PyTorch reference (`efficientnet-lite-pytorch` 0.1.0, torch 2.13.0
CPU) on the same preprocessed inputs: squash to 224 with PIL bilinear, then (x - 127) / 128.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import skimage.data

from cbir_jax.backbones import build_backbone
from cbir_jax.backbones import efficientnet_lite
from cbir_jax.backbones.weights import CheckpointMismatchError
from cbir_jax.core.config import BackboneConfig
from cbir_jax.core.registry import UnknownComponentError
from cbir_jax.backbones.torch_pickle import load_state_dict

CFG = BackboneConfig(name="efficientnet_lite0", image_size=224, resize="squash", pooling="gap")
CALTECH = Path(__file__).resolve().parents[2] / "shared" / "data" / "caltech101-dev"

GOLDEN_LOGITS = {
    "chelsea": {285: 10.5183, 282: 8.3276, 281: 8.1108, 287: 6.1914, 728: 4.089, 0: -1.0776, 999: 1.553},
    "coffee": {967: 10.7296, 968: 7.3596, 504: 6.5032, 925: 6.4473, 809: 5.2073, 0: -0.2083, 999: 1.7918},
}
GOLDEN_GAP = {
    "chelsea": {287: 3.92755, 112: 3.90093, 254: 3.18555, 301: 2.85232, 0: 0.01505, 1: 0.08199},
    "coffee": {1213: 2.98881, 933: 2.36058, 206: 2.1541, 1274: 2.01098, 0: 0.08248, 1: 1.21663},
}


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    return np.stack([efficientnet_lite.preprocess(skimage.data.chelsea()), efficientnet_lite.preprocess(skimage.data.coffee())])


@pytest.fixture(scope="module")
def backbone():
    return build_backbone(CFG)


@pytest.fixture(scope="module")
def logits(photos) -> np.ndarray:
    return np.asarray(efficientnet_lite.logits(photos))


def test_top5_classes(logits):
    cat, coffee = (set(np.argsort(-row)[:5].tolist()) for row in logits)
    assert cat & {281, 282, 283, 284, 285}, cat  # tabby, tiger cat, Persian, Siamese, Egyptian cat
    assert coffee & {967, 968, 504}, coffee  # espresso, cup, coffee mug


def test_logits_match_golden_reference(logits):
    for row, name in zip(logits, ("chelsea", "coffee")):
        idx = list(GOLDEN_LOGITS[name])
        np.testing.assert_allclose(row[idx], list(GOLDEN_LOGITS[name].values()), atol=1e-3, err_msg=name)


def test_backbone_gap_features_match_golden_reference(photos, backbone):
    assert backbone.feature_dim == 1280 and backbone.image_size == 224
    image = skimage.data.chelsea()
    np.testing.assert_array_equal(backbone.preprocess(image), photos[0])
    features = np.asarray(backbone.forward(photos))
    assert features.shape == (2, 1280) and features.dtype == np.float32
    for row, name in zip(features, ("chelsea", "coffee")):
        idx = list(GOLDEN_GAP[name])
        np.testing.assert_allclose(row[idx], list(GOLDEN_GAP[name].values()), atol=1e-3, err_msg=name)


def test_intermediate_layer_and_fingerprint():
    cfg = dataclasses.replace(CFG, layer="stage3", pooling="gem", image_size=64)
    backbone = build_backbone(cfg)
    batch = np.stack([backbone.preprocess(skimage.data.astronaut())])
    assert batch.shape == (1, 64, 64, 3)
    assert np.asarray(backbone.forward(batch)).shape == (1, 40)
    assert backbone.feature_dim == 40
    prints = {build_backbone(c).fingerprint for c in (cfg, dataclasses.replace(cfg, gem_p=4.0),
                                                     dataclasses.replace(cfg, layer="stage4"),
                                                     dataclasses.replace(cfg, resize="center_crop"))}
    assert len(prints) == 4
    with pytest.raises(UnknownComponentError, match="valid: stem, stage1"):
        build_backbone(dataclasses.replace(cfg, layer="stage9"))


def test_all_296_tensors_are_used_and_strictly_checked():
    path = efficientnet_lite.default_weights_path()
    sd = load_state_dict(path)
    assert len(sd) == 296
    efficientnet_lite.convert_state_dict(sd)  # exact: no error
    missing = {k: v for k, v in sd.items() if k != "_blocks.5._bn1.running_var"}
    with pytest.raises(CheckpointMismatchError, match=r"missing _blocks\.5\._bn1\.running_var"):
        efficientnet_lite.convert_state_dict(missing)
    with pytest.raises(CheckpointMismatchError, match="unexpected extra.weight"):
        efficientnet_lite.convert_state_dict({**sd, "extra.weight": np.zeros(3, np.float32)})
    with pytest.raises(CheckpointMismatchError, match="fc/kernel"):
        efficientnet_lite.convert_state_dict({**sd, "_fc.weight": np.zeros((10, 1280), np.float32)})
    bad_kernel = {**sd, "_blocks.3._project_conv.weight": np.zeros((40, 144, 3, 3), np.float32)}
    with pytest.raises(CheckpointMismatchError, match="block3/project/kernel"):
        efficientnet_lite.convert_state_dict(bad_kernel)
    with pytest.raises(CheckpointMismatchError, match="_bn0"):
        efficientnet_lite.convert_state_dict({**sd, "_bn0.running_var": np.ones(33, np.float32)})


def test_converted_params_are_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("CBIR_JAX_CACHE", str(tmp_path))
    first = efficientnet_lite.load_params.__wrapped__(efficientnet_lite.default_weights_path())
    (cached,) = tmp_path.glob("efficientnet_lite0-*.npz")
    second = efficientnet_lite.load_params.__wrapped__(efficientnet_lite.default_weights_path())
    np.testing.assert_array_equal(first["block7"]["depthwise"]["kernel"], second["block7"]["depthwise"]["kernel"])
    assert cached.stat().st_size > 10_000_000


def test_runtime_never_imports_torch():
    code = (
        "import sys, numpy as np, skimage.data\n"
        "from cbir_jax.backbones import build_backbone\n"
        "from cbir_jax.core.config import BackboneConfig\n"
        "b = build_backbone(BackboneConfig(name='efficientnet_lite0', image_size=64))\n"
        "b.forward(np.stack([b.preprocess(skimage.data.chelsea())])).block_until_ready()\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    env = {**os.environ, "JAX_PLATFORMS": "cpu"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]


def test_training_logs_never_import_torch(tmp_path):
    """tensorboardX imports torch whenever it can; the run's TensorBoard writer must not let it."""
    pytest.importorskip("torch", reason="only meaningful where torch is installed")
    code = (
        "import sys, pathlib\n"
        "from cbir_jax.training.metrics_log import MetricsLog\n"
        f"with MetricsLog(pathlib.Path({str(tmp_path)!r}), keep_up_to=0) as log:\n"
        "    log.write({'step': 1, 'loss': 0.5})\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert list((tmp_path / "tensorboard").iterdir())  # the event file was written all the same


def _real_images() -> dict[str, np.ndarray]:
    from PIL import Image

    images = {"chelsea": skimage.data.chelsea(), "coffee": skimage.data.coffee(), "astronaut": skimage.data.astronaut()}
    for category in ("Leopards", "accordion", "butterfly"):  # 6 images: an even count, see pairs
        path = CALTECH / category / "image_0001.jpg"
        if path.exists():
            images[category] = np.asarray(Image.open(path).convert("RGB"))
    return images


@pytest.mark.reference
def test_matches_pytorch_reference(backbone):
    torch = pytest.importorskip("torch")
    reference = pytest.importorskip("efficientnet_lite_pytorch")
    model = reference.EfficientNet.from_pretrained("efficientnet-lite0", weights_path=efficientnet_lite.default_weights_path())
    model.eval()
    batch = np.stack([efficientnet_lite.preprocess(image) for image in _real_images().values()])
    with torch.no_grad():
        x = torch.from_numpy(batch).permute(0, 3, 1, 2)
        want_logits = model(x).numpy()
        want_gap = model.extract_features(x).mean(dim=(2, 3)).numpy()
    pairs = [batch[i : i + 2] for i in range(0, len(batch), 2)]  # batch 2: shapes compiled above
    got_logits = np.concatenate([np.asarray(efficientnet_lite.logits(p)) for p in pairs])
    got_gap = np.concatenate([np.asarray(backbone.forward(p)) for p in pairs])
    assert np.abs(got_logits - want_logits).max() < 1e-3
    assert np.abs(got_gap - want_gap).max() < 1e-3
