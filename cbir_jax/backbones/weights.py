"""Turning PyTorch state dicts into Flax params: strict, BatchNorm-folded and cached on disk.

Why strict: a checkpoint that loads partially gives features that look fine and are wrong, so every key
must be used exactly once and every shape must match the Flax model, or loading fails naming the keys.
Why folded: at inference BatchNorm is an affine map, so it is merged into the preceding conv's kernel
and bias once, at conversion, and the forward pass is just convolutions.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
from flax import traverse_util

from cbir_jax.backbones import torch_pickle
from cbir_jax.core.config import default_cache_dir
from cbir_jax.core.errors import UserError


class CheckpointMismatchError(UserError, ValueError):
    """A state dict does not fit the architecture (missing, unexpected or mis-shaped tensors)."""


class StrictStateDict:
    """Hands out tensors by name and, at `finish`, fails if any was missing or left unused."""

    def __init__(self, state_dict: Mapping[str, np.ndarray], source: str) -> None:
        self._items = dict(state_dict)
        self._used: set[str] = set()
        self._missing: list[str] = []
        self.source = source

    def take(self, key: str) -> np.ndarray:
        if key not in self._items:
            self._missing.append(key)
            return np.zeros((0,), np.float32)
        self._used.add(key)
        return np.asarray(self._items[key])

    @property
    def missing(self) -> list[str]:
        return list(self._missing)

    def finish(self) -> None:
        unexpected = sorted(set(self._items) - self._used)
        if self._missing or unexpected:
            raise CheckpointMismatchError(
                f"{self.source} does not match the architecture: "
                f"missing {_few(self._missing)}; unexpected {_few(unexpected)}"
            )


def _few(keys: list[str], n: int = 5) -> str:
    if not keys:
        return "none"
    more = f" (+{len(keys) - n} more)" if len(keys) > n else ""
    return ", ".join(keys[:n]) + more


def conv_bn(sd: StrictStateDict, conv: str, bn: str, eps: float, depthwise: bool = False) -> dict:
    """A torch conv (O,I,kh,kw) followed by BatchNorm -> Flax {'kernel': (kh,kw,I,O), 'bias': (O,)}.

    Depthwise torch kernels (C,1,kh,kw) become Flax (kh,kw,1,C), which is the same transpose.
    """
    w = sd.take(f"{conv}.weight").astype(np.float32)
    gamma, beta = sd.take(f"{bn}.weight"), sd.take(f"{bn}.bias")
    mean, var = sd.take(f"{bn}.running_mean"), sd.take(f"{bn}.running_var")
    sd.take(f"{bn}.num_batches_tracked")  # training bookkeeping: checked for presence, not needed
    if sd.missing:
        return {"kernel": w, "bias": beta}  # reported with every other missing key by `finish`
    if w.ndim != 4 or not (gamma.shape == beta.shape == mean.shape == var.shape == (w.shape[0],)):
        raise CheckpointMismatchError(
            f"{sd.source} does not match the architecture: {conv}.weight {w.shape} and {bn} "
            f"{gamma.shape, beta.shape, mean.shape, var.shape} do not fit together"
        )
    scale = (gamma / np.sqrt(var.astype(np.float64) + eps)).astype(np.float64)
    kernel = np.transpose(w * scale[:, None, None, None], (2, 3, 1, 0))
    bias = beta - mean * scale
    return {"kernel": kernel.astype(np.float32), "bias": bias.astype(np.float32)}


def linear(sd: StrictStateDict, name: str) -> dict:
    """A torch Linear (out,in) -> Flax Dense {'kernel': (in,out), 'bias': (out,)}."""
    w = sd.take(f"{name}.weight")
    bias = sd.take(f"{name}.bias")
    return {"kernel": np.ascontiguousarray(w.T, np.float32), "bias": bias.astype(np.float32)}


def check_shapes(params: Mapping, expected: Any, source: str) -> None:
    """Fails unless `params` has exactly the tree structure and shapes of `expected` (e.g. eval_shape)."""
    got = {"/".join(k): np.shape(v) for k, v in traverse_util.flatten_dict(dict(params)).items()}
    want = {"/".join(k): tuple(v.shape) for k, v in traverse_util.flatten_dict(dict(expected)).items()}
    bad = [f"{k} {got.get(k)} != {want.get(k)}" for k in sorted(set(got) | set(want)) if got.get(k) != want.get(k)]
    if bad:
        raise CheckpointMismatchError(f"{source} does not match the architecture: shape mismatch {_few(bad)}")


def sha256_file(path: str | os.PathLike) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def cached_params(tag: str, sha: str, convert: Callable[[], dict], cache_dir: str | None = None) -> dict:
    """Returns `convert()`'s params, stored once as `<cache_dir>/<tag>-<sha>.npz` (keyed by weight-file hash;
    `cache_dir` defaults to the config's, `core.config.default_cache_dir`).

    `tag` should carry a converter version, so a change in the conversion never reuses stale params.
    A damaged or mismatched cache file is moved aside and rebuilt rather than trusted (`cbir_jax.core.cache`).
    """
    from cbir_jax.core import cache

    path = Path(os.path.expanduser(cache_dir or default_cache_dir())) / f"{tag}-{sha[:32]}-c{cache.FORMAT_VERSION}.npz"  # files of older formats are left alone

    def build() -> dict[str, np.ndarray]:
        return {"/".join(k): np.asarray(v) for k, v in traverse_util.flatten_dict(convert()).items()}

    flat = cache.cached(path, f"{tag}|{sha}", build)
    return traverse_util.unflatten_dict({tuple(k.split("/")): v for k, v in flat.items()})


def load_torch_params(
    tag: str, path: str, convert: Callable[[dict, str], dict], expected: Any, cache_dir: str | None = None
) -> dict:
    """A PyTorch checkpoint as Flax params (numpy): converted once, cached by the file's SHA-256, and
    shape-checked on every load, so a stale or foreign cache entry never loads partially."""
    params = cached_params(tag, sha256_file(path), lambda: convert(torch_pickle.load_state_dict(path), path), cache_dir)
    check_shapes(params, expected, f"cached params for {path}")
    return params
