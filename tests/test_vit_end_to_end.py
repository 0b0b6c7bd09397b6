"""`backbone=dinov2` (and clip, siglip) through every command, with a checkpoint the test writes.

The checkpoint is random tensors under the published DINOv2 key names for the 2-block test architecture
(`backbone.model=tiny`), written with `safetensors` (no torch), so this runs without the [reference] extra
and downloads nothing.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from cbir_jax.backbones import clip
from cbir_jax.backbones import dinov2
from cbir_jax.backbones import vit
from helpers import FAST, compose_config

PROJECT = Path(__file__).resolve().parents[1]
# FAST without its backbone: the tiny DINOv2 at 56 px (4x4 patches) instead.
COMMON = [o for o in FAST if not o.startswith("backbone")] + ["data.views_per_image=2"]


def write_checkpoint(family: vit.Family, model: str, path: Path, seed: int = 0) -> str:
    """Random tensors with the published key names and shapes of `family`'s `model`."""
    from safetensors.numpy import save_file

    rng = np.random.default_rng(seed)
    tensors = {e.key: (rng.standard_normal(e.shape) * 0.1).astype(np.float32) for e in family.entries(family.models[model].spec)}
    if family is dinov2.FAMILY:
        tensors["embeddings.mask_token"] = np.zeros((1, family.models[model].spec.hidden), np.float32)
    save_file(tensors, str(path), metadata={"format": "pt"})
    return str(path)


def _run(*args: str, cwd: Path = PROJECT) -> subprocess.CompletedProcess:
    out = subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300, cwd=cwd,
                         env={**os.environ, "HF_HUB_OFFLINE": "1"})
    assert out.returncode == 0, out.stderr[-3000:]
    return out


@pytest.mark.slow
def test_dinov2_through_train_evaluate_search_index_and_serve(tmp_path):
    weights = write_checkpoint(dinov2.FAMILY, "tiny", tmp_path / "model.safetensors")
    backbone = ["backbone=dinov2", "backbone.model=tiny", "backbone.image_size=56", f"backbone.weights={weights}"]
    cache = f"cache_dir={tmp_path / 'cache'}"
    run = tmp_path / "run"
    _run("cbir_jax.train", *backbone, "head=mlp", "labels=ssim_ratio", f"hydra.run.dir={run}", cache, *COMMON)
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics and (run / ".hydra" / "config.yaml").exists()
    out = _run("cbir_jax.evaluate", f"checkpoint={run}", cache)
    assert "| mlp |" in out.stdout and "| cosine |" in out.stdout
    query = tmp_path / "query.png"
    Image.fromarray((np.random.default_rng(1).random((70, 90, 3)) * 255).astype(np.uint8)).save(query)
    out = _run("cbir_jax.search", f"checkpoint={run}", f"query={query}", "k=3", cache)
    assert len(list((run / "search").iterdir())) == 1
    photos = tmp_path / "photos"
    for category, seed in (("a", 2), ("b", 3)):
        (photos / category).mkdir(parents=True)
        for i in range(3):
            pixels = (np.random.default_rng(seed * 10 + i).random((60 + i, 80, 3)) * 255).astype(np.uint8)
            Image.fromarray(pixels).save(photos / category / f"{i}.png")
    index_file = tmp_path / "photos.index"
    out = _run("cbir_jax.index", "data=folder", f"data.root={photos}", f"out={index_file}", f"checkpoint={run}",
               cache, f"hydra.run.dir={tmp_path / 'index-logs'}")
    assert out.stdout.strip().splitlines()[-1].startswith(f"outputs: {index_file} (6 images")
    out = _run("cbir_jax.search", f"index={index_file}", f"query={photos / 'a' / '0.png'}", "k=2",
               f"hydra.run.dir={tmp_path / 'search-index'}")
    assert out.stdout.strip().splitlines()[1].split()[2] == "a/0.png"  # an indexed image finds itself first
    _serve_answers(tmp_path, *backbone, "data.views_per_image=2", cache)


def _serve_answers(tmp_path: Path, *overrides: str) -> None:
    """`python -m cbir_jax.serve` with the backbone starts and lists its gallery."""
    pytest.importorskip("fastapi", reason="the [serve] extra is not installed")
    cmd = [sys.executable, "-m", "cbir_jax.serve", *overrides, "serve.port=0", f"hydra.run.dir={tmp_path / 'serve'}"]
    log = tmp_path / "serve.log"
    with log.open("w") as err:
        proc = subprocess.Popen(cmd, cwd=PROJECT, stdout=subprocess.PIPE, stderr=err, text=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
    try:
        line = ""
        for line in proc.stdout:
            if line.startswith("search page: "):
                break
        assert line.startswith("search page: "), f"the page did not start: {log.read_text()[-2000:]}"
        with urllib.request.urlopen(line.split()[2].rstrip("/") + "/api/gallery", timeout=60) as response:
            body = json.loads(response.read())
        assert body["size"] == 42
    finally:
        proc.terminate()
        proc.wait(30)


@pytest.mark.slow
@pytest.mark.parametrize("family, size", [(clip.CLIP, 64), (clip.SIGLIP, 64)], ids=["clip", "siglip"])
def test_clip_and_siglip_train_end_to_end(family, size, tmp_path, monkeypatch):
    """The main job's `train` in this process (the command line itself is the DINOv2 test's): extraction with
    the backbone, training, checkpoints."""
    from omegaconf import OmegaConf

    from cbir_jax.runs.cli import to_typed
    from cbir_jax.train import train

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    weights = write_checkpoint(family, "tiny", tmp_path / "model.safetensors")
    run = tmp_path / "run"
    cfg = compose_config(f"backbone={family.name}", "backbone.model=tiny", f"backbone.image_size={size}",
                         f"backbone.weights={weights}", "head=mlp", "labels=ssim_ratio", "train.evaluate=false",
                         f"cache_dir={tmp_path / 'cache'}", *COMMON, fast=False)
    (run / ".hydra").mkdir(parents=True)
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")  # what Hydra writes for a real run
    train(to_typed(cfg), run)
    assert (run / "metrics.jsonl").read_text().strip() and any((run / "checkpoints").iterdir())
