"""`python -m cbir_jax.extract data=folder data.root=DIR [backbone=...] [features.store=DIR]`

Extracts (or brings up to date) the feature store of a collection, without training anything: only images
the store lacks are extracted, rows of deleted or changed files leave it, and a killed run resumes where it
stopped. The store is what `train`, `evaluate`, `search` and `index` read afterwards (same `cache_dir`, or
`features.store=DIR`). On a cluster, each process extracts its share of the shards (docs/scale.md).

Examples:
  python -m cbir_jax.extract data=folder data.root=photos backbone=efficientnet_lite0
  python -m cbir_jax.extract data=folder data.root=photos features.store=photos.store features.storage=float16
  python -m cbir_jax.extract data=folder data.root=photos features.store=/shared/photos.store \\
      features.distributed=true hydra/launcher=slurm -m          # one process per task (docs/scale.md)
"""

from __future__ import annotations

import hydra
from omegaconf import DictConfig

from cbir_jax.core.config import CONFIG_DIR
from cbir_jax.runs.cli import run_or_exit, to_typed


def extract(cfg_dict: DictConfig):
    """Builds or updates the store `cfg` names; returns (store path, UpdateReport, images in the store)."""
    import jax

    from cbir_jax.backbones import build_backbone
    from cbir_jax.data import build_dataset
    from cbir_jax.features.extract import store_path
    from cbir_jax.features.store import FeatureStore, build_store, jax_barrier

    cfg = to_typed(cfg_dict)
    f = cfg.features
    if f.distributed:
        jax.distributed.initialize(coordinator_address=f.coordinator, num_processes=f.num_processes,
                                   process_id=f.process_id)
    dataset = build_dataset(cfg.data)
    backbone = build_backbone(cfg.backbone, cfg.cache_dir)
    path = f.store or store_path(cfg.cache_dir, dataset, backbone, str(f.storage))
    report = build_store(path, dataset, backbone, storage=str(f.storage), shard_rows=f.shard_rows,
                         batch_size=cfg.backbone.batch_size, workers=cfg.data.workers,
                         decode_timeout_s=cfg.data.decode_timeout_s, process_index=jax.process_index(),
                         process_count=jax.process_count(), barrier=jax_barrier(f.barrier_timeout_s))
    return path, report, len(FeatureStore.open(path, fingerprint=backbone.fingerprint))


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    path, report, images = run_or_exit(lambda: extract(cfg))  # the summary line is logged by build_store
    print(f"outputs: {path} ({images} images, {len(report.skipped)} skipped)", flush=True)


if __name__ == "__main__":
    main()
