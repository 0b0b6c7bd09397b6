"""Difference hash (dHash), bit-exact with ``imagehash.dhash`` on uint8 images, batched in JAX.

imagehash computes ``image.convert("L").resize((s + 1, s), LANCZOS)`` then ``px[:, 1:] > px[:, :-1]``.
Pair labels must be *exactly* that, so we reproduce Pillow's integer arithmetic rather than approximate
it: its fixed-point RGB->L conversion and its separable fixed-point resampling (Resample.c): one
1-D pass, rounded and clipped to uint8, then the other. The per-size coefficient
matrices are built once on the host in float64 exactly as Pillow's ``precompute_coeffs`` and
``normalize_coeffs_8bpc`` do, and the pass order follows Pillow 13 (see
:func:`horizontal_first`); the batch work is two int32 matmuls (exact: int32 wraps modulo 2**32 and
every true sum fits in int32, so summation order does not matter).
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np

PRECISION_BITS = 32 - 8 - 2  # Pillow's fixed-point precision for 8-bit resampling.
_LANCZOS_SUPPORT = 3.0


def _sinc(x: float) -> float:
    if x == 0.0:
        return 1.0
    x = x * math.pi
    return math.sin(x) / x


def _lanczos(x: float) -> float:
    if -3.0 <= x < 3.0:
        return _sinc(x) * _sinc(x / 3)
    return 0.0


def _c_int(v: float) -> int:
    """C's (int) cast: truncation toward zero."""
    return int(v)


@lru_cache(maxsize=64)
def resample_matrix(in_size: int, out_size: int) -> tuple[np.ndarray, int, int]:
    """Pillow's LANCZOS fixed-point weights as a dense (rows, out_size) int32 matrix over input rows.

    Returns ``(K, first, last)``: only input indices ``first:last`` are ever read (Pillow crops the rows
    the same way), and ``K[i - first, o]`` is the weight of input ``i`` in output ``o``. The loop mirrors
    ``precompute_coeffs`` operation by operation in float64 so that every rounding matches.
    """
    if in_size == out_size:  # Pillow skips the pass; a 2**22 identity is exactly a copy.
        return np.eye(in_size, dtype=np.int32) * (1 << PRECISION_BITS), 0, in_size
    in0, in1 = 0.0, float(in_size)
    scale = filterscale = (in1 - in0) / out_size
    if filterscale < 1.0:
        filterscale = 1.0
    support = _LANCZOS_SUPPORT * filterscale
    ss = 1.0 / filterscale
    taps: list[tuple[int, list[int]]] = []
    for xx in range(out_size):
        center = in0 + (xx + 0.5) * scale
        xmin = max(_c_int(center - support + 0.5), 0)
        xmax = min(_c_int(center + support + 0.5), in_size) - xmin
        k = [_lanczos((x + xmin - center + 0.5) * ss) for x in range(xmax)]
        ww = 0.0
        for w in k:
            ww += w
        if ww != 0.0:
            k = [w / ww for w in k]
        fixed = [_c_int(-0.5 + w * (1 << PRECISION_BITS)) if w < 0 else _c_int(0.5 + w * (1 << PRECISION_BITS)) for w in k]
        taps.append((xmin, fixed))
    first = taps[0][0]
    last = taps[-1][0] + len(taps[-1][1])
    mat = np.zeros((last - first, out_size), np.int32)
    for o, (xmin, fixed) in enumerate(taps):
        mat[xmin - first : xmin - first + len(fixed), o] = fixed
    return mat, first, last


def _clip8(acc: jax.Array) -> jax.Array:
    """Pillow's clip8: add half, arithmetic shift by PRECISION_BITS, clamp to [0, 255]."""
    return jnp.clip((acc + (1 << (PRECISION_BITS - 1))) >> PRECISION_BITS, 0, 255)


def luma(images: jax.Array) -> jax.Array:
    """Pillow's RGB->L: (R*19595 + G*38470 + B*7471 + 0x8000) >> 16; greyscale passes through (int32).

    Computed in float32, which is exact here: every partial sum is an integer below 2**24.
    """
    if images.ndim == 3:
        return images.astype(jnp.int32)
    x = images[..., :3].astype(jnp.float32)
    total = x[..., 0] * 19595.0 + x[..., 1] * 38470.0 + x[..., 2] * 7471.0 + 32768.0
    return jnp.floor(total * (1.0 / 65536.0)).astype(jnp.int32)


def horizontal_first(height: int, width: int, out_width: int, out_height: int) -> bool:
    """Which pass Pillow 13 runs first. Older Pillow always went horizontal first; Pillow 13 goes
    vertical first when the height shrinks and 2 * (width - out_width) < height - out_height.

    The rule was read off Pillow 13.0.0 empirically, since the pass order changes the uint8 rounding
    between passes: both orders tried on random images over a full grid of sizes for hash size 8,
    then ~8.6k random (H, W, hash_size) cases with H, W <= 1000 and hash sizes 2..32, all pixel-exact.
    The tests pin it against imagehash; recheck if Pillow is upgraded.
    """
    if height <= out_height:
        return True
    return 2 * (width - out_width) >= height - out_height


def dhash_fn(height: int, width: int, hash_size: int = 8) -> Callable[[jax.Array], jax.Array]:
    """A pure, jittable dHash for uint8 batches (N, height, width[, 3|4]) -> bool (N, hash_size**2).

    Use inside other jitted code; :func:`dhash` is the host-facing wrapper.
    """
    if hash_size < 2:
        raise ValueError("hash_size must be >= 2 (as imagehash)")
    out_w, out_h = hash_size + 1, hash_size
    kh, x0, x1 = resample_matrix(width, out_w)
    kv, y0, y1 = resample_matrix(height, out_h)
    h_first = horizontal_first(height, width, out_w, out_h)
    kh, kv = jnp.asarray(kh), jnp.asarray(kv)

    def fn(images: jax.Array) -> jax.Array:
        if h_first:  # Pillow only computes the rows the vertical pass will read
            grey = luma(images[:, y0:y1])  # (N, rows, W)
            tmp = _clip8(jnp.einsum("nhw,wk->nhk", grey, kh))  # uint8-valued (N, rows, s + 1)
            small = _clip8(jnp.einsum("nhk,hj->njk", tmp, kv))
        else:
            grey = luma(images[:, :, x0:x1])  # (N, H, cols)
            tmp = _clip8(jnp.einsum("nhw,hj->njw", grey, kv))  # uint8-valued (N, s, cols)
            small = _clip8(jnp.einsum("njw,wk->njk", tmp, kh))
        return (small[..., 1:] > small[..., :-1]).reshape(images.shape[0], -1)

    return fn


@lru_cache(maxsize=32)
def _jitted(height: int, width: int, hash_size: int) -> Callable[[jax.Array], jax.Array]:
    return jax.jit(dhash_fn(height, width, hash_size))


def dhash(images: np.ndarray | jax.Array, hash_size: int = 8, *, chunk: int = 16) -> jax.Array:
    """dHash bits of a batch of same-size uint8 images, bit-exact with imagehash.dhash(...).hash.flatten().

    ``images``: (N, H, W, 3) RGB, (N, H, W, 4) RGBA (alpha ignored, as Pillow's convert("L")) or
    (N, H, W) greyscale. Returns bool (N, hash_size * hash_size). Work is sent in chunks of ``chunk``
    images: on CPU this keeps every buffer cache-sized, which is ~3x faster than one big batch.
    """
    if images.dtype != np.uint8:
        raise TypeError(f"dhash expects uint8 images, got {images.dtype}")
    if images.ndim not in (3, 4) or (images.ndim == 4 and images.shape[-1] not in (3, 4)):
        raise ValueError(f"expected (N,H,W), (N,H,W,3) or (N,H,W,4), got {images.shape}")
    n, h, w = images.shape[:3]
    fn = _jitted(h, w, hash_size)
    if n == 0:
        return jnp.zeros((0, hash_size * hash_size), bool)
    outs = [fn(images[i : i + chunk]) for i in range(0, n, chunk)]
    return outs[0] if len(outs) == 1 else jnp.concatenate(outs)


@jax.jit
def hamming(a: jax.Array, b: jax.Array) -> jax.Array:
    """Number of differing bits between boolean hashes (..., B), broadcasting over leading dims."""
    return jnp.sum(jnp.not_equal(a, b), axis=-1, dtype=jnp.int32)
