"""Shared plumbing of the entry points: known errors become one line on stderr, not a stack trace."""

from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Callable, TypeVar

from omegaconf import DictConfig, OmegaConf

from cbir_jax.checkpointing import CheckpointError
from cbir_jax.config import Config
from cbir_jax.data import DataError, ImageLoadError
from cbir_jax.registry import UnknownComponentError

T = TypeVar("T")
USER_ERRORS = (DataError, CheckpointError, UnknownComponentError, ImageLoadError, FileNotFoundError)
log = logging.getLogger("cbir_jax")


def run_or_exit(fn: Callable[[], T]) -> T:
    """Runs an entry point; a user error (bad path, bad data, bad checkpoint) exits 2 with one line."""
    # Orbax narrates every save at INFO through absl; keep the run log about the run.
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        return fn()
    except USER_ERRORS as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def to_typed(cfg: DictConfig) -> Config:
    """The composed config as the typed `Config` dataclass (validated once more)."""
    merged = OmegaConf.merge(OmegaConf.structured(Config), cfg)
    return OmegaConf.to_object(merged)


def run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)
