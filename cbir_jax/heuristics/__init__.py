"""Cheap pair-label heuristics (SSIM, dHash) in JAX, exact to their reference implementations."""

from cbir_jax.heuristics.dhash import dhash, dhash_fn, hamming
from cbir_jax.heuristics.ssim import ssim, ssim_pairs, ssim_vectors

__all__ = ["dhash", "dhash_fn", "hamming", "ssim", "ssim_pairs", "ssim_vectors"]
