"""SSIM pair labels in JAX, matching ``skimage.metrics.structural_similarity`` with its defaults.

skimage's default SSIM: uniform ``win_size`` x ``win_size`` window, sample covariance
(``NP / (NP - 1)``), ``C1 = (0.01 L)^2``, ``C2 = (0.03 L)^2``, mean of the SSIM map over the pixels whose
window lies fully inside the image (it crops ``(win_size - 1) // 2`` on each border), then the mean over
channels. Only the valid windows matter, so we take "valid" box sums with separable shifted-slice adds
(no 2-D convolution, no padding, O(win_size) adds per pixel) and never compute the border that
skimage throws away.

Precision: we work in float32. To keep ``E[x^2] - E[x]^2`` from cancelling, each image is first
centred on its own mean and scaled by ``1 / data_range``; SSIM is invariant to that scaling (the
constants scale with it) and the variances are invariant to the shift, which we add back to the means.
"""

from __future__ import annotations

from functools import partial
from typing import Callable

import jax
import jax.numpy as jnp

K1, K2 = 0.01, 0.03


def _ssim_one(x: jax.Array, y: jax.Array, data_range: jax.Array, win_size: int) -> jax.Array:
    """Mean SSIM of one pair laid out (H, W, C).

    Layout: each image is viewed as (H, W * C), so a horizontal shift by one pixel is a shift by C
    along the contiguous minor axis (vectorises well, no transpose). The vertical window sums of the
    five moments are computed straight from x and y (products fused in, nothing else materialised);
    the optimisation barriers stop XLA from re-fusing the window sums into every later use.
    """
    h, w, c = x.shape
    inv = 1.0 / jnp.asarray(data_range, jnp.float32)
    x = x.astype(jnp.float32).reshape(h, w * c)
    y = y.astype(jnp.float32).reshape(h, w * c)
    mx = jnp.tile(jnp.mean(x.reshape(h, w, c), axis=(0, 1)) * inv, w)  # per-channel means, (W*C,)
    my = jnp.tile(jnp.mean(y.reshape(h, w, c), axis=(0, 1)) * inv, w)
    x = x * inv - mx
    y = y * inv - my

    rows = h - win_size + 1

    def vsum(f: Callable[[int], jax.Array]) -> jax.Array:
        acc = f(0)
        for i in range(1, win_size):
            acc = acc + f(i)
        return acc

    xs = [x[i : i + rows] for i in range(win_size)]
    ys = [y[i : i + rows] for i in range(win_size)]
    s = jnp.stack(
        [
            vsum(lambda i: xs[i]),
            vsum(lambda i: ys[i]),
            vsum(lambda i: xs[i] * xs[i]),
            vsum(lambda i: ys[i] * ys[i]),
            vsum(lambda i: xs[i] * ys[i]),
        ]
    )
    s = jax.lax.optimization_barrier(s)
    cols = (w - win_size + 1) * c
    t = s[..., 0:cols]
    for i in range(1, win_size):
        t = t + s[..., i * c : i * c + cols]
    t = jax.lax.optimization_barrier(t) * (1.0 / win_size**2)

    ux, uy, uxx, uyy, uxy = t[0], t[1], t[2], t[3], t[4]
    n_px = win_size**2
    cov_norm = n_px / (n_px - 1.0)
    vx = cov_norm * (uxx - ux * ux)
    vy = cov_norm * (uyy - uy * uy)
    vxy = cov_norm * (uxy - ux * uy)
    ux = ux + mx[:cols]  # undo the centring for the luminance term
    uy = uy + my[:cols]
    c1, c2 = K1**2, K2**2  # (K * L)^2 with L = 1 after scaling
    num = (2.0 * ux * uy + c1) * (2.0 * vxy + c2)
    den = (ux * ux + uy * uy + c1) * (vx + vy + c2)
    return jnp.mean(num / den)


def _check(shape: tuple[int, ...], other: tuple[int, ...], win_size: int, spatial: tuple[int, int]) -> None:
    if shape != other:
        raise ValueError(f"images must have the same shape, got {shape} and {other}")
    if win_size < 3 or win_size % 2 == 0:
        raise ValueError(f"win_size must be odd and >= 3, got {win_size}")
    if win_size > min(spatial):
        raise ValueError(f"win_size {win_size} exceeds the image size {spatial}")


@partial(jax.jit, static_argnames=("win_size", "chunk"))
def _ssim_pairs(a: jax.Array, b: jax.Array, data_range: jax.Array, win_size: int, chunk: int) -> jax.Array:
    one = lambda xy: _ssim_one(xy[0], xy[1], data_range, win_size)
    return jax.lax.map(one, (a, b), batch_size=min(chunk, a.shape[0]))


def ssim_pairs(
    a: jax.Array, b: jax.Array, *, win_size: int = 7, data_range: float = 255.0, chunk: int | None = None
) -> jax.Array:
    """Mean SSIM of each pair ``(a[p], b[p])``: (P, H, W) or (P, H, W, C) -> float32 (P,).

    Pairs are processed ``chunk`` at a time (vmapped inside a scan), so peak memory is about
    ``chunk * H * W * C * 60`` bytes beyond the inputs whatever P is. ``None``: 1 on CPU (measured
    fastest: buffers stay in cache), 64 on accelerators. Inputs may be any real dtype (uint8 stays uint8
    until its chunk is processed). Equals skimage's ``structural_similarity(a[p], b[p], win_size=...,
    data_range=..., channel_axis=-1 if C else None)`` to ~1e-6 on real images.
    """
    a, b = jnp.asarray(a), jnp.asarray(b)
    if a.ndim not in (3, 4):
        raise ValueError(f"expected (P,H,W) or (P,H,W,C), got {a.shape}")
    _check(a.shape, b.shape, win_size, a.shape[1:3])
    if a.ndim == 3:
        a, b = a[..., None], b[..., None]
    if a.shape[0] == 0:
        return jnp.zeros((0,), jnp.float32)
    if chunk is None:
        chunk = 1 if jax.default_backend() == "cpu" else 64
    return _ssim_pairs(a, b, jnp.float32(data_range), win_size, max(1, int(chunk)))


def ssim(x: jax.Array, y: jax.Array, *, win_size: int = 7, data_range: float = 255.0) -> jax.Array:
    """Mean SSIM of one pair of images (H, W) or (H, W, C); see :func:`ssim_pairs`."""
    x, y = jnp.asarray(x), jnp.asarray(y)
    if x.ndim not in (2, 3):
        raise ValueError(f"expected (H,W) or (H,W,C), got {x.shape}")
    return ssim_pairs(x[None], y[None], win_size=win_size, data_range=data_range, chunk=1)[0]
