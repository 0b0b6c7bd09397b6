"""Pair-label heuristics vs their references: SSIM (skimage, per pair) and dHash (imagehash, per image).

Run: ``python -m benchmarks.heuristics [--quick]``. Ours and each peer run in separate fresh processes,
alternating (benchmarks.harness); each row reports the best and median repetition of each side after a
warm-up. The peers are called as their users call them: one `structural_similarity` / `imagehash.dhash`
call per pair / image, in a Python loop.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np
from PIL import Image

from benchmarks import table
from benchmarks.harness import Side, alternate, describe_blas
from benchmarks.timing import times


def _images(n: int, h: int, w: int, seed: int) -> np.ndarray:
    """Smooth-ish real-looking uint8 images: random low-res noise upsampled (not pure noise)."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (n, h // 8, w // 8, 3), dtype=np.uint8)
    return np.stack([np.asarray(Image.fromarray(s).resize((w, h), Image.Resampling.BICUBIC)) for s in small])


def side_ssim_ours(n: int, reps: int) -> dict[str, Any]:
    from cbir_jax.labels import ssim_pairs

    a, b = _images(n, 224, 224, 0), _images(n, 224, 224, 1)
    fn = lambda: np.asarray(ssim_pairs(a, b))  # noqa: E731
    return {"times": {"ssim": times(fn, reps)}, "arrays": {"ssim": fn()}}


def side_ssim_skimage(n: int, reps: int) -> dict[str, Any]:
    import skimage
    from skimage.metrics import structural_similarity

    a, b = _images(n, 224, 224, 0), _images(n, 224, 224, 1)
    fn = lambda: np.array([structural_similarity(a[i], b[i], data_range=255.0, channel_axis=-1)  # noqa: E731
                           for i in range(n)])
    return {"times": {"ssim": times(fn, reps)}, "arrays": {"ssim": fn()},
            "info": {"config": f"scikit-image {skimage.__version__}"}}


def side_dhash_ours(n: int, reps: int) -> dict[str, Any]:
    from cbir_jax.labels import dhash

    imgs = _images(n, 200, 300, 2)  # caltech-like 300x200 RGB
    fn = lambda: np.asarray(dhash(imgs))  # noqa: E731
    return {"times": {"dhash": times(fn, reps)}, "arrays": {"dhash": fn()}}


def side_dhash_imagehash(n: int, reps: int) -> dict[str, Any]:
    import imagehash

    imgs = _images(n, 200, 300, 2)
    fn = lambda: np.stack([imagehash.dhash(Image.fromarray(i)).hash.flatten() for i in imgs])  # noqa: E731
    return {"times": {"dhash": times(fn, reps)}, "arrays": {"dhash": fn()},
            "info": {"config": f"imagehash {imagehash.__version__}"}}


def bench_ssim(quick: bool, rounds: int) -> dict[str, Any]:
    n_ours, n_peer, reps = (64, 8, 2) if quick else (256, 16, 4)
    res = alternate([Side("ours", "benchmarks.heuristics:side_ssim_ours", {"n": n_ours, "reps": reps}, peer=False),
                     Side("skimage", "benchmarks.heuristics:side_ssim_skimage", {"n": n_peer, "reps": reps})], rounds)
    ours, peer = res["ours"], res["skimage"]
    err = float(np.max(np.abs(peer.arrays["ssim"] - ours.arrays["ssim"][:n_peer])))
    r = table.rate_row("ssim pair labels 224x224 RGB", "pairs/s",
                       f"skimage.metrics.structural_similarity per pair (Python loop): {peer.info['config']}; "
                       f"{describe_blas(peer.info['blas'])}", n_ours, ours, peer, "ssim",
                       note=f"ours jitted on {n_ours} uint8 pairs, peer on {n_peer}; max |ours - skimage| = "
                            f"{err:.2e}; {ours.processes}+{peer.processes} processes × {reps} reps")
    r["peer"], r["peer_median"] = n_peer / peer.best("ssim"), n_peer / peer.median("ssim")
    return r


def bench_dhash(quick: bool, rounds: int) -> dict[str, Any]:
    n, reps = (128, 2) if quick else (512, 5)
    sides = [Side("ours", "benchmarks.heuristics:side_dhash_ours", {"n": n, "reps": reps}, peer=False),
             Side("imagehash", "benchmarks.heuristics:side_dhash_imagehash", {"n": n, "reps": reps})]
    res = alternate(sides, rounds)
    ours, peer = res["ours"], res["imagehash"]
    exact = bool(np.array_equal(ours.arrays["dhash"], peer.arrays["dhash"]))
    return table.rate_row("dhash 300x200 RGB uint8", "images/s",
                          f"imagehash.dhash(Image.fromarray(x)) per image (Python loop): {peer.info['config']}",
                          n, ours, peer, "dhash",
                          note=f"end to end from one uint8 numpy batch of {n}: ours includes host->device copy, "
                               f"peer includes Image.fromarray; bit-exact on all {n}: {exact}; "
                               f"{ours.processes}+{peer.processes} processes × {reps} reps")


def run(quick: bool) -> list[dict]:
    """Benchmark rows (see benchmarks.table.row)."""
    rounds = 2 if quick else 3
    rows = []
    for bench in (bench_ssim, bench_dhash):
        try:
            rows.append(bench(quick, rounds))
        except Exception as e:  # a peer that is not installed: report it, keep going
            rows.append(table.failed_row(bench.__name__, e))
    return rows


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    print("\n".join(table.markdown(run(parser.parse_args().quick))))
