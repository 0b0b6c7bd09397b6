"""ResNet-50 from a torchvision-format state dict: exact loading and a stem that matches plain NumPy.

The state dict is random and written by the test itself (no download, no torch needed).
"""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from cbir_jax.backbones import build_backbone
from cbir_jax.backbones import resnet
from cbir_jax.backbones.weights import CheckpointMismatchError
from cbir_jax.core.config import BackboneConfig
from cbir_jax.backbones.torch_pickle import load_state_dict
from torch_writer import save_state_dict


def _torchvision_resnet50(seed: int = 0) -> dict[str, np.ndarray]:
    """A random state dict with torchvision's ResNet-50 key names and shapes, in its order."""
    rng = np.random.default_rng(seed)
    sd: dict[str, np.ndarray] = {}

    def conv(name: str, out: int, inp: int, k: int) -> None:
        sd[f"{name}.weight"] = (rng.standard_normal((out, inp, k, k)) * np.sqrt(2 / (inp * k * k))).astype(np.float32)

    def bn(name: str, n: int) -> None:
        sd[f"{name}.weight"] = rng.uniform(0.5, 1.5, n).astype(np.float32)
        sd[f"{name}.bias"] = (0.1 * rng.standard_normal(n)).astype(np.float32)
        sd[f"{name}.running_mean"] = (0.1 * rng.standard_normal(n)).astype(np.float32)
        sd[f"{name}.running_var"] = rng.uniform(0.5, 1.5, n).astype(np.float32)
        sd[f"{name}.num_batches_tracked"] = np.array(100, np.int64)

    conv("conv1", 64, 3, 7)
    bn("bn1", 64)
    inp = 64
    for number, (blocks, width) in enumerate(((3, 64), (4, 128), (6, 256), (3, 512)), 1):
        for j in range(blocks):
            p = f"layer{number}.{j}"
            conv(f"{p}.conv1", width, inp, 1)
            bn(f"{p}.bn1", width)
            conv(f"{p}.conv2", width, width, 3)
            bn(f"{p}.bn2", width)
            conv(f"{p}.conv3", 4 * width, width, 1)
            bn(f"{p}.bn3", 4 * width)
            if j == 0:
                conv(f"{p}.downsample.0", 4 * width, inp, 1)
                bn(f"{p}.downsample.1", 4 * width)
            inp = 4 * width
    sd["fc.weight"] = (0.01 * rng.standard_normal((1000, 2048))).astype(np.float32)
    sd["fc.bias"] = np.zeros(1000, np.float32)
    return sd


@pytest.fixture(scope="module")
def state_dict() -> dict[str, np.ndarray]:
    return _torchvision_resnet50()


@pytest.fixture(scope="module")
def weights_file(state_dict, tmp_path_factory) -> str:
    path = tmp_path_factory.mktemp("resnet") / "resnet50.pth"
    save_state_dict(state_dict, path)
    return str(path)


@pytest.fixture(autouse=True)
def _private_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("CBIR_JAX_CACHE", str(tmp_path_factory.getbasetemp() / "cache"))


def _numpy_stem(x: np.ndarray, sd: dict[str, np.ndarray]) -> np.ndarray:
    """conv1 (7x7/2, pad 3) -> bn1 (running stats) -> relu -> maxpool (3x3/2, pad 1), in float64."""
    w = sd["conv1.weight"].astype(np.float64)
    padded = np.pad(x.astype(np.float64), ((0, 0), (3, 3), (3, 3), (0, 0)))
    windows = np.lib.stride_tricks.sliding_window_view(padded, (7, 7), axis=(1, 2))[:, ::2, ::2]
    y = np.einsum("bhwcij,ocij->bhwo", windows, w)
    scale = sd["bn1.weight"] / np.sqrt(sd["bn1.running_var"].astype(np.float64) + 1e-5)
    y = np.maximum((y - sd["bn1.running_mean"]) * scale + sd["bn1.bias"], 0.0)
    y = np.pad(y, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=-np.inf)
    return np.lib.stride_tricks.sliding_window_view(y, (3, 3), axis=(1, 2))[:, ::2, ::2].max(axis=(-2, -1))


def test_file_round_trip_is_exact(state_dict, weights_file):
    loaded = load_state_dict(weights_file)
    assert list(loaded) == list(state_dict) and len(loaded) == 320
    for k, v in state_dict.items():
        np.testing.assert_array_equal(loaded[k], v, err_msg=k)


def test_stem_matches_numpy(state_dict, weights_file):
    params = resnet.load_params(weights_file)
    x = np.random.default_rng(1).standard_normal((2, 32, 32, 3)).astype(np.float32)
    got = np.asarray(resnet.apply(params, x, output="stem"))
    want = _numpy_stem(x, state_dict)
    assert got.shape == want.shape == (2, 8, 8, 64)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


def test_loading_is_strict(state_dict):
    resnet.convert_state_dict(state_dict)  # exact: no error
    missing = {k: v for k, v in state_dict.items() if k != "layer3.0.downsample.1.running_mean"}
    with pytest.raises(CheckpointMismatchError, match=r"missing layer3\.0\.downsample\.1\.running_mean"):
        resnet.convert_state_dict(missing)
    with pytest.raises(CheckpointMismatchError, match=r"unexpected layer4\.3\.conv1\.weight"):
        resnet.convert_state_dict({**state_dict, "layer4.3.conv1.weight": np.zeros((512, 2048, 1, 1), np.float32)})
    with pytest.raises(CheckpointMismatchError, match="layer2_1/conv2/kernel"):
        resnet.convert_state_dict({**state_dict, "layer2.1.conv2.weight": np.zeros((128, 128, 1, 1), np.float32)})


def test_backbone_build_and_errors(weights_file):
    cfg = BackboneConfig(name="resnet50", image_size=32, weights=weights_file, layer="stem", pooling="mac")
    backbone = build_backbone(cfg)
    image = np.random.default_rng(2).integers(0, 256, (40, 50, 3), dtype=np.uint8)
    batch = np.stack([backbone.preprocess(image)])
    assert batch.shape == (1, 32, 32, 3) and batch.dtype == np.float32
    assert np.asarray(backbone.forward(batch)).shape == (1, 64) == (1, backbone.feature_dim)
    assert backbone.fingerprint != build_backbone(dataclasses.replace(cfg, pooling="gap")).fingerprint
    with pytest.raises(ValueError, match=r"needs backbone.weights.*torchvision.models.resnet50") as info:
        build_backbone(dataclasses.replace(cfg, weights=None))
    assert "\n" not in str(info.value)
    with pytest.raises(FileNotFoundError, match="does not exist.*IMAGENET1K_V2"):
        build_backbone(dataclasses.replace(cfg, weights=weights_file + ".missing"))


@pytest.mark.reference
def test_whole_network_matches_torch(state_dict, weights_file):
    """A hand-written torch ResNet-50 (torchvision's structure) on the same weights gives the same logits."""
    torch = pytest.importorskip("torch")
    F = torch.nn.functional
    t = {k: torch.from_numpy(v) for k, v in state_dict.items()}

    def bn(x, name):
        return F.batch_norm(x, t[f"{name}.running_mean"], t[f"{name}.running_var"], t[f"{name}.weight"],
                            t[f"{name}.bias"], False, 0.0, 1e-5)

    x = np.random.default_rng(3).standard_normal((2, 64, 64, 3)).astype(np.float32)
    with torch.no_grad():
        h = torch.from_numpy(x).permute(0, 3, 1, 2)
        h = F.max_pool2d(F.relu(bn(F.conv2d(h, t["conv1.weight"], stride=2, padding=3), "bn1")), 3, 2, 1)
        for number, blocks in enumerate((3, 4, 6, 3), 1):
            for j in range(blocks):
                p, stride = f"layer{number}.{j}", (2 if j == 0 and number > 1 else 1)
                y = F.relu(bn(F.conv2d(h, t[f"{p}.conv1.weight"]), f"{p}.bn1"))
                y = F.relu(bn(F.conv2d(y, t[f"{p}.conv2.weight"], stride=stride, padding=1), f"{p}.bn2"))
                y = bn(F.conv2d(y, t[f"{p}.conv3.weight"]), f"{p}.bn3")
                if j == 0:
                    h = bn(F.conv2d(h, t[f"{p}.downsample.0.weight"], stride=stride), f"{p}.downsample.1")
                h = F.relu(y + h)
        want = F.linear(h.mean(dim=(2, 3)), t["fc.weight"], t["fc.bias"]).numpy()
    got = np.asarray(resnet.apply(resnet.load_params(weights_file), x, output="logits"))
    np.testing.assert_allclose(got, want, rtol=1e-3, atol=1e-3 * np.abs(want).max())
