"""Feature-extraction throughput of the vision transformers (dinov2, clip, siglip): ours (Flax) against
the `transformers` PyTorch reference at its best, each in its own fresh process (benchmarks.harness).

Both sides load the same random-weight checkpoint (written once by a preparation process with
`save_pretrained`: nothing is downloaded) and run the same random batch of preprocessed 224px images after
a warm-up call (compilation excluded). The peer runs as PyTorch advises for CPU inference:
`torch.inference_mode()`, `torch.set_num_threads(cores)`, SDPA attention, and, where it is faster,
`torch.compile` (both are measured, the faster is the peer; its compilation falls in the untimed warm-up
call; channels-last does not apply to a ViT).
Numbers are images/s of the forward pass to the pooled feature (the config's default pooling).

    python -m benchmarks.vit_extraction [--quick] [--write]
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import tempfile
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks import table
from benchmarks.harness import Side, alternate
from benchmarks.timing import times

# (family, model, pooling, batch, quick batch)
MODELS = [("dinov2", "vits14", "cls", 32, 8), ("dinov2", "vitb14", "cls", 16, 4),
          ("clip", "vitb32", "embed", 32, 8), ("siglip", "vitb16", "embed", 16, 4)]
PEER_MODES = ("eager", "compiled")


def _batch(batch: int) -> np.ndarray:
    return np.random.default_rng(0).uniform(-2, 2, (batch, 224, 224, 3)).astype(np.float32)


def _family(family: str):
    from cbir_jax.backbones import clip, dinov2

    return {"dinov2": dinov2.FAMILY, "clip": clip.CLIP, "siglip": clip.SIGLIP}[family]


def _hf_model(family: str, model: str):
    """The `transformers` class and config of a published size (what its config.json on the Hub says)."""
    import transformers as T

    spec = _family(family).models[model].spec
    if family == "dinov2":
        return T.Dinov2Model, T.Dinov2Config(hidden_size=spec.hidden, num_hidden_layers=spec.depth,
                                             num_attention_heads=spec.heads, patch_size=spec.patch,
                                             image_size=spec.grid * spec.patch)
    vision = dict(hidden_size=spec.hidden, intermediate_size=spec.mlp, num_hidden_layers=spec.depth,
                  num_attention_heads=spec.heads, patch_size=spec.patch, image_size=spec.grid * spec.patch)
    if family == "clip":
        return T.CLIPModel, T.CLIPConfig(vision_config=vision, projection_dim=spec.projection)
    return T.SiglipModel, T.SiglipConfig(vision_config=vision)


def side_prepare(directory: str) -> dict[str, Any]:
    """Writes each model's random-weight checkpoint (save_pretrained: the published layout) once."""
    import torch

    torch.manual_seed(0)
    for family, model, *_ in MODELS:
        cls, config = _hf_model(family, model)
        cls(config).eval().save_pretrained(Path(directory) / f"{family}-{model}")
    return {"times": {}}


def side_ours(reps: int, batch: int, family: str, model: str, pooling: str, directory: str) -> dict[str, Any]:
    import jax

    from cbir_jax.backbones import build_backbone
    from cbir_jax.core.config import BackboneConfig, preset

    cfg = dataclasses.replace(preset("backbone", family, BackboneConfig), model=model, pooling=pooling,
                              weights=str(Path(directory) / f"{family}-{model}" / "model.safetensors"))
    backbone = build_backbone(cfg, cache_dir=directory)
    x = jax.device_put(_batch(batch))
    fn = lambda: backbone.forward(x).block_until_ready()  # noqa: E731
    return {"times": {"forward": times(fn, reps)}, "arrays": {"features": np.asarray(fn())},
            "info": {"config": f"jax {jax.__version__}, {jax.default_backend()}"}}


def side_torch(reps: int, batch: int, family: str, model: str, pooling: str, directory: str, mode: str) -> dict[str, Any]:
    import torch
    import transformers as T

    torch.set_num_threads(os.cpu_count() or 1)
    cls = {"dinov2": T.Dinov2Model, "clip": T.CLIPModel, "siglip": T.SiglipModel}[family]
    net = cls.from_pretrained(Path(directory) / f"{family}-{model}", attn_implementation="sdpa").eval()
    x = torch.from_numpy(_batch(batch)).permute(0, 3, 1, 2).contiguous()

    def feature(pixels):
        if family == "dinov2":
            return net(pixels).pooler_output  # the class token after the final LayerNorm (pooling=cls)
        out = net.vision_model(pixels)
        return net.visual_projection(out.pooler_output) if family == "clip" else out.pooler_output

    run = torch.compile(feature) if mode == "compiled" else feature

    def forward() -> np.ndarray:
        with torch.inference_mode():
            return run(x).numpy()

    return {"times": {"forward": times(forward, reps)}, "arrays": {"features": forward()},
            "info": {"config": f"torch {torch.__version__}, transformers {T.__version__}, sdpa, inference_mode, "
                               f"{mode}, {torch.get_num_threads()} threads"}}


def run(quick: bool) -> list[dict]:
    """One row per model: images/s of ours and of the torch reference in its faster mode."""
    reps, rounds = (2, 1) if quick else (3, 2)
    try:
        import torch  # noqa: F401
        import transformers  # noqa: F401
    except ImportError:
        return [table.row(f"feature extraction ({f} {m})", "images/s", "torch reference",
                          note="not run: needs the [reference] extra (torch, transformers) to write its random-weight checkpoint")
                for f, m, *_ in MODELS]
    rows = []
    with tempfile.TemporaryDirectory() as directory:
        alternate([Side("prepare", "benchmarks.vit_extraction:side_prepare", {"directory": directory})], 1)
        for family, model, pooling, full_batch, quick_batch in MODELS:
            batch = quick_batch if quick else full_batch
            job = f"feature extraction ({family} {model}, pooling={pooling}, 224px, batch {batch}, random weights)"
            kw = {"reps": reps, "batch": batch, "family": family, "model": model, "pooling": pooling, "directory": directory}
            sides = [Side("ours", "benchmarks.vit_extraction:side_ours", kw, peer=False)]
            sides += [Side(mode, "benchmarks.vit_extraction:side_torch", {**kw, "mode": mode}) for mode in PEER_MODES]
            res = alternate(sides, rounds)
            ours = res["ours"]
            won = min(PEER_MODES, key=lambda mode: res[mode].best("forward"))
            peer = res[won]
            err = float(np.max(np.abs(ours.arrays["features"] - peer.arrays["features"])))
            each = ", ".join(f"{mode} best {batch / res[mode].best('forward'):.2f}" for mode in PEER_MODES)
            rows.append(table.rate_row(
                job, "images/s", f"torch reference, {won} (won; {each} img/s): {peer.info['config']}", batch, ours,
                peer, "forward", note=f"max |ours - torch| = {err:.1e}; {ours.processes}+{peer.processes} processes × {reps} reps"))
    return rows


def main() -> None:
    import datetime
    import os as _os
    import time

    from benchmarks.run import RESULTS, machine

    parser = argparse.ArgumentParser(description="DINOv2 / CLIP / SigLIP extraction throughput")
    parser.add_argument("--quick", action="store_true", help="smaller batches, one round")
    parser.add_argument("--write", action="store_true", help="also write benchmarks/results/vit-extraction-<date>.md")
    args = parser.parse_args()
    load0, start = _os.getloadavg()[0], time.time()
    rows = run(args.quick)
    load1, seconds = _os.getloadavg()[0], time.time() - start
    out = [f"# ViT feature extraction {datetime.date.today()}{' (quick)' if args.quick else ''}", "",
           f"Machine: {machine()}. No GPU: this run had none, so there is no bfloat16 / flash-attention row "
           "(none was simulated).", "",
           f"Load: 1-minute load average {load0:.1f} at the start and {load1:.1f} at the end ({_os.cpu_count()} cores, "
           "shared with other jobs); ours and each peer alternate in fresh processes, so load falls on both as spread.", "",
           f"Command: `python -m benchmarks.vit_extraction{' --quick' if args.quick else ''} --write` ({seconds / 60:.1f} min).", "",
           *table.markdown(rows), "",
           "Rates: images/s (higher is better) of the forward pass to the pooled feature, preprocessing excluded; "
           "best = fastest repetition over all processes, median of all repetitions; ours ÷ peer = ratio of the bests."]
    text = "\n".join(out) + "\n"
    print(text)
    if args.write:
        name = f"vit-extraction-{datetime.date.today()}{'-quick' if args.quick else ''}.md"
        (RESULTS / name).write_text(text)


if __name__ == "__main__":
    main()
