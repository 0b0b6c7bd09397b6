"""Config composition: every group option composes, and mistakes fail at start with Hydra's message."""

import subprocess
import sys
from pathlib import Path

import pytest
from hydra.errors import ConfigCompositionException
from omegaconf.errors import ConfigKeyError, ValidationError

from cbir_jax.runs.cli import to_typed
from cbir_jax.core.config import CONFIG_DIR

from helpers import compose_config

GROUPS = ["data", "backbone", "labels", "head", "pairs", "loss", "train"]


@pytest.mark.parametrize("group", GROUPS)
def test_every_option_composes(group):
    for option in sorted(p.stem for p in (Path(CONFIG_DIR) / group).glob("*.yaml")):
        cfg = to_typed(compose_config(f"{group}={option}", fast=False))
        assert getattr(cfg, group) is not None


def test_defaults_are_the_main_job():
    cfg = to_typed(compose_config(fast=False))
    assert (cfg.data.name, cfg.backbone.name, cfg.head.name, cfg.labels.name) == (
        "embedded", "efficientnet_lite0", "mlp", "ssim_ratio")
    assert cfg.train.epochs == 5  # as the seed


@pytest.mark.parametrize(
    "override, error",
    [
        ("head=mlpp", ConfigCompositionException),  # unknown option of a group
        ("train.epochz=3", ConfigCompositionException),  # typo in a key
        ("train.epochs=many", ConfigCompositionException),  # wrong type
    ],
)
def test_mistakes_fail_at_compose_time(override, error):
    with pytest.raises((error, ConfigKeyError, ValidationError)):
        to_typed(compose_config(override))


def test_cli_typo_is_hydras_one_message(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "cbir_jax.train", "head=mlpp", f"hydra.run.dir={tmp_path}"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode != 0
    assert "Could not find 'head/mlpp'" in out.stderr and "Traceback" not in out.stderr
