"""Pair targets: cheap image heuristics (SSIM, dHash) in JAX, exact to their reference implementations, and
the registry of labels (`labels=...`) that turn them into training targets (targets.py)."""

from cbir_jax.labels.dhash import dhash, dhash_fn, hamming
from cbir_jax.labels.ssim import ssim, ssim_pairs

__all__ = ["dhash", "dhash_fn", "hamming", "ssim", "ssim_pairs"]
