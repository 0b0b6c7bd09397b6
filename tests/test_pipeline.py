"""End to end on the embedded photos: train -> checkpoint -> resume -> evaluate -> search."""

import json
import shutil
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest
from omegaconf import OmegaConf

from cbir_jax.core.errors import CheckpointError
from cbir_jax.training import checkpointing
from cbir_jax.scoring import heads
from cbir_jax.runs.cli import to_typed
from cbir_jax.core.config import Config
from cbir_jax.evaluate import evaluate
from cbir_jax.search import search
from cbir_jax.features.stage import load_stage
from cbir_jax.train import train

from helpers import FAST, compose_config


def _train(run_dir: Path, *overrides: str) -> dict:
    cfg = compose_config(*overrides)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / ".hydra").mkdir(exist_ok=True)
    OmegaConf.save(cfg, run_dir / ".hydra" / "config.yaml")  # what Hydra writes for a real run
    return train(to_typed(cfg), run_dir)


def _params(run_dir: Path, cfg: Config):
    head = heads.build_head(cfg.head)
    dim = checkpointing.read_model_info(run_dir)["feature_dim"]
    return checkpointing.restore_params(run_dir, heads.init_params(head, dim, jax.random.key(0)))


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> tuple[Path, dict]:
    """One run of the FAST main job (train, then evaluate), shared by the tests that only read it."""
    run = tmp_path_factory.mktemp("trained") / "run"
    return run, _train(run)


def test_train_writes_a_self_describing_run(trained):
    run, results = trained
    assert set(results) == {"mlp", "euclid", "cosine", "ssim", "ssim_ratio"}
    stage = load_stage(to_typed(compose_config()))
    assert {m["queries"] for m in results.values()} == {len(stage.split.query)}
    # features are L2-normalised: euclid ranks exactly as cosine, so every metric agrees
    assert results["euclid"] == pytest.approx(results["cosine"], abs=1e-12)
    assert json.loads((run / "metrics.json").read_text()) == results
    lines = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in lines if "loss" in r]
    assert losses[-1]["step"] == 16 and all(np.isfinite(r["loss"]) for r in losses)
    assert [r["epoch"] for r in lines if "val_map_at_r" in r] == [0, 1, 2]  # before training, after each epoch
    assert checkpointing.read_model_info(run)["feature_dim"] == 16 * 16 * 3


def test_fixed_seed_reproduces_and_resume_continues_identically(tmp_path):
    full, again, resumed = tmp_path / "full", tmp_path / "again", tmp_path / "resumed"
    keep_all = "train.max_to_keep=10"
    a = _train(full, keep_all, "train.evaluate=false")
    _train(again, keep_all, "train.evaluate=false")
    cfg = to_typed(compose_config(keep_all))
    final = _params(full, cfg)
    jax.tree_util.tree_map(np.testing.assert_array_equal, final, _params(again, cfg))
    # A run stopped after step 5 (mid-epoch): keep only that checkpoint, then resume it.
    resumed.mkdir()
    shutil.copytree(full / ".hydra", resumed / ".hydra")
    (resumed / "checkpoints").mkdir()
    shutil.copytree(full / "checkpoints" / "5", resumed / "checkpoints" / "5")
    with pytest.raises(CheckpointError, match="train.resume=true"):
        train(cfg, resumed)
    _train(resumed, keep_all, "train.evaluate=false", "train.resume=true")
    jax.tree_util.tree_map(np.testing.assert_array_equal, final, _params(resumed, cfg))
    assert a == {}


def test_evaluate_and_search_rebuild_the_model_from_the_run(trained, tmp_path):
    run, at_train = trained
    cfg = compose_config(f"checkpoint={run}")
    results = evaluate(cfg, tmp_path / "eval")
    assert results["mlp"] == pytest.approx(at_train["mlp"])  # same held-out split, same parameters
    photo = tmp_path / "query.png"
    from PIL import Image
    from cbir_jax.data.embedded import _load_photo

    Image.fromarray(_load_photo("coffee")).save(photo)
    ranked = search(compose_config(f"checkpoint={run}", f"query={photo}", "k=5"), tmp_path / "search")
    assert len(ranked) == 5 and (tmp_path / "search" / "search.png").exists()
    assert [s for _, s in ranked] == sorted((s for _, s in ranked), reverse=True)


def test_checkpoint_feature_size_mismatch_is_one_line(trained, tmp_path):
    run, _ = trained
    cfg = compose_config(f"checkpoint={run}", "backbone.image_size=8")
    with pytest.raises(CheckpointError, match="trained on pixels") as e:
        evaluate(cfg, tmp_path / "eval", overridden=frozenset({"backbone"}))
    assert "\n" not in str(e.value)


def test_class_labels_are_read_only_for_labels_class(tmp_path, monkeypatch):
    """The self-supervised protocol: train on the gallery with a heuristic; labels are never touched."""
    from cbir_jax.features import stage
    from cbir_jax.data.base import ImageDataset

    class Guarded(ImageDataset):
        @property
        def labels(self):
            raise AssertionError("class labels were read")

    real_build = stage.build_dataset

    def build_guarded(cfg):
        dataset = real_build(cfg)
        guarded = object.__new__(Guarded)
        guarded.__dict__.update({k: v for k, v in vars(dataset).items() if k != "labels"})
        return guarded

    monkeypatch.setattr(stage, "build_dataset", build_guarded)
    for label in ["ssim", "euclid", "ssim_ratio", "ssim_dhash"]:
        _train(tmp_path / label, f"labels={label}", "data.split.by=none", "train.evaluate=false", "train.epochs=1")
    with pytest.raises(AssertionError, match="class labels were read"):
        _train(tmp_path / "class", "labels=class", "data.split.by=none", "train.evaluate=false", "train.epochs=1")


@pytest.mark.slow
def test_command_lines(tmp_path):
    """The README's commands as a user types them (small settings), including a multirun sweep."""
    common = FAST + ["cache_dir=" + str(tmp_path / "cache")]
    run = tmp_path / "run"
    env_cmd = [sys.executable, "-m"]

    def call(*args):
        out = subprocess.run(env_cmd + list(args), capture_output=True, text=True, timeout=300)
        assert out.returncode == 0, out.stderr[-2000:]
        assert "\r" not in out.stdout + out.stderr  # redirected: plain progress lines, no bar redraws
        return out

    out = call("cbir_jax.train", "head=mlp", "labels=ssim_ratio", f"hydra.run.dir={run}", *common)
    assert (run / "metrics.json").exists() and (run / ".hydra" / "config.yaml").exists()
    assert out.stdout.strip().splitlines()[-1].startswith(f"outputs: {run}/ (")  # every command says where it wrote
    # evaluate and search of a checkpoint write under that run, never into it
    out = call("cbir_jax.evaluate", f"checkpoint={run}", f"cache_dir={tmp_path / 'cache'}")
    assert "| mlp |" in out.stdout and "| cosine |" in out.stdout
    (eval_dir,) = (run / "eval").iterdir()
    assert (eval_dir / "metrics.json").exists() and (eval_dir / "topk.png").exists()
    assert out.stdout.strip().splitlines()[-1].startswith(f"outputs: {eval_dir}/ (")
    query = tmp_path / "q.jpg"
    from PIL import Image
    from cbir_jax.data.embedded import _load_photo

    Image.fromarray(_load_photo("astronaut")).save(query)
    out = call("cbir_jax.search", f"checkpoint={run}", f"query={query}", "k=3", f"cache_dir={tmp_path / 'cache'}")
    (search_dir,) = (run / "search").iterdir()
    assert (search_dir / "search.png").exists() and f"outputs: {search_dir}/ (" in out.stdout
    out = call("cbir_jax.diagnose", f"checkpoint={run}", f"cache_dir={tmp_path / 'cache'}")
    (diagnose_dir,) = (run / "diagnose").iterdir()
    assert "| scorer | fit (train pairs)" in out.stdout and "| mlp |" in out.stdout and "{" not in out.stdout
    assert out.stdout.strip().splitlines()[-1].startswith(f"outputs: {diagnose_dir}/ (")
    sweep = tmp_path / "sweep"
    out = call("cbir_jax.train", "-m", "head=mlp,cosine", "labels=euclid", f"hydra.sweep.dir={sweep}", *common)
    jobs = sorted(p.name for p in sweep.iterdir() if p.is_dir())
    assert len(jobs) == 2 and all((sweep / j / "metrics.json").exists() for j in jobs)
    assert "train: " in out.stderr and " steps in " in out.stderr  # progress as plain lines (and no \r: call)
    # a multirun ends with its folder and the command that tabulates it; that command works as printed
    *_, sweep_line, report_line = out.stdout.strip().splitlines()
    assert sweep_line == f"sweep: {sweep}/ (2 jobs: {', '.join(jobs)})"
    assert report_line == f"report: python -m cbir_jax.report {sweep}"
    out = call(*report_line.removeprefix("report: python -m ").split())
    assert out.stdout.strip().splitlines()[-1].startswith(f"outputs: {sweep.parent}/ (")
    # (A mistake on the evaluate command line as one line and exit 2: test_reliability_resume.py, its message
    # for a missing data.root: test_data.py.)


def test_train_and_evaluate_on_real_categories(tmp_path, caltech_dev):
    """Caltech-101-dev, class split: the trained head and the fixed metrics on held-out categories."""
    results = _train(tmp_path / "run", "data=folder", f"data.root={caltech_dev}", "data.max_per_class=6",
                     "backbone.image_size=24", "labels=ssim_ratio")
    assert results["mlp"]["queries"] == 25 * 6  # half of the 50 categories held out, 6 images each
    # Raw pixels of different categories: far from perfect, far from nothing.
    assert 0.05 < results["cosine"]["map_at_r"] < 0.5


def test_evaluate_draws_the_figure_with_a_reranker_among_the_baselines(tmp_path):
    """The figure ranks with every scorer, re-rankers (which need the whole gallery) included."""
    cfg = compose_config("eval.baselines=[cosine,dba_alpha_qe,diffusion]", "eval.figure=true", "eval.k=5")
    results = evaluate(cfg, tmp_path)
    assert set(results) == {"cosine", "dba_alpha_qe", "diffusion"}
    from PIL import Image

    with Image.open(tmp_path / "topk.png") as figure:
        assert figure.size[0] > 5 * 32 and figure.size[1] > 3 * 32  # a row per scorer, k columns
