"""The stages every entry point shares: images -> cached features -> split -> post-processed arrays."""

from __future__ import annotations

import dataclasses
import logging

import numpy as np

from cbir_jax.features import postprocess
from cbir_jax.backbones import Backbone, build_backbone
from cbir_jax.data import build_dataset
from cbir_jax.features.extract import FeatureSet, extract_features
from cbir_jax.data.splits import Split, make_split

log = logging.getLogger(__name__)


@dataclasses.dataclass
class Stage:
    backbone: Backbone
    features: FeatureSet
    split: Split


def load_stage(cfg, *, split_by: str | None = None) -> Stage:
    """Builds dataset and backbone, extracts (or loads cached) features and splits them."""
    dataset = build_dataset(cfg.data)
    backbone = build_backbone(cfg.backbone, cfg.cache_dir)
    features = extract_features(
        dataset,
        backbone,
        thumb_size=cfg.labels.image_size,
        cache_dir=cfg.cache_dir,
        batch_size=cfg.backbone.batch_size,
        use_cache=cfg.features.cache,
        storage=str(cfg.features.storage),
        shard_rows=cfg.features.shard_rows,
        store=cfg.features.store,
        workers=cfg.data.workers,
        decode_timeout_s=cfg.data.decode_timeout_s,
    )
    split_cfg = cfg.data.split if split_by is None else dataclasses.replace(_as_split(cfg.data.split), by=split_by)
    split = make_split(split_cfg, len(features), lambda: features.labels)
    log.info(
        "%s: %d images, %s features of size %d; split by %s: %d train, %d queries, %d gallery",
        dataset.name, len(features), backbone.name, backbone.feature_dim, split_cfg.by,
        len(split.train), len(split.query), len(split.gallery),
    )
    return Stage(backbone=backbone, features=features, split=split)


def _as_split(split_cfg):
    from cbir_jax.core.config import SplitConfig

    return SplitConfig(**{f.name: getattr(split_cfg, f.name) for f in dataclasses.fields(SplitConfig)})


def as_gallery(cfg, features: np.ndarray) -> np.ndarray:
    """Features post-processed as a gallery of their own (fitted on themselves): how training, validation
    and diagnostics see a set of rows, and what evaluation does with its gallery."""
    return postprocessed(cfg, features, fit_on=features)


def postprocessed(cfg, features: np.ndarray, fit_on: np.ndarray) -> np.ndarray:
    """Applies the post-processing fitted on `fit_on` (the gallery being searched) to `features`."""
    return postprocess.apply(postprocess.fit(cfg.features, fit_on), features)
