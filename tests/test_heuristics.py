"""Heuristic pair labels must equal their references: SSIM vs skimage, dHash vs imagehash (bit-exact)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from skimage import data as skdata
from skimage.metrics import structural_similarity

from cbir_jax.labels import dhash, hamming, ssim, ssim_pairs
from cbir_jax.scoring.heads import ssim_vectors

CALTECH = Path(__file__).resolve().parents[2] / "shared" / "data" / "caltech101-dev"
needs_caltech = pytest.mark.skipif(not CALTECH.is_dir(), reason=f"{CALTECH} not present")


def _photos() -> list[np.ndarray]:
    return [skdata.astronaut(), skdata.chelsea(), skdata.coffee(), skdata.rocket()]


def _resized(img: np.ndarray, w: int, h: int) -> np.ndarray:
    return np.asarray(Image.fromarray(img).resize((w, h), Image.Resampling.BILINEAR))


def _caltech(categories: int, per_category: int) -> list[np.ndarray]:
    out = []
    for cat in sorted(p for p in CALTECH.iterdir() if p.is_dir())[:categories]:
        for f in sorted(cat.glob("*.jpg"))[:per_category]:
            with Image.open(f) as im:
                out.append(np.asarray(im))
    return out


def _sk(a: np.ndarray, b: np.ndarray, win_size: int = 7) -> float:
    return structural_similarity(
        a.astype(np.float64), b.astype(np.float64), win_size=win_size, data_range=255.0,
        channel_axis=-1 if a.ndim == 3 else None,
    )


@pytest.mark.parametrize(("w", "h", "win_size"), [(64, 48, 7), (97, 61, 3)])
def test_ssim_matches_skimage_rgb_and_grey(w: int, h: int, win_size: int) -> None:
    imgs = [_resized(p, w, h) for p in _photos()]
    a = np.stack([imgs[i] for i in range(4) for _ in range(4)])
    b = np.stack([imgs[j] for _ in range(4) for j in range(4)])
    ours = np.asarray(ssim_pairs(a, b, win_size=win_size, chunk=3))
    ref = np.array([_sk(x, y, win_size) for x, y in zip(a, b)])
    np.testing.assert_allclose(ours, ref, atol=1e-4)
    grey_ours = np.asarray(ssim_pairs(a[..., 1], b[..., 0].astype(np.float32), win_size=win_size))
    grey_ref = np.array([_sk(x[..., 1], y[..., 0], win_size) for x, y in zip(a, b)])
    np.testing.assert_allclose(grey_ours, grey_ref, atol=1e-4)


def test_ssim_single_pair_full_size_photo() -> None:
    cam = skdata.camera()
    other = np.roll(cam, 5, axis=1)
    assert abs(float(ssim(cam, other)) - _sk(cam, other)) < 1e-4
    assert float(ssim(cam, cam)) == pytest.approx(1.0, abs=1e-6)
    rgb = skdata.astronaut()
    assert float(ssim(rgb, rgb)) == pytest.approx(1.0, abs=1e-6)


@needs_caltech
def test_ssim_matches_skimage_on_caltech() -> None:
    imgs = [_resized(i if i.ndim == 3 else np.stack([i] * 3, -1), 128, 96) for i in _caltech(3, 4)]
    a, b = np.stack(imgs), np.stack(imgs[1:] + imgs[:1])
    ref = np.array([_sk(x, y) for x, y in zip(a, b)])
    np.testing.assert_allclose(np.asarray(ssim_pairs(a, b)), ref, atol=1e-4)


def test_ssim_rejects_bad_window() -> None:
    with pytest.raises(ValueError):
        ssim(np.zeros((5, 5)), np.zeros((5, 5)), win_size=7)
    with pytest.raises(ValueError):
        ssim(np.zeros((9, 9)), np.zeros((9, 9)), win_size=4)


def test_ssim_vectors_hand_computed() -> None:
    x, y = np.array([1.0, 2.0, 3.0, 4.0]), np.array([2.0, 2.0, 4.0, 4.0])
    # mu_x = 2.5, mu_y = 3, var_x = 5/3, var_y = 4/3, cov = 4/3 (D - 1 = 3); L = 4 -> C1 = 0.0016, C2 = 0.0144
    c1, c2 = 0.0016, 0.0144
    expected = (2 * 2.5 * 3 + c1) * (2 * 4 / 3 + c2) / ((2.5**2 + 3**2 + c1) * (5 / 3 + 4 / 3 + c2))
    assert float(ssim_vectors(x, y, data_range=4.0)) == pytest.approx(expected, rel=1e-5)
    c1, c2 = 0.0009, 0.0081  # default L: the pair's joint range, max 4 - min 1 = 3
    joint = (2 * 2.5 * 3 + c1) * (2 * 4 / 3 + c2) / ((2.5**2 + 3**2 + c1) * (5 / 3 + 4 / 3 + c2))
    assert float(ssim_vectors(x, y)) == pytest.approx(joint, rel=1e-5)
    batch = ssim_vectors(np.stack([x, y])[:, None, :], np.stack([x, y])[None, :, :], data_range=4.0)
    assert batch.shape == (2, 2)
    np.testing.assert_allclose(np.diag(np.asarray(batch)), 1.0, rtol=1e-6)


def _imagehash_bits(imgs: list[np.ndarray], hash_size: int) -> np.ndarray:
    imagehash = pytest.importorskip("imagehash")
    return np.stack([imagehash.dhash(Image.fromarray(i), hash_size).hash.flatten() for i in imgs])


def _check_dhash(imgs: list[np.ndarray], hash_size: int = 8) -> None:
    ref = _imagehash_bits(imgs, hash_size)
    ours = np.asarray(dhash(np.stack(imgs), hash_size, chunk=5))
    assert ours.dtype == bool and ours.shape == ref.shape
    np.testing.assert_array_equal(ours, ref)


@pytest.mark.parametrize("hash_size", [8, 5])
def test_dhash_bit_exact_on_photos(hash_size: int) -> None:
    pytest.importorskip("imagehash")
    photos = _photos()
    # Several sizes, including both of Pillow 13's pass orders (tall images go vertical first),
    # upscaling and the no-op pass when a side already has the target size.
    for w, h in [(300, 200), (200, 300), (33, 120), (hash_size + 1, 40), (50, hash_size), (7, 5)]:
        _check_dhash([_resized(p, w, h) for p in photos], hash_size)
    _check_dhash([np.asarray(Image.fromarray(p).convert("L").resize((91, 77))) for p in photos], hash_size)
    _check_dhash([skdata.camera(), skdata.moon()], hash_size)  # greyscale 512x512


@needs_caltech
def test_dhash_bit_exact_on_caltech() -> None:
    pytest.importorskip("imagehash")
    by_shape: dict[tuple[int, ...], list[np.ndarray]] = {}
    for img in _caltech(4, 40):
        by_shape.setdefault(img.shape, []).append(img)
    groups = sorted(by_shape.values(), key=len, reverse=True)[:6]  # biggest groups: few compiles
    for imgs in groups:
        _check_dhash(imgs)


def test_dhash_rejects_non_uint8() -> None:
    with pytest.raises(TypeError):
        dhash(np.zeros((2, 16, 16, 3), np.float32))


def test_hamming_toy_cases() -> None:
    a = np.array([True, False, True, True])
    assert int(hamming(a, a)) == 0
    assert int(hamming(a, ~a)) == 4
    assert int(hamming(a, np.array([True, True, True, False]))) == 2
    codes = np.array([[0, 0, 0], [1, 0, 0], [1, 1, 1]], bool)
    np.testing.assert_array_equal(np.asarray(hamming(codes[:, None], codes[None])), [[0, 1, 3], [1, 0, 2], [3, 2, 0]])
