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


@pytest.mark.parametrize(
    "override, valid",
    [
        ("loss.name=msee", "mse"),
        ("train.optimizer=adamx", "adamw"),
        ("head.base=cosin", "ssim_ratio"),
        ("eval.baselines=[cosine,cosin]", "dba_alpha_qe"),
        ("eval.tuned_baselines=[dba]", "diffusion"),
        ("serve.scorers=[cosin]", "alpha_qe"),
    ],
)
def test_a_misspelled_choice_fails_at_compose_time_listing_the_valid_ones(override, valid):
    """Closed choices are enums in the schema: a typo fails before any work, and the message names the
    valid values (not after a whole training run, as a plain string would)."""
    with pytest.raises(ConfigCompositionException) as e:
        compose_config(override)
    message = str(e.value) + str(e.value.__cause__)
    assert "Invalid value" in message and valid in message


def test_every_choice_enum_is_exactly_its_registry():
    """The schema's enums and the registries that build the components list the same names."""
    from cbir_jax.core import config
    from cbir_jax.scoring import heads, rerank
    from cbir_jax.scoring.baselines import baseline_names
    from cbir_jax.training import losses, metrics_log, optim

    assert set(config.LossName) == set(losses.LOSSES.names())
    assert set(config.Optimizer) == set(optim.OPTIMIZERS.names())
    assert set(config.FixedMetric) == set(heads.FIXED_METRICS)
    assert set(config.TunedBaseline) == set(rerank.RERANKERS.names())
    assert set(config.Baseline) == set(baseline_names())
    assert set(config.LoggerName) == set(metrics_log.LOGGERS.names())
