"""`python -m cbir_jax.evaluate [checkpoint=RUN_DIR] [data=folder data.root=DIR]`

Compares the trained head (if a checkpoint is given) with the fixed metrics and re-rankers on the same
queries and gallery; prints one table and writes `metrics.json` ({scorer: {metric: value}}).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import hydra
import jax
import numpy as np
from omegaconf import DictConfig, OmegaConf

from cbir_jax import checkpointing, figures, heads, postprocess, scorers, tuning
from cbir_jax.cli import run_dir, run_or_exit, to_typed
from cbir_jax.config import CONFIG_DIR, Config
from cbir_jax.data import DataError
from cbir_jax.config_checks import validate
from cbir_jax.evaluation import check_evaluable, evaluate_scorer, format_table
from cbir_jax.files import atomic_write_text
from cbir_jax.pipeline import Stage, load_stage
from cbir_jax.registry import UnknownComponentError

log = logging.getLogger(__name__)


def baseline_scorer(name: str) -> scorers.Scorer:
    """A fixed metric or a non-learned re-ranker, by name."""
    if name in heads.FIXED_METRICS:
        return scorers.fixed_scorer(name)
    from cbir_jax import rerank

    if name in rerank.RERANKERS:
        return rerank.build_reranker(name)
    valid = sorted(heads.FIXED_METRICS) + rerank.RERANKERS.names()
    raise UnknownComponentError(f"unknown baseline {name!r} in eval.baselines; valid: {', '.join(valid)}")


def evaluate_stage(
    cfg: Config, stage: Stage, learned: dict[str, scorers.Scorer], out_dir: Path
) -> dict[str, dict[str, float]]:
    """Evaluates learned scorers and the configured baselines on the stage's queries and gallery."""
    fs, split = stage.features, stage.split
    labels = fs.labels
    if labels is None:
        raise DataError(f"{fs.dataset.name}: no class labels (a flat folder); it is searchable but not evaluable")
    check_evaluable(labels[split.query], labels[split.gallery], split.self_index, fs.dataset.name)
    post = postprocess.fit(cfg.features, fs.features[split.gallery])
    gallery, queries = postprocess.apply(post, fs.features[split.gallery]), postprocess.apply(post, fs.features[split.query])
    all_scorers = dict(learned)
    for name in cfg.eval.baselines:
        if name not in all_scorers:
            all_scorers[name] = baseline_scorer(name)
    if cfg.eval.tuned_baselines:
        if len(split.val) == 0:
            raise DataError("eval.tuned_baselines needs validation rows: set data.split.val_fraction > 0")
        val = postprocess.apply(postprocess.fit(cfg.features, fs.features[split.val]), fs.features[split.val])
        for name in cfg.eval.tuned_baselines:
            scorer = tuning.tuned_scorer(name, val, labels[split.val], cfg.cache_dir)
            all_scorers[scorer.name] = scorer
    results: dict[str, dict[str, float]] = {}
    per_query: dict[str, np.ndarray] = {}
    for name, scorer in all_scorers.items():
        values: dict[str, np.ndarray] = {}
        results[name] = evaluate_scorer(
            scorer, queries, gallery, labels[split.query], labels[split.gallery], split.self_index,
            query_chunk=cfg.eval.query_chunk, gallery_chunk=cfg.eval.gallery_chunk, per_query=values,
        )
        per_query[name] = values["map_at_r"]
    table = format_table(results, title=f"{fs.dataset.name} · {stage.backbone.name} · {len(split.query)} queries × {len(split.gallery)} gallery")
    print(table, flush=True)
    out_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out_dir / "metrics.json", json.dumps(results, indent=2))
    atomic_write_text(out_dir / "metrics.md", table + "\n")
    # Per-query MAP@R of every scorer, same query order: paired comparisons (cbir_jax.significance).
    np.savez(out_dir / "per_query.npz", **{name: v for name, v in per_query.items()})
    if cfg.eval.figure:
        _figure(cfg, stage, all_scorers, queries, gallery, labels, out_dir / "topk.png")
    return results


def _figure(cfg, stage, all_scorers, queries, gallery, labels, path: Path) -> None:
    """Top-k of the first query under each scorer, side by side (the seed's figure, for every scorer)."""
    import jax.numpy as jnp

    from cbir_jax import ranking

    fs, split = stage.features, stage.split
    k = cfg.eval.k
    rows = {}
    for name, scorer in all_scorers.items():
        state = scorer.prepare(jnp.asarray(gallery))
        s, idx = ranking.top_k(scorer, state, jnp.asarray(queries[:1]), k=k, self_index=jnp.asarray(split.self_index[:1], jnp.int32), exclude_self=True) if scorer.chunkable else _dense_top_k(scorer, state, queries[:1], split.self_index[:1], k)
        rows[name] = [
            (fs.image(split.gallery[i]), float(v), bool(labels[split.gallery[i]] == labels[split.query[0]]))
            for v, i in zip(np.asarray(s)[0], np.asarray(idx)[0]) if i >= 0
        ]
    figures.topk_grid(fs.image(split.query[0]), rows, path, title=fs.ids[split.query[0]])


def _dense_top_k(scorer, state, queries, self_index, k):
    import jax.numpy as jnp

    from cbir_jax import ranking

    s = np.array(ranking.score_all(scorer, state, jnp.asarray(queries), jnp.asarray(self_index, jnp.int32)))  # writable copy
    for r, si in enumerate(self_index):
        if si >= 0:
            s[r, si] = -np.inf
    idx = np.argsort(-s, axis=1)[:, :k]
    return np.take_along_axis(s, idx, 1), idx


# Keys always taken from today's command line, not from the training run.
_RUNTIME_KEYS = ("eval", "cache_dir", "query", "k", "checkpoint")


def load_trained(run: Path, cfg_now: DictConfig, overridden: frozenset[str] = frozenset()) -> tuple[Config, dict[str, Any]]:
    """The training run's saved config, with the top-level keys the user set today (e.g. `data`) replaced."""
    saved_path = run / ".hydra" / "config.yaml"
    if not saved_path.exists():
        raise checkpointing.CheckpointError(f"checkpoint={run}: no .hydra/config.yaml; not a cbir_jax run directory")
    info = checkpointing.read_model_info(run)
    saved = OmegaConf.merge(OmegaConf.structured(Config), OmegaConf.load(saved_path))
    for key in set(_RUNTIME_KEYS) | set(overridden):
        saved[key] = cfg_now[key]
    return validate(OmegaConf.to_object(saved)), info


def restored_head(cfg: Config, run: Path, info: dict[str, Any], stage: Stage) -> tuple[Any, Any]:
    """The run's head and its restored parameters (the `eval.select` checkpoint); checks the features match
    what it was trained on."""
    if info["backbone_fingerprint"] != stage.backbone.fingerprint:
        raise checkpointing.CheckpointError(
            f"checkpoint={run} was trained on {info['backbone']} features "
            f"(size {info['backbone_feature_dim']}), not on {stage.backbone.name} (size {stage.backbone.feature_dim})"
        )
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


def trained_scorer(cfg: Config, run: Path, info: dict[str, Any], stage: Stage) -> scorers.Scorer:
    """The run's head with its restored parameters, as evaluation scores it."""
    if cfg.head.name == "learned_rerank":  # not a pair head: its own model and checkpoint layout
        from cbir_jax import rerank_training

        return rerank_training.restore_scorer(cfg, run, info, cfg.head.name)
    head, params = restored_head(cfg, run, info, stage)
    return scorers.head_scorer(cfg.head, head, params)


def verdict(results: dict[str, dict[str, float]], learned: str, metric: str = "map_at_r") -> str:
    """One line when the learned scorer ranks below the best baseline in the table, else ''."""
    if learned not in results:
        return ""
    others = {k: v[metric] for k, v in results.items() if k != learned}
    if not others:
        return ""
    best = max(others, key=others.get)
    ours = results[learned][metric]
    if ours >= others[best]:
        return ""
    return (
        f"note: the learned head ({learned}) is below {best} on {metric}: {ours:.4f} vs {others[best]:.4f}. "
        "See `python -m cbir_jax.diagnose` and experiments/README.md (why learned heads fail)."
    )


def overridden_keys() -> frozenset[str]:
    """Top-level config keys the user set on this command line (`data=folder` -> {"data"})."""
    from hydra.core.hydra_config import HydraConfig

    return frozenset(o.lstrip("+~").split("=")[0].split(".")[0] for o in HydraConfig.get().overrides.task)


def evaluate(cfg_dict: DictConfig, out_dir: Path, overridden: frozenset[str] = frozenset()) -> dict[str, dict[str, float]]:
    """Evaluates a checkpoint (or, without one, the fixed metrics alone) on the configured data."""
    cfg = to_typed(cfg_dict)
    learned: dict[str, scorers.Scorer] = {}
    if cfg.checkpoint:
        run = Path(cfg.checkpoint)
        cfg, info = load_trained(run, cfg_dict, overridden)
        on = cfg.eval.on if cfg.eval.on != "auto" else ("all" if "data" in overridden else "held_out")
        stage = load_stage(cfg, split_by="none" if on == "all" else None)
        learned[cfg.head.name] = trained_scorer(cfg, run, info, stage)
    else:
        on = "held_out" if cfg.eval.on == "held_out" else "all"
        stage = load_stage(cfg, split_by="none" if on == "all" else None)
    return evaluate_stage(cfg, stage, learned, out_dir)


@hydra.main(version_base="1.3", config_path=CONFIG_DIR, config_name="config")
def main(cfg: DictConfig) -> float:
    results = run_or_exit(lambda: evaluate(cfg, run_dir(), overridden_keys()))
    first = next(iter(results.values()))
    return first["map_at_r"]


if __name__ == "__main__":
    main()
