"""`logger=csv|tensorboard|mlflow|wandb`: each backend writes with its real library into a temp folder, and
what it wrote, read back with that library (or its file format), equals metrics.jsonl, also after a resume.

mlflow and wandb are the [loggers] extra: their tests skip when it is absent. Neither needs a network:
MLflow writes a local SQLite store, W&B runs in offline mode.
"""

from __future__ import annotations

import csv
import struct
import sys
import time
from collections import defaultdict
from pathlib import Path

import pytest

from cbir_jax.core.config import LoggerConfig, LoggerName
from cbir_jax.training import metrics_log
from cbir_jax.training.metrics_log import LOGGERS, LoggerError, MetricsLog

from helpers import compose_config
from test_run_outputs import assert_same_scalars, expected_from_jsonl, read_events

RECORDS = [
    {"step": 0, "epoch": 0, "val_map_at_r": 0.25, "val_queries": 9},
    {"step": 1, "epoch": 0, "loss": 0.9, "learning_rate": 1e-3},
    {"step": 2, "epoch": 0, "loss": 0.7, "learning_rate": 9e-4},
    {"step": 2, "epoch": 1, "val_map_at_r": 0.4, "val_precision_at_1": 0.5, "val_queries": 9},
    {"step": 3, "epoch": 1, "loss": 0.6, "learning_rate": 8e-4},
    {"step": 4, "epoch": 1, "loss": 0.5, "learning_rate": 7e-4},
]


def read_csv(run_dir: Path) -> dict[str, list[tuple[int, float]]]:
    out: dict[str, list[tuple[int, float]]] = defaultdict(list)
    with (run_dir / metrics_log.CSV_FILE).open(newline="") as f:
        for row in csv.DictReader(f):
            for tag, value in row.items():
                if tag != "step" and value != "":
                    out[tag].append((int(row["step"]), float(value)))
    return dict(out)


def read_mlflow(uri: str, project: str) -> list[dict[str, list[tuple[int, float]]]]:
    """Every MLflow run of the experiment, oldest first, as {tag: [(step, value)]}."""
    import mlflow

    client = mlflow.MlflowClient(tracking_uri=uri)
    experiment = client.get_experiment_by_name(project)
    runs = client.search_runs([experiment.experiment_id], order_by=["attributes.start_time ASC"])
    out = []
    for run in runs:
        history = {}
        for tag in run.data.metrics:
            points = sorted(client.get_metric_history(run.info.run_id, tag), key=lambda m: (m.step, m.timestamp))
            history[tag] = [(m.step, m.value) for m in points]
        out.append(history)
    return out


def read_wandb(run_dir: Path) -> list[dict[str, list[tuple[int, float]]]]:
    """Every offline W&B run under RUN/wandb/, oldest first: the history records of its `.wandb` file, a
    LevelDB-style log (32 KiB blocks of checksum, length, type, payload) of `Record` protobufs after a
    7-byte header."""
    from wandb.proto import wandb_internal_pb2

    runs = []
    files = (run_dir / metrics_log.WANDB_DIR).glob("offline-run-*/run-*.wandb")
    for path in sorted(files, key=lambda p: p.parent.stat().st_ctime_ns):  # names have whole seconds only
        runs.append(_wandb_history(path, wandb_internal_pb2))
    return runs


def _wandb_history(path: Path, wandb_internal_pb2, timeout_s: float = 60.0) -> dict[str, list[tuple[int, float]]]:
    """One run file's history, once its `exit` record is written: `finish()` returns while W&B's service may
    still be writing the file."""
    deadline = time.monotonic() + timeout_s
    while True:
        history, complete = _parse_wandb(path.read_bytes(), wandb_internal_pb2)
        if complete or time.monotonic() > deadline:
            assert complete, f"{path}: no exit record after {timeout_s} s"
            return history
        time.sleep(0.2)


def _parse_wandb(data: bytes, wandb_internal_pb2) -> tuple[dict[str, list[tuple[int, float]]], bool]:
    """(history, whether the exit record is there) of a `.wandb` file's bytes so far."""
    at, pending, complete = 7, b"", False
    history: dict[str, list[tuple[int, float]]] = defaultdict(list)
    while at + 7 <= len(data):
        left = 32768 - at % 32768
        _, length, kind = struct.unpack_from("<IHB", data, at)
        if left < 7 or (kind == 0 and length == 0):
            at += left
            continue
        if at + 7 + length > len(data):  # still being written
            break
        pending += data[at + 7 : at + 7 + length]
        at += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record.FromString(pending)
            pending = b""
            complete = complete or record.WhichOneof("record_type") == "exit"
            if record.WhichOneof("record_type") == "history":
                items = {"/".join(i.nested_key) or i.key: i.value_json for i in record.history.item}
                step = int(items.pop("_step"))
                for tag, value in items.items():
                    if not tag.startswith("_"):
                        history[tag].append((step, float(value)))
    return dict(history), complete


def _log(run_dir: Path, cfg: LoggerConfig, records: list[dict], keep_up_to: int = -1) -> None:
    with MetricsLog(run_dir, keep_up_to, logger=cfg, params={"train.epochs": 2, "head.name": "mlp"}) as log:
        for record in records:
            log.write(record)


def _resume(run_dir: Path, cfg: LoggerConfig) -> None:
    """A run killed after step 4 that restarts from its step-2 checkpoint and logs steps 3 and 4 again."""
    _log(run_dir, cfg, RECORDS)
    _log(run_dir, cfg, [dict(r, loss=r["loss"] / 2) for r in RECORDS[4:]], keep_up_to=2)


def test_the_logger_choices_are_the_registry():
    assert set(LoggerName) == set(LOGGERS.names())
    for name in LoggerName:
        assert compose_config(f"logger={name}").logger.name == name
    assert compose_config().logger.name == "tensorboard"


@pytest.mark.parametrize("name, read", [("csv", read_csv), ("tensorboard", read_events)])
def test_csv_and_tensorboard_equal_metrics_jsonl_also_after_a_resume(tmp_path, name, read):
    _log(tmp_path, LoggerConfig(name=LoggerName(name)), RECORDS)
    expected = expected_from_jsonl(tmp_path)
    assert {"train/loss", "val/map_at_r", "val/precision_at_1"} <= set(expected)
    assert_same_scalars(read(tmp_path), expected)
    _resume(tmp_path, LoggerConfig(name=LoggerName(name)))
    resumed = expected_from_jsonl(tmp_path)
    assert [v for _, v in resumed["train/loss"]] == [0.9, 0.7, 0.3, 0.25]
    assert_same_scalars(read(tmp_path), resumed)


def test_mlflow_writes_a_local_store_read_back_equal(tmp_path):
    pytest.importorskip("mlflow", reason="the [loggers] extra is not installed")
    cfg = LoggerConfig(name=LoggerName.mlflow, project="test", tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    run = tmp_path / "run"
    _resume(run, cfg)
    first, second = read_mlflow(cfg.tracking_uri, "test")
    original = {tag: points for tag, points in first.items()}
    assert original["train/loss"] == [(1, 0.9), (2, 0.7), (3, 0.6), (4, 0.5)]
    assert_same_scalars(second, expected_from_jsonl(run))  # the resumed run: each step once

    import mlflow

    client = mlflow.MlflowClient(tracking_uri=cfg.tracking_uri)
    last = client.search_runs([client.get_experiment_by_name("test").experiment_id])[0]
    assert last.data.params == {"train.epochs": "2", "head.name": "mlp"}
    assert last.data.tags["cbir_jax.run_dir"] == str(run.resolve()) and last.info.status == "FINISHED"


def test_wandb_offline_writes_the_run_folder_read_back_equal(tmp_path, monkeypatch):
    pytest.importorskip("wandb", reason="the [loggers] extra is not installed")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))  # nothing outside the temp folder
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "config"))
    monkeypatch.setenv("WANDB_CACHE_DIR", str(tmp_path / "cache"))
    run = tmp_path / "run"
    _resume(run, LoggerConfig(name=LoggerName.wandb, project="test", mode="offline"))
    first, second = read_wandb(run)
    assert first["train/loss"] == [(1, 0.9), (2, 0.7), (3, 0.6), (4, 0.5)]
    assert_same_scalars(second, expected_from_jsonl(run))


@pytest.mark.parametrize("name, module", [("mlflow", "mlflow"), ("wandb", "wandb")])
def test_a_missing_extra_is_one_line(tmp_path, monkeypatch, name, module):
    monkeypatch.setitem(sys.modules, module, None)  # as if not installed
    with pytest.raises(LoggerError, match=rf"^logger={name} needs the \[loggers\] extra \({module} is missing\)"):
        MetricsLog(tmp_path, -1, logger=LoggerConfig(name=LoggerName(name)))
    assert not (tmp_path / metrics_log.METRICS_LOG).exists()
