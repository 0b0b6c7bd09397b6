"""The vision transformer shared by `backbone=dinov2`, `backbone=clip` and `backbone=siglip`, in Flax.

One module covers the three families because they differ only in a few switches (`ViTSpec`): DINOv2 has
LayerScale and register tokens, CLIP a class embedding, a LayerNorm before the blocks and a projection,
SigLIP no class token and an attention-pooling head. Every switch follows the Hugging Face `transformers`
implementation that the tests compare against, including how positional embeddings are resized to another
input size (torch's bicubic, with or without antialiasing) and the exact preprocessing.

Features: the tokens after block `backbone.layer` (`block1`..`blockN`; null: the last), passed through
the model's final LayerNorm (as DINOv2's `get_intermediate_layers(norm=True)`), then pooled:
`cls` (the class token), `mean` or `gem` (over patch tokens; registers and the class token excluded) or
`embed` (the model's own image embedding: CLIP's projected class token, SigLIP's attention-pooling head).
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
from typing import Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util
from PIL import Image

from cbir_jax.backbones import weights
from cbir_jax.backbones.base import Backbone
from cbir_jax.core.errors import ConfigError
from cbir_jax.core.registry import UnknownComponentError

POOLINGS = ("cls", "mean", "gem", "embed")


@dataclasses.dataclass(frozen=True)
class ViTSpec:
    """One model's architecture and preprocessing, as its Hugging Face config and image processor set them."""

    hidden: int
    depth: int
    heads: int
    mlp: int
    patch: int
    grid: int  # side of the positional-embedding grid in the checkpoint (its image_size // patch)
    act: str  # gelu (erf) | quick_gelu | gelu_tanh
    eps: float  # LayerNorm epsilon
    cls_token: bool = True
    registers: int = 0
    layerscale: bool = False
    pre_norm: bool = False  # CLIP's LayerNorm on the embeddings ("pre_layrnorm")
    patch_bias: bool = True
    antialias: bool = False  # positional-embedding resize: torch bicubic with antialias=True (DINOv2 + registers)
    projection: int = 0  # CLIP: output size of visual_projection (pooling=embed)
    map_head: bool = False  # SigLIP: multihead attention-pooling head (pooling=embed)
    # Preprocessing: short side to round(image_size * resize_ratio) then centre crop (center_crop), or a squash.
    image_size: int = 224
    resize_ratio: float = 1.0
    default_resize: str = "center_crop"
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @property
    def prefix(self) -> int:
        """Tokens before the patch tokens: the class token and the registers."""
        return int(self.cls_token) + self.registers


def _act(name: str) -> Callable[[jax.Array], jax.Array]:
    if name == "gelu":
        return functools.partial(jax.nn.gelu, approximate=False)
    if name == "gelu_tanh":
        return functools.partial(jax.nn.gelu, approximate=True)
    if name == "quick_gelu":
        return lambda x: x * jax.nn.sigmoid(1.702 * x)
    raise ValueError(f"unknown activation {name!r}")


def _ln(spec: ViTSpec, name: str) -> nn.LayerNorm:
    # Two-pass variance, as torch computes it (the fast E[x^2]-E[x]^2 form loses digits on large means).
    return nn.LayerNorm(epsilon=spec.eps, use_fast_variance=False, name=name)


class Attention(nn.Module):
    spec: ViTSpec

    @nn.compact
    def __call__(self, q_in: jax.Array, kv_in: jax.Array) -> jax.Array:
        s = self.spec
        hd = s.hidden // s.heads

        def proj(name: str, x: jax.Array) -> jax.Array:
            y = nn.Dense(s.hidden, name=name)(x)
            return y.reshape(*y.shape[:-1], s.heads, hd)

        q, k, v = proj("query", q_in), proj("key", kv_in), proj("value", kv_in)
        out = jax.nn.dot_product_attention(q, k, v, scale=hd**-0.5)
        return nn.Dense(s.hidden, name="out")(out.reshape(*out.shape[:-2], s.hidden))


class Mlp(nn.Module):
    spec: ViTSpec

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        x = _act(self.spec.act)(nn.Dense(self.spec.mlp, name="fc1")(x))
        return nn.Dense(self.spec.hidden, name="fc2")(x)


class Block(nn.Module):
    """Pre-norm transformer block; DINOv2 scales both branches by LayerScale."""

    spec: ViTSpec

    @nn.compact
    def __call__(self, x: jax.Array) -> jax.Array:
        s = self.spec
        h = _ln(s, "norm1")(x)
        h = Attention(s, name="attn")(h, h)
        if s.layerscale:
            h = h * self.param("ls1", nn.initializers.ones, (s.hidden,), x.dtype)
        x = x + h
        h = Mlp(s, name="mlp")(_ln(s, "norm2")(x))
        if s.layerscale:
            h = h * self.param("ls2", nn.initializers.ones, (s.hidden,), x.dtype)
        return x + h


class MapHead(nn.Module):
    """SigLIP's attention pooling: a learned probe attends over the tokens, then a residual MLP."""

    spec: ViTSpec

    @nn.compact
    def __call__(self, tokens: jax.Array) -> jax.Array:
        s = self.spec
        probe = self.param("probe", nn.initializers.normal(1.0), (1, 1, s.hidden), tokens.dtype)
        h = Attention(s, name="attn")(jnp.broadcast_to(probe, (tokens.shape[0], 1, s.hidden)), tokens)
        h = h + Mlp(s, name="mlp")(_ln(s, "norm")(h))
        return h[:, 0]


def torch_bicubic_matrix(n_in: int, n_out: int, antialias: bool = False) -> np.ndarray:
    """(n_out, n_in) weights of torch.nn.functional.interpolate(mode="bicubic", align_corners=False) along one
    axis, with `size=` given (scale = n_in / n_out).

    Why a matrix: positional embeddings are resized once per input size, so this runs on the host in float64
    and the device does two small matmuls. Plain bicubic is Keys' kernel (A=-0.75) on clamped neighbours;
    antialias=True is PIL's filter (A=-0.5) widened by the scale when shrinking, normalised per output.
    """
    scale = n_in / n_out
    m = np.zeros((n_out, n_in), np.float64)
    if not antialias:
        a = -0.75

        def k(x: float) -> float:
            x = abs(x)
            if x <= 1:
                return ((a + 2) * x - (a + 3)) * x * x + 1
            if x < 2:
                return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a
            return 0.0

        for i in range(n_out):
            real = scale * (i + 0.5) - 0.5
            base = math.floor(real)
            t = real - base
            for j, d in zip(range(base - 1, base + 3), (t + 1, t, 1 - t, 2 - t)):
                m[i, min(max(j, 0), n_in - 1)] += k(d)
        return m
    a = -0.5

    def f(x: float) -> float:
        x = abs(x)
        if x < 1:
            return ((a + 2) * x - (a + 3)) * x * x + 1
        if x < 2:
            return (((x - 5) * x + 8) * x - 4) * a
        return 0.0

    support = 2.0 * scale if scale >= 1 else 2.0
    inv = 1.0 / scale if scale >= 1 else 1.0
    for i in range(n_out):
        center = scale * (i + 0.5)
        lo = max(int(center - support + 0.5), 0)
        hi = min(int(center + support + 0.5), n_in)
        w = np.array([f((j - center + 0.5) * inv) for j in range(lo, hi)])
        total = w.sum()
        m[i, lo:hi] = w / total if total != 0 else w
    return m


class ViT(nn.Module):
    """Runs the blocks up to `tap` (1-based) and returns the final-normed tokens and, with `embed`, the
    model's own image embedding (CLIP's projection of the class token, SigLIP's pooling head)."""

    spec: ViTSpec
    tap: int
    embed: bool = False

    @nn.compact
    def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array | None]:
        s = self.spec
        b, h, w, _ = x.shape
        gh, gw = h // s.patch, w // s.patch
        x = x[:, : gh * s.patch, : gw * s.patch]  # a stride-p conv ignores the remainder; so does this
        patches = x.reshape(b, gh, s.patch, gw, s.patch, 3).transpose(0, 1, 3, 2, 4, 5)
        patches = patches.reshape(b, gh * gw, s.patch * s.patch * 3)
        tokens = nn.Dense(s.hidden, use_bias=s.patch_bias, name="patch")(patches)
        pos = self.param("pos", nn.initializers.normal(0.02), (int(s.cls_token) + s.grid * s.grid, s.hidden), x.dtype)
        grid_pos = pos[int(s.cls_token):].reshape(s.grid, s.grid, s.hidden)
        if (gh, gw) != (s.grid, s.grid):
            mh = jnp.asarray(torch_bicubic_matrix(s.grid, gh, s.antialias), x.dtype)
            mw = jnp.asarray(torch_bicubic_matrix(s.grid, gw, s.antialias), x.dtype)
            grid_pos = jnp.einsum("ij,kl,jlc->ikc", mh, mw, grid_pos, precision="highest")
        tokens = tokens + grid_pos.reshape(1, gh * gw, s.hidden)
        if s.cls_token:
            cls = self.param("cls", nn.initializers.normal(0.02), (s.hidden,), x.dtype) + pos[0]
            tokens = jnp.concatenate([jnp.broadcast_to(cls, (b, 1, s.hidden)), tokens], axis=1)
        if s.registers:
            reg = self.param("registers", nn.initializers.zeros, (s.registers, s.hidden), x.dtype)
            tokens = jnp.concatenate([tokens[:, :1], jnp.broadcast_to(reg, (b, s.registers, s.hidden)), tokens[:, 1:]], 1)
        if s.pre_norm:
            tokens = _ln(s, "pre_norm")(tokens)
        for i in range(self.tap):
            tokens = Block(s, name=f"block{i}")(tokens)
        normed = _ln(s, "norm")(tokens)
        embedding = None
        if self.embed and s.projection:
            embedding = nn.Dense(s.projection, use_bias=False, name="projection")(normed[:, 0])
        elif self.embed and s.map_head:
            embedding = MapHead(s, name="head")(normed)
        return normed, embedding


def full_model(spec: ViTSpec) -> ViT:
    """The whole network (every block, and the projection or head the checkpoint carries)."""
    return ViT(spec, tap=spec.depth, embed=bool(spec.projection or spec.map_head))


def param_shapes(spec: ViTSpec) -> dict:
    """The param tree of `full_model(spec)`, shapes only (nothing is computed)."""
    size = spec.grid * spec.patch
    x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
    return jax.eval_shape(full_model(spec).init, jax.random.key(0), x)["params"]


# --- checkpoint tensors to Flax params -------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Entry:
    """One checkpoint tensor (by its Hugging Face name and shape) and where it goes in the Flax params."""

    key: str
    path: tuple[str, ...]
    shape: tuple[int, ...]
    convert: Callable[[np.ndarray], np.ndarray] = np.asarray


def linear(key: str, path: tuple[str, ...], n_in: int, n_out: int, bias: bool = True) -> list[Entry]:
    """A torch Linear (out, in) -> Flax Dense (in, out)."""
    out = [Entry(f"{key}.weight", (*path, "kernel"), (n_out, n_in), lambda a: a.T)]
    if bias:
        out.append(Entry(f"{key}.bias", (*path, "bias"), (n_out,)))
    return out


def norm(key: str, path: tuple[str, ...], d: int) -> list[Entry]:
    return [Entry(f"{key}.weight", (*path, "scale"), (d,)), Entry(f"{key}.bias", (*path, "bias"), (d,))]


def patch_conv(key: str, spec: ViTSpec, bias: bool) -> list[Entry]:
    """A torch Conv2d (D, 3, p, p) of stride p -> a Dense over patches flattened as (p, p, 3)."""
    p, d = spec.patch, spec.hidden
    out = [Entry(f"{key}.weight", ("patch", "kernel"), (d, 3, p, p), lambda a: a.transpose(2, 3, 1, 0).reshape(-1, a.shape[0]))]
    if bias:
        out.append(Entry(f"{key}.bias", ("patch", "bias"), (d,)))
    return out


def packed_attention(key: str, path: tuple[str, ...], d: int) -> list[Entry]:
    """torch.nn.MultiheadAttention's packed in_proj (3D, D) and out_proj -> query/key/value/out Dense."""
    out: list[Entry] = []
    for i, part in enumerate(("query", "key", "value")):
        sl = slice(i * d, (i + 1) * d)
        out.append(Entry(f"{key}.in_proj_weight", (*path, part, "kernel"), (3 * d, d), lambda a, sl=sl: a[sl].T))
        out.append(Entry(f"{key}.in_proj_bias", (*path, part, "bias"), (3 * d,), lambda a, sl=sl: a[sl]))
    return out + linear(f"{key}.out_proj", (*path, "out"), d, d)


def _few(keys: list[str], n: int = 5) -> str:
    return "none" if not keys else ", ".join(keys[:n]) + (f" (+{len(keys) - n} more)" if len(keys) > n else "")


def convert(state_dict: dict[str, np.ndarray], entries: list[Entry], spec: ViTSpec, source: str, model: str) -> dict:
    """Maps checkpoint tensors onto Flax params, all or nothing: a missing, unexpected or mis-shaped tensor is
    a one-line CheckpointMismatchError that names the checkpoint key (`state_dict` holds only the tensors
    this architecture reads: the caller drops the ones a checkpoint may carry for other parts, e.g. CLIP's
    text tower)."""
    wanted = {e.key: e.shape for e in entries}
    missing = [k for k in wanted if k not in state_dict]
    unexpected = sorted(set(state_dict) - set(wanted))
    hint = f"is it a {model} checkpoint (backbone, backbone.model)?"
    if missing or unexpected:
        raise weights.CheckpointMismatchError(
            f"{source} does not match {model}: missing {_few(missing)}; unexpected {_few(unexpected)}; {hint}")
    wrong = [f"{k} {tuple(state_dict[k].shape)} != {shape}" for k, shape in wanted.items()
             if tuple(state_dict[k].shape) != shape]
    if wrong:
        raise weights.CheckpointMismatchError(f"{source} does not match {model}: shape mismatch {_few(wrong)}; {hint}")
    flat = {e.path: np.ascontiguousarray(e.convert(np.asarray(state_dict[e.key])), np.float32) for e in entries}
    params = traverse_util.unflatten_dict(flat)
    weights.check_shapes(params, param_shapes(spec), source)  # a mapping bug, not a user error, if this ever fails
    return params


# --- preprocessing ---------------------------------------------------------------------------------------


def preprocess(image: np.ndarray, *, size: int, resize: str, ratio: float, mean: np.ndarray, std: np.ndarray) -> np.ndarray:
    """uint8 HxWx3 -> float32 size x size x 3 exactly as the reference image processor does it.

    center_crop: short side to round(size * ratio) with PIL bicubic (the long side truncated as torchvision
    and transformers do), centre crop with the top-left rounded down; squash: bicubic to size x size. Then
    x / 255 in float64, cast to float32, (x - mean) / std in float32.
    """
    if image.ndim == 2:
        image = np.stack([image] * 3, axis=-1)
    pil = Image.fromarray(np.ascontiguousarray(image[..., :3]))
    if resize == "squash":
        out = np.asarray(pil.resize((size, size), Image.Resampling.BICUBIC))
    else:
        h, w = image.shape[:2]
        short_target = int(round(size * ratio))
        if w <= h:
            nw, nh = short_target, int(short_target * h / w)
        else:
            nh, nw = short_target, int(short_target * w / h)
        out = np.asarray(pil.resize((nw, nh), Image.Resampling.BICUBIC))
        top, left = (nh - size) // 2, (nw - size) // 2  # >= 0: ratio >= 1, so never smaller than the crop
        out = out[top:top + size, left:left + size]
    x = (out.astype(np.float64) * (1 / 255)).astype(np.float32)
    return (x - mean) / std


# --- the Backbone --------------------------------------------------------------------------------------


def _pool(name: str, prefix: int, p: float) -> Callable[[jax.Array, jax.Array | None], jax.Array]:
    from cbir_jax.backbones.pooling import gem

    if name == "cls":
        return lambda tokens, embedding: tokens[:, 0]
    if name == "mean":
        return lambda tokens, embedding: jnp.mean(tokens[:, prefix:], axis=1)
    if name == "gem":  # clamped at eps as published: only the positive part of each dimension counts
        return lambda tokens, embedding: gem(tokens[:, prefix:, None, :], p)
    return lambda tokens, embedding: embedding


def layer_names(spec: ViTSpec) -> list[str]:
    return [f"block{i}" for i in range(1, spec.depth + 1)]


def vit_backbone(cfg, *, name: str, model: str, spec: ViTSpec, params: dict, weights_sha: str) -> Backbone:
    """Wraps converted params as a Backbone: preprocessing, forward up to `cfg.layer`, pooling, under one jit."""
    from cbir_jax.data.imageops import RESIZERS

    layers = layer_names(spec)
    layer = cfg.layer or layers[-1]
    if layer not in layers:
        raise UnknownComponentError(f"{name} {model} has no layer {layer!r}; valid: block1..block{spec.depth}")
    tap = layers.index(layer) + 1
    pooling = str(cfg.pooling)
    if pooling not in POOLINGS:
        raise ConfigError(f"backbone={name} pools tokens: backbone.pooling must be one of {', '.join(POOLINGS)}, not {pooling!r}")
    if pooling == "cls" and not spec.cls_token:
        raise ConfigError(f"{name} {model} has no class token; use backbone.pooling=embed (its attention-pooling head), mean or gem")
    if pooling == "embed":
        if not (spec.projection or spec.map_head):
            raise ConfigError(f"{name} has no image-embedding head; use backbone.pooling=cls, mean or gem")
        if tap != spec.depth:
            raise ConfigError(f"backbone.pooling=embed needs the last block (backbone.layer=null), not {layer}")
    resize = str(cfg.resize)
    if resize not in RESIZERS:
        raise UnknownComponentError(f"unknown backbone.resize {resize!r}; valid: {', '.join(RESIZERS)}")
    size = int(cfg.image_size)
    if size < spec.patch:
        raise ConfigError(f"backbone.image_size={size} is smaller than {name}'s {spec.patch}-pixel patches")
    dtype = jnp.dtype(cfg.dtype)
    net = ViT(spec, tap=tap, embed=pooling == "embed")
    params = jax.tree.map(lambda a: jnp.asarray(a, dtype), _params_for(params, tap, pooling == "embed", spec))
    pool = _pool(pooling, spec.prefix, float(cfg.gem_p))

    @jax.jit
    def _forward(params: dict, batch: jax.Array) -> jax.Array:
        tokens, embedding = net.apply({"params": params}, batch.astype(dtype))
        return pool(tokens, embedding).astype(jnp.float32)

    dim = spec.projection if pooling == "embed" and spec.projection else spec.hidden
    pool_name = f"gem{float(cfg.gem_p):g}" if pooling == "gem" else pooling
    mean, std = np.asarray(spec.mean, np.float32), np.asarray(spec.std, np.float32)
    return Backbone(
        name=name,
        image_size=size,
        feature_dim=dim,
        preprocess=functools.partial(preprocess, size=size, resize=resize, ratio=spec.resize_ratio, mean=mean, std=std),
        forward=functools.partial(_forward, params),
        fingerprint=f"{name}-{model}-{weights_sha}-{layer}-{pool_name}-{size}-{resize}-{dtype.name}",
    )


def _params_for(params: dict, tap: int, embed: bool, spec: ViTSpec) -> dict:
    """The subset of the full model's params that a ViT tapped at block `tap` uses (flax rejects no extras,
    but the unused blocks would still be copied to the device)."""
    keep = {k: v for k, v in params.items() if not (k.startswith("block") and int(k[5:]) >= tap)}
    if not embed:
        keep.pop("projection", None)
        keep.pop("head", None)
    return keep


# --- families of checkpoints -----------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Model:
    spec: ViTSpec
    repo: str | None  # the official Hugging Face repo; None: a test architecture with no checkpoint


@dataclasses.dataclass(frozen=True, eq=False)  # hashed by identity: a key of the params cache
class Family:
    """A registered backbone name: its sizes, how checkpoint keys map onto the params, which keys it reads."""

    name: str
    title: str
    models: dict[str, Model]
    default: str
    entries: Callable[[ViTSpec], list[Entry]]
    # A checkpoint key -> the name this family reads it under, or None for a tensor of another part of the
    # published model (CLIP's text tower, DINOv2's pre-training mask token), which is never read.
    rename: Callable[[str], str | None]
    revision: str = "main"

    def model(self, name: str | None) -> tuple[str, Model]:
        name = name or self.default
        if name not in self.models:
            raise UnknownComponentError(f"unknown {self.name} backbone.model {name!r}; valid: {', '.join(self.models)}")
        return name, self.models[name]


def load_params(family: Family, model: str, path: str) -> tuple[dict, str]:
    """The Flax params of the checkpoint at `path` for `family`'s `model`, and the file's sha256."""
    stat = os.stat(path)
    return _load_params(family, model, os.path.abspath(path), stat.st_size, stat.st_mtime_ns)


@functools.lru_cache(maxsize=4)
def _load_params(family: Family, model: str, path: str, size: int, mtime_ns: int) -> tuple[dict, str]:
    from cbir_jax.backbones import safetensors_weights

    del size, mtime_ns  # part of the cache key only: a file rewritten in place is read again
    spec = family.models[model].spec
    tensors = safetensors_weights.load(path, rename=family.rename)
    params = convert(tensors, family.entries(spec), spec, path, f"{family.name} {model}")
    return params, weights.sha256_file(path)


def build_family(cfg, cache_dir: str | None, family: Family) -> Backbone:
    """`backbone=<family.name>`: resolves the weights file (local, cached, or fetched once), loads it
    strictly and wraps it as a Backbone."""
    from cbir_jax.backbones import safetensors_weights

    model, entry = family.model(cfg.model)
    repo = cfg.hf_repo or entry.repo
    revision = cfg.hf_revision or family.revision
    if not cfg.weights and repo is None:
        raise ConfigError(f"{family.name} {model} is a test architecture with no published checkpoint; pass backbone.weights=PATH")
    path = safetensors_weights.resolve(cfg.weights, repo or "", revision, cache_dir, what=f"{family.title} {model}")
    params, sha = load_params(family, model, path)
    return vit_backbone(cfg, name=family.name, model=model, spec=entry.spec, params=params, weights_sha=sha[:16])
