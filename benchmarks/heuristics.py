"""Pair-label heuristics vs their references: SSIM (skimage loop) and dHash (imagehash loop).

Run: ``python -m benchmarks.heuristics`` (add ``--quick`` for a smoke run). Each row reports
throughput after warm-up: the best of several repetitions (median in the note), ours vs the peer.
"""

from __future__ import annotations

import statistics
import sys
from typing import Callable

import numpy as np
from PIL import Image
from skimage.metrics import structural_similarity

from benchmarks.timing import times
from cbir_jax.heuristics import dhash, ssim_pairs


def _times(fn: Callable[[], object], reps: int) -> tuple[float, float]:
    ts = times(fn, reps)
    return min(ts), statistics.median(ts)


def _images(n: int, h: int, w: int, seed: int) -> np.ndarray:
    """Smooth-ish real-looking uint8 images: random low-res noise upsampled (not pure noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (n, h // 8, w // 8, 3), dtype=np.uint8)
    return np.stack([np.asarray(Image.fromarray(s).resize((w, h), Image.Resampling.BICUBIC)) for s in small])


def bench_ssim(quick: bool) -> dict:
    n_ours, n_peer, reps = (64, 4, 2) if quick else (256, 16, 5)
    a, b = _images(n_ours, 224, 224, 0), _images(n_ours, 224, 224, 1)
    ours_fn = lambda: np.asarray(ssim_pairs(a, b))
    best, med = _times(ours_fn, reps)
    ours_vals = ours_fn()
    peer_fn = lambda: [structural_similarity(a[i], b[i], data_range=255.0, channel_axis=-1) for i in range(n_peer)]
    pbest, pmed = _times(peer_fn, max(2, reps // 2))
    err = float(np.max(np.abs(np.array(peer_fn()) - ours_vals[:n_peer])))
    return {
        "job": "ssim pair labels 224x224 RGB",
        "ours": n_ours / best,
        "peer": n_peer / pbest,
        "unit": "pairs/s",
        "peer_name": "skimage.metrics.structural_similarity (Python loop)",
        "note": f"ours jitted on {n_ours} uint8 pairs (median {n_ours / med:.1f}/s), peer on {n_peer} "
        f"(median {n_peer / pmed:.1f}/s); speedup {(n_ours / best) / (n_peer / pbest):.1f}x; "
        f"max |ours - skimage| = {err:.2e}",
    }


def bench_dhash(quick: bool) -> dict:
    n, reps = (128, 3) if quick else (512, 7)
    imgs = _images(n, 200, 300, 2)  # caltech-like 300x200 RGB
    ours_fn = lambda: np.asarray(dhash(imgs))
    best, med = _times(ours_fn, reps)
    row = {"job": "dhash 300x200 RGB uint8", "ours": n / best, "unit": "images/s"}
    try:
        import imagehash
    except ImportError:
        row.update(peer=None, peer_name="imagehash.dhash", note=f"imagehash not importable; ours median {n / med:.0f}/s")
        return row
    peer_fn = lambda: np.stack([imagehash.dhash(Image.fromarray(i)).hash.flatten() for i in imgs])
    pbest, pmed = _times(peer_fn, max(2, reps // 2))
    exact = bool(np.array_equal(ours_fn(), peer_fn()))
    row.update(
        peer=n / pbest,
        peer_name="imagehash.dhash (Python loop)",
        note=f"end to end from one uint8 numpy batch of {n}: ours includes host->device copy, peer includes "
        f"Image.fromarray; bit-exact on all {n}: {exact}; medians ours {n / med:.0f}/s, peer {n / pmed:.0f}/s; "
        f"speedup {(n / best) / (n / pbest):.1f}x",
    )
    return row


def run(quick: bool) -> list[dict]:
    """Benchmark rows: {"job", "ours", "peer", "unit", "peer_name", "note"}."""
    return [bench_ssim(quick), bench_dhash(quick)]


if __name__ == "__main__":
    for row in run(quick="--quick" in sys.argv):
        print(row)
