"""A run's training metrics, written in one place: `metrics.jsonl` (the record) and TensorBoard (the view).

Both training loops log through `MetricsLog`, so the two never disagree: each record goes to both, and
when a run resumes, `metrics.jsonl` is cut back to the restored step and the event files are rebuilt from
what is kept, so TensorBoard shows each step once, as metrics.jsonl does (`tensorboard --logdir outputs/`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import sys
from pathlib import Path
from types import TracebackType
from typing import Any, TextIO

from cbir_jax.core.files import atomic_write_text

log = logging.getLogger(__name__)
METRICS_LOG = "metrics.jsonl"
TENSORBOARD_DIR = "tensorboard"
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


class MetricsLog:
    """Appends records to `metrics.jsonl` and the same scalars to `RUN/tensorboard/`, at the record's step.

    `keep_up_to`: the step training restarts from; records past it are dropped from both (a fresh run that
    keeps nothing passes -1).
    """

    def __init__(self, run_dir: Path, keep_up_to: int):
        self.run_dir = Path(run_dir)
        self._file = open_metrics_log(self.run_dir, keep_up_to)
        board = self.run_dir / TENSORBOARD_DIR
        for old in board.glob(EVENT_FILES):  # rebuilt below from the records kept: each step once
            old.unlink()
        self._writer = _summary_writer_class()(str(board), flush_secs=FLUSH_SECS)
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
        for tag, value in scalars(record).items():
            self._writer.add_scalar(tag, value, global_step=record["step"])

    def close(self) -> None:
        with contextlib.suppress(OSError):  # every record was flushed when written
            self._file.close()
        try:
            self._writer.close()
        except OSError as e:  # a full disk: the event files are a view, rebuilt from metrics.jsonl on resume
            log.warning("%s: TensorBoard events not written (%s)", self.run_dir / TENSORBOARD_DIR, e.strerror)
            for writer in getattr(self._writer, "all_writers", {}).values():  # tensorboardX's, left as closed:
                with contextlib.suppress(Exception):  # its worker stops and its exit hook does not flush again
                    writer.event_writer._worker.stop()
                writer.event_writer._closed = True

    def __enter__(self) -> "MetricsLog":
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> None:
        self.close()


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
