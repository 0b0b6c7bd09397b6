"""Runs that report themselves: curves.png, TensorBoard event files equal to metrics.jsonl (also after a
resume), `--help` of the entry points, and a clean start of `python -m cbir_jax.train`."""

import shutil
import struct
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from tensorboardX.proto import event_pb2

from cbir_jax.training import curves, metrics_log

from helpers import FAST, compose_config, killed_copy
from test_pipeline import _train

NO_VALIDATION = "data.split.val_fraction=0"


def read_events(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """{tag: [(step, value)]} of every scalar in RUN/tensorboard/, read as TensorBoard reads it: TFRecord
    framing (length, its CRC, the serialized `Event`, its CRC), files in name order."""
    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for path in sorted((run_dir / metrics_log.TENSORBOARD_DIR).glob(metrics_log.EVENT_FILES)):
        data, at = path.read_bytes(), 0
        while at < len(data):
            (length,) = struct.unpack_from("<Q", data, at)
            event = event_pb2.Event.FromString(data[at + 12: at + 12 + length])
            at += 12 + length + 4
            for value in event.summary.value:
                out[value.tag].append((event.step, value.simple_value))
    return dict(out)


def expected_from_jsonl(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    """The scalars metrics.jsonl holds, as TensorBoard should show them (tags grouped as train/ and val/)."""
    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    for record in metrics_log.read_records(run_dir):
        for key, value in record.items():
            if key not in metrics_log.NOT_SCALARS and value is not None:
                out[metrics_log.tag_of(key)].append((record["step"], value))
    return dict(out)


def assert_same_scalars(events: dict, expected: dict) -> None:
    assert sorted(events) == sorted(expected)
    for tag, points in expected.items():
        assert [s for s, _ in events[tag]] == [s for s, _ in points], tag  # each step once, in order
        np.testing.assert_allclose([v for _, v in events[tag]], [v for _, v in points], rtol=1e-6, err_msg=tag)


def test_training_writes_curves_and_tensorboard_equal_to_metrics_jsonl(tmp_path):
    run = tmp_path / "run"
    _train(run, "train.evaluate=false", "train.log_every=3")
    events = read_events(run)
    assert {"train/loss", "train/learning_rate", "val/map_at_r", "val/precision_at_1"} <= set(events)
    assert [s for s, _ in events["val/map_at_r"]] == [0, 8, 16]  # before training and after each epoch
    assert [s for s, _ in events["train/loss"]] == [3, 6, 9, 12, 15, 16]
    assert_same_scalars(events, expected_from_jsonl(run))
    with Image.open(run / curves.CURVES_FILE) as image:
        assert image.format == "PNG" and image.size == (700, 520)  # two panels: loss and validation


def test_a_resumed_run_shows_each_step_once_in_tensorboard(tmp_path):
    full, resumed = tmp_path / "full", tmp_path / "resumed"
    opts = ("train.max_to_keep=10", "train.log_every=1", "train.evaluate=false", NO_VALIDATION)
    _train(full, *opts)
    # Killed after logging step 9 with step 5 its last checkpoint; its event file had flushed all 16 steps.
    killed_copy(full, resumed, checkpoint=5, records=9)
    shutil.copytree(full / "tensorboard", resumed / "tensorboard")
    _train(resumed, *opts, "train.resume=true")
    events = read_events(resumed)
    assert [s for s, _ in events["train/loss"]] == list(range(1, 17))
    assert_same_scalars(events, expected_from_jsonl(resumed))
    assert_same_scalars(events, read_events(full))  # a bit-identical resume: the same curves
    with Image.open(resumed / curves.CURVES_FILE) as image:
        assert image.size == (700, 300)  # no validation records: the loss panel alone


def test_the_learned_reranker_writes_curves_and_tensorboard(tmp_path):
    from cbir_jax.core.config import LearnedRerankConfig, TrainConfig
    from cbir_jax.runs.cli import to_typed
    from cbir_jax.training import rerank_training

    rng = np.random.default_rng(0)
    x = rng.normal(size=(60, 8)).astype(np.float32)
    y = np.repeat(np.arange(6), 10)
    cfg = to_typed(compose_config("head=learned_rerank"))
    cfg.head.reranker = LearnedRerankConfig(k=4, qe_k=2, dim=8, depth=1, heads=2, queries_per_step=20, val_every=2)
    cfg.train = TrainConfig(epochs=4, learning_rate=1e-3, warmup_steps=1, log_every=2)
    rerank_training.train_reranker(cfg, x[:40], lambda: y[:40], x[40:], y[40:], tmp_path)
    events = read_events(tmp_path)
    assert [s for s, _ in events["val/map_at_r"]] == [0, 4, 8]  # untrained, then every val_every=2 epochs
    assert [s for s, _ in events["train/loss"]] == [2, 4, 6, 8]  # every log_every=2 steps (epochs of 2 steps)
    assert_same_scalars(events, expected_from_jsonl(tmp_path))
    assert (tmp_path / curves.CURVES_FILE).stat().st_size > 0


def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", *args], capture_output=True, text=True, timeout=300, cwd=cwd)


@pytest.mark.parametrize("app, description, example", [
    ("train", "the main job", "python -m cbir_jax.train head=mlp labels=ssim_ratio"),
    ("evaluate", "Compares the trained scorer", "python -m cbir_jax.evaluate checkpoint="),
])
def test_help_describes_the_entry_point_and_writes_nothing(tmp_path, app, description, example):
    out = _cli(f"cbir_jax.{app}", "--help", cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    assert description in out.stdout and example in out.stdout
    assert "== Configuration groups ==" in out.stdout and "head: " in out.stdout  # Hydra's $APP_CONFIG_GROUPS
    assert "train.epochs=" in out.stdout  # the override hint
    assert not list(tmp_path.iterdir())  # no outputs/ folder, nothing else either


def test_train_starts_without_the_tpu_probe_line_and_ends_with_its_outputs(tmp_path):
    run = tmp_path / "run"
    out = _cli("cbir_jax.train", *FAST, "train.evaluate=false", f"hydra.run.dir={run}", cwd=Path.cwd())
    assert out.returncode == 0, out.stderr[-2000:]
    probe = "Unable to initialize backend 'tpu'"
    assert probe not in out.stdout + out.stderr
    assert probe not in (run / "train.log").read_text()
    last = out.stdout.strip().splitlines()[-1]
    assert last.startswith(f"outputs: {run}/ (") and "curves.png" in last and "tensorboard/" in last
    assert ".hydra/" in last and "train.log" in last  # every file written, Hydra's too
    assert "\r" not in out.stdout + out.stderr and "train: " in out.stderr  # progress as plain lines in a pipe


@pytest.mark.parametrize("job, checkpoint, expected", [
    ("train", None, "outputs/runs/2026-12-02/11-00-00"),
    ("evaluate", None, "outputs/eval/2026-12-02/11-00-00"),
    ("search", None, "outputs/search/2026-12-02/11-00-00"),
    ("index", None, "outputs/index/2026-12-02/11-00-00"),
    ("diagnose", None, "outputs/diagnose/2026-12-02/11-00-00"),
    ("serve", None, "outputs/serve/2026-12-02/11-00-00"),
    ("evaluate", "outputs/runs/d/t", "outputs/runs/d/t/eval/2026-12-02_11-00-00"),
    ("search", "outputs/runs/d/t", "outputs/runs/d/t/search/2026-12-02_11-00-00"),
    ("train", "outputs/runs/d/t", "outputs/runs/2026-12-02/11-00-00"),  # a checkpoint never nests a training run
])
def test_each_command_has_its_own_output_folder(job, checkpoint, expected):
    from cbir_jax.core.config import run_dir_for

    assert run_dir_for(job, checkpoint, "2026-12-02/11-00-00") == expected


def test_curves_of_records_without_validation_or_steps_still_draw(tmp_path):
    records = [{"step": 1, "epoch": 0, "loss": 2.0}, {"step": 2, "epoch": 0, "loss": 0.01}]  # log axis
    assert curves.plot_curves(records, tmp_path / "a.png").stat().st_size > 0
    assert curves.plot_curves([{"step": 0, "epoch": 0, "val_map_at_r": None}], tmp_path / "b.png").exists()
    assert metrics_log.scalars({"step": 3, "epoch": 1, "loss": 0.5, "best_step": 0, "val_map_at_r": None}) == {
        "train/loss": 0.5
    }
