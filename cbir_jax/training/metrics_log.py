"""A run's training metrics, written in one place: `metrics.jsonl` (the record, always) and one logger
backend (the view; `logger=csv|tensorboard|mlflow|wandb`, TensorBoard by default).

Both training loops log through `MetricsLog`, so the two never disagree: each record goes to both, and
when a run resumes, `metrics.jsonl` is cut back to the restored step and the backend is rebuilt from what
is kept (TensorBoard's event files and the CSV are rewritten; MLflow and W&B start a new run that replays
the kept records), so each shows every step once, as metrics.jsonl does.
"""

from __future__ import annotations

import contextlib
import csv
import io
import json
import logging
import math
import sys
import time
from pathlib import Path
from types import TracebackType
from typing import Any, Optional, Protocol, TextIO

from cbir_jax.core.config import LoggerConfig
from cbir_jax.core.errors import UserError
from cbir_jax.core.files import atomic_write_text
from cbir_jax.core.registry import Registry

log = logging.getLogger(__name__)
METRICS_LOG = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
CSV_FILE = "metrics.csv"
WANDB_DIR = "wandb"
EVENT_FILES = "events.out.tfevents.*"
# Bookkeeping, not curves: `epoch` takes two values at an epoch's last step (its loss record and the
# validation after it), `best_step` and `val_queries` are counts.
NOT_SCALARS = frozenset({"step", "epoch", "best_step", "val_queries"})
FLUSH_SECS = 10  # how stale a live TensorBoard may be; metrics.jsonl is flushed at every record


def open_metrics_log(run_dir: Path, step: int) -> TextIO:
    """`metrics.jsonl` for appending, holding only the records up to `step` (where training restarts).

    A run killed after its last checkpoint logged steps it will now redo; a line cut off by the kill is
    not valid JSON. Both are dropped (the file is rewritten atomically), so every step appears once.
    """
    path = Path(run_dir) / METRICS_LOG
    if path.exists():
        lines = path.read_text().splitlines()
        kept = [line for line in lines if (s := _step_of(line)) is not None and s <= step]
        if len(kept) != len(lines):
            atomic_write_text(path, "".join(f"{line}\n" for line in kept))
            log.info("%s: dropped %d records past step %d (they are logged again)", path, len(lines) - len(kept), step)
    return path.open("a")


def read_records(run_dir: Path) -> list[dict[str, Any]]:
    """The records of a run's `metrics.jsonl` (a line cut off by a kill is skipped)."""
    path = Path(run_dir) / METRICS_LOG
    lines = path.read_text().splitlines() if path.exists() else []
    return [json.loads(line) for line in lines if _step_of(line) is not None]


def _step_of(line: str) -> int | None:
    try:
        record = json.loads(line)
    except ValueError:
        return None
    value = record.get("step") if isinstance(record, dict) else None
    return value if isinstance(value, int) else None


def tag_of(key: str) -> str:
    """A record key as a TensorBoard tag, grouped as TensorBoard shows them: `val_map_at_r` -> `val/map_at_r`,
    `loss` -> `train/loss`."""
    return f"val/{key[4:]}" if key.startswith("val_") else f"train/{key}"


def scalars(record: dict[str, Any]) -> dict[str, float]:
    """The record's curves as {tag: value}: its finite numbers, without the bookkeeping keys."""
    return {
        tag_of(k): float(v) for k, v in record.items()
        if k not in NOT_SCALARS and isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
    }


class LoggerError(UserError):
    """A logger backend that cannot start (its extra is missing, its store refuses); one line."""


class Backend(Protocol):
    """Where a run's curves go besides metrics.jsonl. Built on the records kept so far (a resume), then
    given each new record's scalars."""

    def add(self, step: int, values: dict[str, float]) -> None: ...

    def close(self) -> None: ...


LOGGERS: Registry[type] = Registry("logger")


def _import(module: str, name: str) -> Any:
    try:
        return __import__(module, fromlist=["_"])
    except ImportError as e:
        raise LoggerError(f"logger={name} needs the [loggers] extra ({e.name} is missing): "
                          f"pip install -e '.[loggers]'") from None


@LOGGERS.register("tensorboard")
class TensorBoardBackend:
    """RUN/tensorboard/ through tensorboardX; old event files are removed (rebuilt from the kept records)."""

    def __init__(self, run_dir: Path, cfg: LoggerConfig, params: dict[str, Any]) -> None:
        board = run_dir / TENSORBOARD_DIR
        for old in board.glob(EVENT_FILES):
            old.unlink()
        self._writer = _summary_writer_class()(str(board), flush_secs=FLUSH_SECS)

    def add(self, step: int, values: dict[str, float]) -> None:
        for tag, value in values.items():
            self._writer.add_scalar(tag, value, global_step=step)

    def close(self) -> None:
        try:
            self._writer.close()
        except OSError:
            for writer in getattr(self._writer, "all_writers", {}).values():  # tensorboardX's, left as closed:
                with contextlib.suppress(Exception):  # its worker stops and its exit hook does not flush again
                    writer.event_writer._worker.stop()
                writer.event_writer._closed = True
            raise


@LOGGERS.register("csv")
class CsvBackend:
    """RUN/metrics.csv, one row per record and one column per tag (Lightning's CSVLogger layout). A new tag
    rewrites the file with the wider header; otherwise rows are appended and flushed."""

    def __init__(self, run_dir: Path, cfg: LoggerConfig, params: dict[str, Any]) -> None:
        self.path = run_dir / CSV_FILE
        self._rows: list[dict[str, Any]] = []
        self._columns: list[str] = ["step"]
        self._rewrite()

    def _rewrite(self) -> None:
        buf = io.StringIO()
        writer = csv.DictWriter(buf, fieldnames=self._columns, lineterminator="\n")
        writer.writeheader()
        writer.writerows(self._rows)
        atomic_write_text(self.path, buf.getvalue())

    def add(self, step: int, values: dict[str, float]) -> None:
        row = {"step": step, **values}
        self._rows.append(row)
        new = [tag for tag in values if tag not in self._columns]
        if new:
            self._columns += new
            self._rewrite()
            return
        with self.path.open("a", newline="") as f:
            csv.DictWriter(f, fieldnames=self._columns, lineterminator="\n").writerow(row)

    def close(self) -> None:
        pass


@LOGGERS.register("mlflow")
class MlflowBackend:
    """A new MLflow run per training run (or resume) in `logger.tracking_uri`, named after the run folder and
    tagged with its path; the config's values as parameters."""

    def __init__(self, run_dir: Path, cfg: LoggerConfig, params: dict[str, Any]) -> None:
        mlflow = _import("mlflow", "mlflow")
        from mlflow.entities import Metric, Param
        from mlflow.exceptions import MlflowException

        self._metric = Metric
        try:
            self._client = mlflow.MlflowClient(tracking_uri=cfg.tracking_uri)
            experiment = self._client.get_experiment_by_name(cfg.project)
            experiment_id = experiment.experiment_id if experiment else self._client.create_experiment(cfg.project)
            run = self._client.create_run(experiment_id, run_name=run_dir.name,
                                          tags={"cbir_jax.run_dir": str(run_dir.resolve())})
        except MlflowException as e:  # a store MLflow refuses (e.g. its deprecated file store): one line
            raise LoggerError(f"logger.tracking_uri={cfg.tracking_uri}: {str(e).splitlines()[0]}") from None
        self.run_id = run.info.run_id
        items = [Param(k, str(v)[:6000]) for k, v in params.items()]
        for i in range(0, len(items), 100):  # MLflow takes at most 100 parameters per call
            self._client.log_batch(self.run_id, params=items[i : i + 100])
        log.info("mlflow: run %s in experiment %s (%s)", self.run_id, cfg.project, cfg.tracking_uri)

    def add(self, step: int, values: dict[str, float]) -> None:
        now = int(time.time() * 1000)
        self._client.log_batch(self.run_id, metrics=[self._metric(tag, v, now, step) for tag, v in values.items()])

    def close(self) -> None:
        self._client.set_terminated(self.run_id)


@LOGGERS.register("wandb")
class WandbBackend:
    """A Weights & Biases run writing RUN/wandb/ (offline by default: no account, no network)."""

    def __init__(self, run_dir: Path, cfg: LoggerConfig, params: dict[str, Any]) -> None:
        wandb = _import("wandb", "wandb")
        (run_dir / WANDB_DIR).mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(project=cfg.project, mode=cfg.mode, dir=str(run_dir), name=run_dir.name,
                               config=params, reinit="create_new",
                               settings=wandb.Settings(silent=True, console="off"))

    def add(self, step: int, values: dict[str, float]) -> None:
        self._run.log(values, step=step)

    def close(self) -> None:
        self._run.finish()


class MetricsLog:
    """Appends records to `metrics.jsonl` and the same scalars to the `logger` backend, at the record's step.

    `keep_up_to`: the step training restarts from; records past it are dropped from both (a fresh run that
    keeps nothing passes -1). `params`: the run's config, flat, for backends that record it (MLflow, W&B).
    """

    def __init__(self, run_dir: Path, keep_up_to: int, logger: Optional[LoggerConfig] = None,
                 params: Optional[dict[str, Any]] = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        cfg = logger or LoggerConfig()
        backend = LOGGERS.get(str(cfg.name))(self.run_dir, cfg, params or {})  # before metrics.jsonl is cut
        self._backend = backend
        self._file = open_metrics_log(self.run_dir, keep_up_to)
        for record in read_records(self.run_dir):
            self._add_scalars(record)

    def write(self, record: dict[str, Any]) -> None:
        try:
            self._file.write(json.dumps(record, allow_nan=False) + "\n")
            self._file.flush()
        except OSError as e:  # a full disk: one line naming the file (cli.run_or_exit)
            raise type(e)(e.errno, e.strerror, str(self.run_dir / METRICS_LOG)) from None
        self._add_scalars(record)

    def _add_scalars(self, record: dict[str, Any]) -> None:
        values = scalars(record)
        if values:
            self._backend.add(record["step"], values)

    def close(self) -> None:
        with contextlib.suppress(OSError):  # every record was flushed when written
            self._file.close()
        try:
            self._backend.close()
        except OSError as e:  # a full disk: the logger's files are a view, rebuilt from metrics.jsonl on resume
            log.warning("%s: %s not written (%s)", self.run_dir, type(self._backend).__name__, e.strerror)

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


def flat_params(tree: Any, prefix: str = "") -> dict[str, Any]:
    """A nested config as {"train.learning_rate": 0.001, ...}: what MLflow and W&B show as parameters."""
    if isinstance(tree, dict):
        out: dict[str, Any] = {}
        for k, v in tree.items():
            out.update(flat_params(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: tree}


def _summary_writer_class() -> type:
    """tensorboardX's SummaryWriter, imported without PyTorch: tensorboardX imports torch whenever it is
    installed (to accept torch tensors), which would cost a JAX training run about a second and a second
    thread pool for nothing. Scalars never reach that path."""
    blocked = "torch" not in sys.modules
    if blocked:
        sys.modules["torch"] = None  # an import of torch raises ImportError, which tensorboardX expects
    try:
        from tensorboardX import SummaryWriter
    finally:
        if blocked:
            del sys.modules["torch"]
    return SummaryWriter
