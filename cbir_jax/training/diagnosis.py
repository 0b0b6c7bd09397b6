"""Why a head ranks as it does: label quality, fit, ranking and hubness of a label heuristic and heads.

`python -m cbir_jax.diagnose` and `train.diagnose=true` write what `run_diagnostics` returns
(`diagnostics.json`, `diagnostics.png`); cbir_jax/evaluation/diagnostics.py defines every number.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cbir_jax.evaluation import diagnostics
from cbir_jax.evaluation.retrieval import leave_one_out
from cbir_jax.scoring import heads, scorers
from cbir_jax.scoring.compose import head_scorer
from cbir_jax.labels import pair_labels
from cbir_jax.training import pairs
from cbir_jax.core.config import Config
from cbir_jax.features.stage import Stage, as_gallery

log = logging.getLogger(__name__)
FRESH_EPOCH = 2**31 - 1  # a pair draw no training epoch uses


def _context(cfg: Config, stage: Stage, rows: np.ndarray, x: np.ndarray) -> pair_labels.PairContext:
    fs = stage.features
    return pair_labels.PairContext(
        features=x, thumbnails=fs.thumbnails[rows], class_labels=lambda: None if fs.labels is None else fs.labels[rows],
        cfg=cfg.labels,
    )


def _pairs(cfg: Config, ctx: pair_labels.PairContext, epoch: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The pairs and targets the trainer draws for `epoch`, flattened."""
    n = len(ctx.features)
    nbrs = pairs.neighbours(ctx.features, cfg.pairs.hard_k) if cfg.pairs.hard_fraction > 0 else None
    batch = min(cfg.train.batch_size, cfg.pairs.pairs_per_epoch)
    steps = max(1, cfg.pairs.pairs_per_epoch // batch)
    i, j, t = pairs.epoch_batches(cfg, ctx, n, nbrs, epoch, steps, batch)
    return i.ravel(), j.ravel(), t.ravel()


def _head_values(head, params, x: np.ndarray, i: np.ndarray, j: np.ndarray, chunk: int = 4096) -> np.ndarray:
    apply = jax.jit(lambda p, a, b: head.apply({"params": p}, a, b))
    out = [np.asarray(apply(params, jnp.asarray(x[i[s : s + chunk]]), jnp.asarray(x[j[s : s + chunk]]))) for s in range(0, len(i), chunk)]
    return np.concatenate(out)


def _label_block(targets, same, cosine, i, j, n) -> dict[str, float]:
    out = diagnostics.label_quality(targets, same, cosine)
    out["additive_share"] = diagnostics.additive_share(i, j, targets, n)
    return out


def run_diagnostics(cfg: Config, stage: Stage, learned: dict[str, tuple[Any, Any]], out_dir: Path) -> dict[str, Any]:
    """Diagnostics of the label and of cosine plus every learned (head, params); writes JSON and figure."""
    fs, split = stage.features, stage.split
    labels = fs.labels
    train_rows = split.train
    held_rows = np.unique(np.concatenate([split.query, split.gallery]))
    x_train = as_gallery(cfg, fs.features[train_rows])
    x_held = as_gallery(cfg, fs.features[held_rows])
    ctx_train, ctx_held = _context(cfg, stage, train_rows, x_train), _context(cfg, stage, held_rows, x_held)

    i, j, t = _pairs(cfg, ctx_train, 0)
    fi, fj, ft = _pairs(cfg, ctx_train, FRESH_EPOCH)
    hi, hj, ht = _pairs(cfg, ctx_held, 0)
    y_train = None if labels is None else labels[train_rows]
    y_held = None if labels is None else labels[held_rows]
    same = None if y_train is None else y_train[i] == y_train[j]
    cos = np.sum(x_train[i] * x_train[j], -1)
    result: dict[str, Any] = {
        "label": {
            "name": cfg.labels.name,
            "train": _label_block(t, same, cos, i, j, len(train_rows)),
            "held_out": _label_block(
                ht, None if y_held is None else y_held[hi] == y_held[hj], np.sum(x_held[hi] * x_held[hj], -1), hi, hj, len(held_rows)
            ),
        },
        "rows": {"train": int(len(train_rows)), "held_out": int(len(held_rows)), "pairs": int(len(i))},
        "scorers": {},
    }
    figure_data = {"targets": t, "same": same, "n10": {}, "outputs": {}}
    entries = {"cosine": (heads.FixedMetric(heads.FIXED_METRICS["cosine"]), {})} | dict(learned)
    for name, (head, params) in entries.items():
        out = _head_values(head, params, x_train, i, j)
        fresh = _head_values(head, params, x_train, fi, fj)
        block = {
            "fit_train_pairs": diagnostics.spearman(out, t),
            "fit_fresh_pairs": diagnostics.spearman(fresh, ft),
            "pairs": diagnostics.pair_diagnostics(out, t, cos, same, i, j, len(train_rows)),
        }
        scorer = head_scorer(cfg.head, head, params) if name in learned else scorers.fixed_scorer(name)
        if labels is not None:
            for key, x, y in (("train_rows", x_train, y_train), ("held_out_rows", x_held, y_held)):
                values: dict[str, np.ndarray] = {}
                metrics = leave_one_out(scorer, x, y, per_query=values, keep_top=10)
                block[key] = diagnostics.ranking_diagnostics(metrics, values["top_ids"], len(x))
            figure_data["n10"][name] = diagnostics.k_occurrence(values["top_ids"], len(held_rows))
        result["scorers"][name] = block
        figure_data["outputs"][name] = out
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "diagnostics.json").write_text(json.dumps(result, indent=2))
    _figure(result, figure_data, out_dir / "diagnostics.png")
    return result


def _figure(result: dict, data: dict, path: Path) -> None:
    """Target by class relation, output vs target, N10 distributions, MAP@R train vs held-out."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(17, 3.8))
    ax = axes[0]
    if data["same"] is not None:
        bins = np.linspace(data["targets"].min(), data["targets"].max(), 40)
        ax.hist(data["targets"][data["same"]], bins, alpha=0.6, density=True, label="same class")
        ax.hist(data["targets"][~data["same"]], bins, alpha=0.6, density=True, label="different class")
        ax.legend(fontsize=7)
    lt = result["label"]["train"]
    ax.set_title(f"label {result['label']['name']}: AUC {lt.get('auc_same_class', float('nan')):.2f}, "
                 f"per-image {lt['additive_share']:.2f}", fontsize=8)
    ax.set_xlabel("target (training pairs)", fontsize=8)
    ax = axes[1]
    for name, out in data["outputs"].items():
        keep = np.random.default_rng(0).permutation(len(out))[:2000]
        z = (out - out.mean()) / (out.std() + 1e-12)
        ax.scatter(data["targets"][keep], z[keep], s=2, alpha=0.4, label=f"{name} (ρ={result['scorers'][name]['fit_train_pairs']:.2f})")
    ax.set_xlabel("target", fontsize=8)
    ax.set_ylabel("standardised output", fontsize=8)
    ax.set_title("fit on training pairs", fontsize=8)
    ax.legend(fontsize=7, markerscale=4)
    ax = axes[2]
    for name, counts in data["n10"].items():
        ax.hist(counts, bins=40, alpha=0.5, label=f"{name} (skew {result['scorers'][name]['held_out_rows']['n10_skewness']:.1f})")
    ax.set_yscale("log")
    ax.set_xlabel("N10 (held-out gallery)", fontsize=8)
    ax.set_title("hubness", fontsize=8)
    ax.legend(fontsize=7)
    ax = axes[3]
    names = [n for n in result["scorers"] if "train_rows" in result["scorers"][n]]
    xs = np.arange(len(names))
    ax.bar(xs - 0.2, [result["scorers"][n]["train_rows"]["map_at_r"] for n in names], 0.4, label="training rows")
    ax.bar(xs + 0.2, [result["scorers"][n]["held_out_rows"]["map_at_r"] for n in names], 0.4, label="held-out rows")
    ax.set_xticks(xs, names, fontsize=8)
    ax.set_ylabel("MAP@R (leave-one-out)", fontsize=8)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=80)
    plt.close(fig)
