"""`python -m cbir_jax.index data=folder data.root=DIR out=FOLDER [backbone=...] [checkpoint=RUN] [faiss=FACTORY]`

Indexes a folder into one index folder (`cbir_jax/api/store.py`), or brings an existing one up to date in
place: only files it lacks are extracted, rows of files that left the folder or changed are removed, a
killed run resumes where it stopped; it prints what it added, removed and kept. `python -m cbir_jax.search
index=FOLDER query=IMAGE` then ranks against it without extracting the gallery again (from disk, chunk by
chunk, when it is large). The scorer is the run's learned one with `checkpoint=`, else `head=` when it names
a fixed metric (default: cosine). `faiss=FACTORY` also writes `FOLDER/faiss.index`, a trained faiss index
(`IVF1024,PQ32` ...) for galleries where exact ranking is too slow. Hydra's record of the command (`.hydra/`,
`index.log`) goes to `outputs/index/<date>/<time>/` (`RUN/index/<date>_<time>/` with a checkpoint); the
last line names both.

Examples:
  python -m cbir_jax.index data=folder data.root=photos out=photos.index
  python -m cbir_jax.index data=folder data.root=photos out=photos.index      # again, after adding photos
  python -m cbir_jax.index data=folder data.root=photos out=photos.index checkpoint=outputs/runs/<date>/<time>
  python -m cbir_jax.index data=folder data.root=photos out=photos.index "faiss='IVF1024,PQ32'"  # quoted: a comma
  python -m cbir_jax.search index=photos.index query=photo.jpg k=10
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
import hydra
import numpy as np
from omegaconf import DictConfig

from cbir_jax.core.config import CONFIG_DIR
from cbir_jax.runs.cli import overridden_keys, run_dir, run_or_exit, to_typed, written

log = logging.getLogger(__name__)


def index(cfg_dict: DictConfig, overridden: frozenset[str] = frozenset()):
    """Builds or updates the index folder `out` from `data.root`; returns (path, Index, UpdateReport)."""
    from cbir_jax.api import store
    from cbir_jax.api.index import Index, _choose_scorer, _plain
    from cbir_jax.backbones import build_backbone
    from cbir_jax.core.errors import CheckpointError
    from cbir_jax.data import DataError, build_dataset
    from cbir_jax.features import postprocess
    from cbir_jax.features.store import FeatureStore, build_store
    from cbir_jax.runs.trained import load_run
    from cbir_jax.scoring import heads

    cfg = to_typed(cfg_dict)
    if not cfg.out:
        raise DataError("index needs out=FOLDER (where the index is written, or updated when it exists)")
    if cfg.data.name != "folder":
        raise DataError(f"index reads a folder: pass data=folder data.root=DIR (not data={cfg.data.name})")
    out = Path(os.path.expanduser(cfg.out))
    if out.is_file():
        raise store.IndexFileError(f"out={out} is a version-1 index file: write the new index to another folder "
                                   "(out=NEW), or convert it with cbir_jax.Index.load(OLD).save(NEW)")
    run = None
    if cfg.checkpoint:
        run = load_run(cfg.checkpoint, select=cfg.eval.select, cache_dir=cfg.cache_dir)
        backbone_cfg, net, name = run.config.backbone, run.backbone, (cfg.head.name if "head" in overridden else None)
        features = cfg.features if "features" in overridden else run.config.features
    else:
        if "head" in overridden and heads.is_learned(cfg.head.name):
            raise CheckpointError(
                f"head={cfg.head.name} is learned: pass checkpoint=RUN_DIR (or a fixed head, e.g. head=cosine)")
        backbone_cfg, name, features = cfg.backbone, (cfg.head.name if "head" in overridden else "cosine"), cfg.features
        net = build_backbone(backbone_cfg, cfg.cache_dir)
    chosen = _choose_scorer(name, run)  # before extraction: a wrong name fails at once
    if cfg.faiss:  # likewise a faiss string faiss cannot build
        from cbir_jax.api.faiss_export import factory_index

        factory_index(cfg.faiss, net.feature_dim)
    dataset = build_dataset(cfg.data)
    out.mkdir(parents=True, exist_ok=True)
    report = build_store(out / store.FEATURES, dataset, net, storage=str(features.storage),
                         shard_rows=features.shard_rows, batch_size=backbone_cfg.batch_size,
                         workers=cfg.data.workers, decode_timeout_s=cfg.data.decode_timeout_s)
    fs = FeatureStore.open(out / store.FEATURES, fingerprint=net.fingerprint)
    position = {i: r for r, i in enumerate(dataset.ids)}
    labels = None
    if dataset.labels is not None:
        labels = np.asarray([dataset.labels[position[i]] for i in fs.ids], np.int32)
    learned = run is not None and chosen is run.scorer
    stored = store.Stored(
        features=fs,
        paths=[it.path if it.path is not None else it.id for it in fs.items],
        labels=labels,
        class_names=list(dataset.class_names),
        root=str(Path(os.path.expanduser(cfg.data.root)).resolve()),
        backbone=net.name,
        backbone_fingerprint=net.fingerprint,
        backbone_config=_plain(backbone_cfg),
        features_config=_plain(features),
        post=postprocess.fit(features, None if features.whiten == "none" else fs.features()),
        scorer=chosen.name,
        run=str(run.path) if learned else "",
        run_select=str(run.config.eval.select) if learned else "",
        skipped=[*dataset.skipped, *report.skipped],
    )
    store.save(stored, out)
    if not Path(stored.root).is_relative_to(out.absolute().parent.resolve()):
        log.warning("the images folder %s lies outside the index's folder %s: search and serve will need "
                    "index_root=%s (an index is trusted to open files only under its own folder)",
                    stored.root, out.absolute().parent, stored.root)
    built = Index.load(out, root=stored.root)
    if cfg.faiss:
        built.save_faiss(out / "faiss.index", factory=cfg.faiss)
    return out, built, report


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> None:
    path, built, report = run_or_exit(lambda: index(cfg, overridden_keys()))
    summary = (f"{len(built)} images, {len(built.skipped)} skipped, scorer {built.scorer_name}; "
               f"added {report.added}, removed {report.removed}, kept {report.kept}")
    logs = run_dir()  # Hydra's record of the command (.hydra/, index.log): named too, not left unsaid
    print(f"outputs: {path} ({summary}); {logs}/ ({', '.join(written(logs)) or 'nothing written'})", flush=True)


if __name__ == "__main__":
    main()
