"""Shared plumbing of the entry points: known errors become one line on stderr, not a stack trace."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path
from typing import Callable, TypeVar

from omegaconf import DictConfig, OmegaConf

from cbir_jax.checkpointing import CheckpointError
from cbir_jax.config import Config
from cbir_jax.data import DataError, ImageLoadError
from cbir_jax.registry import UnknownComponentError

T = TypeVar("T")
# What a user's input can cause: a bad path, file, checkpoint or value. Each module raises these with a
# one-line message; ValueError covers the rest (e.g. a corrupt or unsafe weights file).
USER_ERRORS = (DataError, CheckpointError, UnknownComponentError, ImageLoadError, FileNotFoundError, ValueError)
log = logging.getLogger("cbir_jax")


def run_or_exit(fn: Callable[[], T]) -> T:
    """Runs an entry point; a user error (bad path, bad data, bad checkpoint) exits 2 with one line.

    CBIR_JAX_DEBUG=1 re-raises instead, with the full traceback.
    """
    # Orbax narrates every save at INFO through absl; keep the run log about the run.
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        return fn()
    except USER_ERRORS as e:
        if os.environ.get("CBIR_JAX_DEBUG"):
            raise
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)


def to_typed(cfg: DictConfig) -> Config:
    """The composed config as the typed `Config` dataclass (validated once more)."""
    merged = OmegaConf.merge(OmegaConf.structured(Config), cfg)
    return OmegaConf.to_object(merged)


def run_dir() -> Path:
    from hydra.core.hydra_config import HydraConfig

    return Path(HydraConfig.get().runtime.output_dir)
