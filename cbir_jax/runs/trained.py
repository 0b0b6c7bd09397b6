"""A finished training run as something to score with: its saved config, model facts and restored scorer.

`evaluate`, `search`, `diagnose`, `serve` and the Python API (`cbir_jax.load_run`) all read runs through here.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from pathlib import Path
from typing import Any

import jax
import yaml
from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from cbir_jax.core.errors import CheckpointError
from cbir_jax.backbones import Backbone, build_backbone
from cbir_jax.core.config import Config, Select, default_cache_dir
from cbir_jax.core.config_checks import validate
from cbir_jax.features.stage import Stage
from cbir_jax.scoring import heads
from cbir_jax.scoring.compose import head_scorer
from cbir_jax.scoring.scorers import Scorer
from cbir_jax.training import checkpointing, rerank_training

log = logging.getLogger(__name__)

# Keys always taken from today's command line, not from the training run.
_RUNTIME_KEYS = ("eval", "cache_dir", "query", "k", "checkpoint", "out", "index")


def load_trained(run: Path, cfg_now: DictConfig, overridden: frozenset[str] = frozenset()) -> tuple[Config, dict[str, Any]]:
    """The training run's saved config, with the top-level keys the user set today (e.g. `data`) replaced."""
    saved_path = run / ".hydra" / "config.yaml"
    if not saved_path.exists():
        raise CheckpointError(f"checkpoint={run}: no .hydra/config.yaml; not a cbir_jax run directory")
    info = checkpointing.read_model_info(run)
    try:
        saved = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(saved_path))
        for key in set(_RUNTIME_KEYS) | set(overridden):
            saved[key] = cfg_now[key]
        typed = OmegaConf.to_object(saved)
    except (OmegaConfBaseException, yaml.YAMLError, UnicodeDecodeError) as e:
        first = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
        raise CheckpointError(f"{saved_path} is damaged ({first})") from None
    return validate(typed), info


def check_backbone(run: Path, info: dict[str, Any], backbone: Backbone) -> None:
    """A pair head reads feature directions: it scores only features of the backbone it was trained on."""
    if info["backbone_fingerprint"] != backbone.fingerprint:
        raise CheckpointError(
            f"checkpoint={run} was trained on {info['backbone']} features "
            f"(size {info['backbone_feature_dim']}), not on {backbone.name} (size {backbone.feature_dim})"
        )


def restored_head(cfg: Config, run: Path, info: dict[str, Any], backbone: Backbone | Stage) -> tuple[Any, Any]:
    """The run's head and its restored parameters (the `eval.select` checkpoint); checks the features match
    what it was trained on."""
    check_backbone(run, info, backbone.backbone if isinstance(backbone, Stage) else backbone)
    head = heads.build_head(cfg.head)
    dim = int(info["feature_dim"])
    params = {}
    if heads.is_learned(cfg.head.name):
        like = heads.init_params(head, dim, jax.random.key(0))
        which = checkpointing.resolve(run, cfg.eval.select)
        if which != cfg.eval.select:
            log.info("checkpoint=%s has no validation (best) checkpoint; evaluating its last one", run)
        params = checkpointing.restore_params(run, like, which)
    return head, params


def trained_scorer(cfg: Config, run: Path, info: dict[str, Any], backbone: Backbone | Stage) -> Scorer:
    """The run's head with its restored parameters, as evaluation scores it (on features of `backbone`, or
    of the stage's backbone)."""
    if cfg.head.name == "learned_rerank":  # not a pair head: its own model and checkpoint layout
        return rerank_training.restore_scorer(cfg, run, info, cfg.head.name)
    head, params = restored_head(cfg, run, info, backbone)
    return head_scorer(cfg.head, head, params)


@dataclasses.dataclass(frozen=True)
class Run:
    """A finished training run, ready to score with outside Hydra: what `cbir_jax.load_run` returns.

    `config` is the run's saved config (its backbone, post-processing `config.features` and head), `info`
    its `model.json`, `scorer` the restored learned scorer. The scorer expects gallery and queries
    post-processed by `config.features` fitted on the gallery, as evaluation does (`cbir_jax.Index` does it).
    """

    path: Path
    config: Config
    info: dict[str, Any]
    backbone: Backbone
    scorer: Scorer

    @property
    def head(self) -> str:
        return self.config.head.name

    def __repr__(self) -> str:
        """One line: the generated repr printed every weight array (318 KB for an MLP head)."""
        return (f"Run({str(self.path)!r}, head={self.head}, backbone={self.backbone.name}, "
                f"features={self.info.get('feature_dim', '?')}-d, select={self.config.eval.select})")


def load_run(path: str | os.PathLike, *, select: str = "best", cache_dir: str | None = None) -> Run:
    """Reads a finished run folder (`outputs/runs/<date>/<time>`): config, model facts, backbone and scorer.

    `select`: `best` (the best-on-validation parameters; the last ones where the run had no validation) or
    `last`. A folder that is not a finished run, or a checkpoint that does not fit, is a one-line error.
    """
    run = Path(path)
    now = OmegaConf.structured(Config(checkpoint=str(run), cache_dir=cache_dir or default_cache_dir()))
    now.eval.select = Select(select)
    cfg, info = load_trained(run, now)
    backbone = build_backbone(cfg.backbone, cfg.cache_dir)
    return Run(path=run, config=cfg, info=info, backbone=backbone, scorer=trained_scorer(cfg, run, info, backbone))
