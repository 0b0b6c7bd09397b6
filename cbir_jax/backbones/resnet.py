"""`backbone=resnet50`: torchvision's ResNet-50 (v1.5, stride in the 3x3 conv) in Flax.

No package ships these weights, so the user points `backbone.weights` at a torchvision state dict; it is
read without torch, checked key by key, BatchNorm-folded and cached like every converted checkpoint.
"""

from __future__ import annotations

import functools
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cbir_jax.backbones import weights
from cbir_jax.backbones.base import BACKBONES, Backbone, cnn_backbone
from cbir_jax.core.errors import ConfigError, MissingFileError
from cbir_jax.data.imageops import RESIZERS

# torchvision's ImageNet normalisation, on pixels scaled to [0, 1].
MEAN_RGB = np.array([0.485, 0.456, 0.406], np.float32)
STD_RGB = np.array([0.229, 0.224, 0.225], np.float32)
BN_EPS = 1e-5
CONVERTER = "resnet50-v1"
# Per stage: (blocks, bottleneck width, first stride); outputs are 4 x width channels.
STAGES = ((3, 64, 1), (4, 128, 2), (6, 256, 2), (3, 512, 2))
LAYERS: dict[str, int] = {"stem": 64, **{f"layer{i}": 4 * s[1] for i, s in enumerate(STAGES, 1)}}
HOW_TO_GET_WEIGHTS = (
    "make one with: python -c \"import torch, torchvision; torch.save(torchvision.models.resnet50("
    "weights='IMAGENET1K_V2').state_dict(), 'resnet50.pth')\" and pass backbone.weights=/path/to/resnet50.pth"
)


class Bottleneck(nn.Module):
    width: int
    stride: int
    project: bool  # a 1x1 conv on the shortcut when shape changes ("downsample" in torchvision)

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        h = nn.relu(nn.Conv(self.width, (1, 1), name="conv1")(x))
        h = nn.relu(nn.Conv(self.width, (3, 3), self.stride, padding=((1, 1), (1, 1)), name="conv2")(h))
        h = nn.Conv(4 * self.width, (1, 1), name="conv3")(h)
        shortcut = nn.Conv(4 * self.width, (1, 1), self.stride, name="downsample")(x) if self.project else x
        return nn.relu(h + shortcut)


class ResNet50(nn.Module):
    """Runs up to `output` (a key of LAYERS, or "logits"); convs carry folded BatchNorm as bias."""

    output: str = "layer4"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = nn.relu(nn.Conv(64, (7, 7), 2, padding=((3, 3), (3, 3)), name="conv1")(x))
        x = nn.max_pool(x, (3, 3), (2, 2), padding=((1, 1), (1, 1)))
        if self.output == "stem":
            return x
        for number, (blocks, width, stride) in enumerate(STAGES, 1):
            for j in range(blocks):
                x = Bottleneck(width, stride if j == 0 else 1, j == 0, name=f"layer{number}_{j}")(x)
            if self.output == f"layer{number}":
                return x
        return nn.Dense(1000, name="fc")(jnp.mean(x, axis=(1, 2)))


def convert_state_dict(state_dict: dict[str, np.ndarray], source: str = "checkpoint") -> dict:
    """Maps torchvision's 320 tensors onto Flax params; fails on any missing or unused tensor."""
    sd = weights.StrictStateDict(state_dict, source)
    params = {"conv1": weights.conv_bn(sd, "conv1", "bn1", BN_EPS)}
    for number, (blocks, _, _) in enumerate(STAGES, 1):
        for j in range(blocks):
            t = f"layer{number}.{j}"
            block = {f"conv{i}": weights.conv_bn(sd, f"{t}.conv{i}", f"{t}.bn{i}", BN_EPS) for i in (1, 2, 3)}
            if j == 0:
                block["downsample"] = weights.conv_bn(sd, f"{t}.downsample.0", f"{t}.downsample.1", BN_EPS)
            params[f"layer{number}_{j}"] = block
    params["fc"] = weights.linear(sd, "fc")
    sd.finish()
    weights.check_shapes(params, _param_shapes(), source)
    return params


@functools.lru_cache(maxsize=1)
def _param_shapes() -> dict:
    x = jax.ShapeDtypeStruct((1, 64, 64, 3), jnp.float32)
    return jax.eval_shape(ResNet50(output="logits").init, jax.random.key(0), x)["params"]


def check_weights_path(weights_file: str | None) -> str:
    """The weights path, or a one-line error saying how to obtain the file."""
    if not weights_file:
        raise ConfigError(f"backbone=resnet50 needs backbone.weights (a torchvision ResNet-50 state dict); {HOW_TO_GET_WEIGHTS}")
    if not os.path.isfile(weights_file):
        raise MissingFileError(f"backbone.weights={weights_file} does not exist; {HOW_TO_GET_WEIGHTS}")
    return weights_file


def load_params(weights_file: str | None, cache_dir: str | None = None) -> dict:
    """Flax params (numpy) for a torchvision ResNet-50 state dict, converted once and cached on disk."""
    path = check_weights_path(weights_file)
    return weights.load_torch_params(CONVERTER, path, convert_state_dict, _param_shapes(), cache_dir)


def preprocess(image: np.ndarray, size: int = 224, resize: str = "squash") -> np.ndarray:
    """uint8 HxWx3 -> float32 size x size x 3 with torchvision's ImageNet mean/std."""
    return (RESIZERS[resize](image, size).astype(np.float32) / 255.0 - MEAN_RGB) / STD_RGB


@functools.partial(jax.jit, static_argnames="output")
def apply(params: dict, batch: jax.Array, output: str = "layer4") -> jax.Array:
    """The network up to `output` on a preprocessed NHWC batch."""
    return ResNet50(output=output).apply({"params": params}, batch)


@BACKBONES.register("resnet50")
def build(cfg, cache_dir: str | None = None) -> Backbone:
    path = check_weights_path(cfg.weights)
    return cnn_backbone(
        cfg, name="resnet50", module=ResNet50, layers=LAYERS, default_layer="layer4",
        params=load_params(path, cache_dir), weights_sha=weights.sha256_file(path)[:16], preprocess=preprocess,
        normalisation="imagenet",
    )
