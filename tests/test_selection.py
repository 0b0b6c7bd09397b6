"""Best-on-validation selection: the scripted best epoch is the one kept, restored and evaluated."""

import json
import math
from pathlib import Path

import jax
import numpy as np
import pytest
from omegaconf import OmegaConf

from cbir_jax.training import checkpointing, selection
from cbir_jax.scoring import heads, scorers
from cbir_jax.runs.cli import to_typed
from cbir_jax.evaluate import evaluate
from cbir_jax.train import train

from helpers import compose_config

STEPS_PER_EPOCH = 8  # helpers.FAST: 512 pairs per epoch in batches of 64


def test_selection_bookkeeping():
    s = selection.Selection(metric="map_at_r")
    assert s.record(0, 0, 0.2) and s.best_step == 0
    assert s.record(8, 1, 0.5) and s.best_step == 8
    assert not s.record(16, 2, 0.5)  # a tie is not an improvement: the earlier (simpler) model stays
    assert not s.record(24, 3, math.nan)
    assert s.best_step == 8 and s.evaluations_since_best == 2
    assert s.should_stop(2) and not s.should_stop(3) and not s.should_stop(None)


def _scripted(monkeypatch, values):
    """Validation returns `values` in order (one per validation) instead of measuring."""
    it = iter(values)
    seen = []

    def fake(self, scorer):
        seen.append(scorer)
        return {"map_at_r": next(it), "precision_at_1": 0.0}

    monkeypatch.setattr(selection.Validator, "__call__", fake)
    return seen


def _train(run: Path, *overrides: str, val_fraction: float = 0.2) -> dict:
    cfg = compose_config(f"data.split.val_fraction={val_fraction}", "train.max_to_keep=10", *overrides)
    run.mkdir(parents=True)
    (run / ".hydra").mkdir()
    OmegaConf.save(cfg, run / ".hydra" / "config.yaml")
    return train(to_typed(cfg), run)


def _restore(run: Path, which: str, *overrides: str):
    cfg = to_typed(compose_config(*overrides))
    head = heads.build_head(cfg.head)
    like = heads.init_params(head, checkpointing.read_model_info(run)["feature_dim"], jax.random.key(0))
    return checkpointing.restore_params(run, like, which)


def test_best_validation_epoch_is_kept_and_logged(tmp_path, monkeypatch):
    _scripted(monkeypatch, [0.1, 0.6, 0.3, 0.2])
    run = tmp_path / "run"
    _train(run, "train.epochs=3", "train.evaluate=false")
    records = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    val = [r for r in records if "val_map_at_r" in r]
    assert [(r["step"], r["epoch"], r["val_map_at_r"]) for r in val] == [
        (0, 0, 0.1), (8, 1, 0.6), (16, 2, 0.3), (24, 3, 0.2)
    ]
    assert json.loads((run / "best.json").read_text())["best_step"] == STEPS_PER_EPOCH
    best = _restore(run, "best")
    at_epoch_1 = _restore_step(run, STEPS_PER_EPOCH)
    jax.tree_util.tree_map(np.testing.assert_array_equal, best, at_epoch_1)
    last = _restore(run, "last")
    assert not all(jax.tree_util.tree_leaves(jax.tree_util.tree_map(np.array_equal, best, last)))


def _restore_step(run: Path, step: int):
    cfg = to_typed(compose_config())
    head = heads.build_head(cfg.head)
    like = heads.init_params(head, checkpointing.read_model_info(run)["feature_dim"], jax.random.key(0))
    mngr = checkpointing.manager(run, create=False)
    try:
        import orbax.checkpoint as ocp

        out = mngr.restore(step, args=ocp.args.Composite(params=ocp.args.StandardRestore(like)))
    finally:
        mngr.close()
    return out["params"]


def test_early_stopping_stops_after_patience(tmp_path, monkeypatch):
    _scripted(monkeypatch, [0.5, 0.4, 0.3, 0.9, 0.9])
    run = tmp_path / "run"
    _train(run, "train.epochs=4", "train.patience=2", "train.evaluate=false")
    val = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in val if "val_map_at_r" in r] == [0, 1, 2]  # the 0.9 epochs never ran
    assert checkpointing.manager(run, create=False).latest_step() == 2 * STEPS_PER_EPOCH
    assert json.loads((run / "best.json").read_text())["best_step"] == 0


def test_evaluate_uses_the_best_checkpoint_unless_told_otherwise(tmp_path, monkeypatch):
    # Best = the starting point, where a residual head *is* cosine: its row must equal cosine's exactly.
    _scripted(monkeypatch, [0.9, 0.1, 0.1])
    run = tmp_path / "run"
    residual = ("head.residual=true", "head.monotone=false", "train.learning_rate=0.05")
    trained = _train(run, *residual)
    assert trained["mlp"] == trained["cosine"]
    best = evaluate(compose_config(f"checkpoint={run}", *residual), tmp_path / "best")
    assert best["mlp"] == best["cosine"]
    last = evaluate(compose_config(f"checkpoint={run}", "eval.select=last", *residual), tmp_path / "last")
    assert last["mlp"] != last["cosine"]  # the trained correction does change the ranking


def test_patience_without_validation_rows_is_a_user_error(tmp_path):
    with pytest.raises(ValueError, match="val_fraction"):
        _train(tmp_path / "run", "train.patience=1", val_fraction=0.0)
