"""The one batched forward pass every extraction path shares (the store, `Index.add`, a search query)."""

from __future__ import annotations

from typing import Iterable

import jax.numpy as jnp
import numpy as np

from cbir_jax.backbones import Backbone


def forward_batches(backbone: Backbone, images: Iterable[np.ndarray], batch_size: int, *,
                    preprocessed: bool = False) -> np.ndarray:
    """Backbone features (N, D) float32 of uint8 HxWx3 images (or of `backbone.preprocess` outputs when
    `preprocessed`, as decode workers deliver them), `batch_size` at a time.

    `images` may be a generator (a folder is decoded as it is read, never held whole in memory). Every batch
    is padded to `batch_size` rows, so the jitted forward pass compiles for one shape only. Each batch is
    dispatched before the previous one is awaited, so gathering (and decoding) the next batch overlaps it.
    """
    feats: list[np.ndarray] = []
    batch: list[np.ndarray] = []
    in_flight: list[tuple] = []  # (device result, rows): one batch computes while the next is gathered

    def collect(keep: int) -> None:
        while len(in_flight) > keep:
            out, n = in_flight.pop(0)
            feats.append(np.asarray(out)[:n])

    def flush() -> None:
        if not batch:
            return
        n = len(batch)
        x = np.stack(batch + [batch[-1]] * (batch_size - n))  # fixed shape: one compilation
        in_flight.append((backbone.forward(jnp.asarray(x)), n))  # dispatched, not awaited
        batch.clear()
        collect(keep=1)

    for image in images:
        batch.append(image if preprocessed else backbone.preprocess(image))
        if len(batch) == batch_size:
            flush()
    flush()
    collect(keep=0)
    return np.concatenate(feats).astype(np.float32) if feats else np.zeros((0, backbone.feature_dim), np.float32)
