"""Composing configs the way the entry points do, for tests."""

from hydra import compose, initialize_config_dir
from omegaconf import DictConfig

from cbir_jax.core.config import CONFIG_DIR

# Small enough to train and evaluate in seconds; real photos (data=embedded), real code paths.
FAST = [
    "backbone=pixels",
    "backbone.image_size=16",
    "data.views_per_image=4",
    "pairs.pairs_per_epoch=512",
    "train.batch_size=64",
    "train.epochs=2",
    "train.warmup_steps=2",
    "train.checkpoint_every=5",
    "head.hidden=[32]",
    "labels.image_size=32",
    "eval.figure=false",
]


def compose_config(*overrides: str, fast: bool = True) -> DictConfig:
    with initialize_config_dir(config_dir=CONFIG_DIR, version_base="1.3"):
        return compose("config", overrides=(FAST if fast else []) + list(overrides))
