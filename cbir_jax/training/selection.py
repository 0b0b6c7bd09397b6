"""Validation and model selection: MAP@R on validation classes, the best parameters kept, early stopping.

The validation rows come from the training side (`data.split.val_fraction`, cbir_jax/data/splits.py), so the
held-out categories are never looked at before the final table. The best parameters are kept in an Orbax
manager of their own (`RUN/best/`, one checkpoint), beside `best.json` with the step, the value and the
history, so `evaluate checkpoint=RUN` can use them and a resumed run continues the same selection.

Order of writes (so a kill anywhere leaves a consistent run): the best parameters are saved and committed
(`checkpointing.Checkpoints`, waited for) before `best.json` names them, and `best.json` is written
atomically before the validation's record reaches metrics.jsonl. A resume cuts the history back to the
restored step and re-validates where `best/` does not hold the best step intact.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
from pathlib import Path
from typing import Any, Callable, Optional

import jax
import numpy as np

from cbir_jax.core.errors import CheckpointError, ConfigError
from cbir_jax.core.files import atomic_write_text
from cbir_jax.features.stage import as_gallery
from cbir_jax.training import checkpointing
from cbir_jax.evaluation.retrieval import leave_one_out
from cbir_jax.scoring.scorers import Scorer

log = logging.getLogger(__name__)
BEST_DIR = "best"
BEST_FILE = "best.json"


@dataclasses.dataclass(frozen=True)
class Validator:
    """Leave-one-out retrieval metrics of a scorer on the validation rows (each a query against the others)."""

    features: np.ndarray
    labels: np.ndarray

    def __call__(self, scorer: Scorer) -> dict[str, float]:
        return leave_one_out(scorer, self.features, self.labels)


def improved(value: float, best: Optional[float], min_delta: float = 0.0) -> bool:
    """Higher is better; a NaN never improves; the first finite value always does."""
    if value is None or math.isnan(value):
        return False
    return best is None or value > best + min_delta


@dataclasses.dataclass
class Selection:
    """Best-so-far bookkeeping, persisted as best.json (so a resumed run keeps selecting the same way)."""

    metric: str
    best_value: Optional[float] = None
    best_step: Optional[int] = None
    best_epoch: Optional[int] = None
    evaluations_since_best: int = 0
    history: list = dataclasses.field(default_factory=list)

    def record(self, step: int, epoch: int, value: float, logged: dict | None = None) -> bool:
        """Adds one validation result (and the record it logged); True if it is the new best."""
        self.history.append({"step": step, "epoch": epoch, "value": value, **({"record": logged} if logged else {})})
        if improved(value, self.best_value):
            self.best_value, self.best_step, self.best_epoch = value, step, epoch
            self.evaluations_since_best = 0
            return True
        self.evaluations_since_best += 1
        return False

    def up_to(self, step: int) -> "Selection":
        """The selection as it stood at `step` (a resume from an earlier checkpoint redoes what came after)."""
        out = Selection(metric=self.metric)
        for h in self.history:
            if h["step"] <= step:
                out.record(h["step"], h["epoch"], h["value"], h.get("record"))
        return out

    def should_stop(self, patience: Optional[int]) -> bool:
        """Early stopping: `patience` validations in a row without a new best (None: never)."""
        return patience is not None and self.evaluations_since_best >= patience

    def save(self, run_dir: Path) -> None:
        atomic_write_text(Path(run_dir) / BEST_FILE, json.dumps(dataclasses.asdict(self), indent=2))

    @classmethod
    def load(cls, run_dir: Path, metric: str) -> "Selection":
        """best.json, or a fresh selection where there is none; a damaged file is one line naming it."""
        path = Path(run_dir) / BEST_FILE
        if not path.exists():
            return cls(metric=metric)
        try:
            data = json.loads(path.read_bytes())
            sel = cls(**data)
            for h in sel.history:
                if not (isinstance(h["step"], int) and isinstance(h["epoch"], int)
                        and isinstance(h["value"], (int, float, type(None)))):
                    raise TypeError
        except (ValueError, UnicodeDecodeError, TypeError, KeyError):
            raise CheckpointError(f"{path} is damaged; move it aside to re-validate from the checkpoints") from None
        return sel


class BestKeeper:
    """Validates after each epoch (and before the first step), keeps the best parameters on disk."""

    def __init__(self, run_dir: Path, validator: Validator, make_scorer: Callable[[Any], Scorer], metric: str = "map_at_r"):
        self.run_dir = Path(run_dir)
        self.validator = validator
        self.make_scorer = make_scorer
        self.metric = metric
        self.selection = Selection.load(self.run_dir, metric)
        self.checkpoints = checkpointing.Checkpoints(self.run_dir, BEST_DIR, max_to_keep=1)
        self.best_params: Any = None  # a host copy of the best found in this process (None after a resume)

    def _measure(self, step: int, epoch: int, params: Any) -> tuple[float, dict[str, Any]]:
        metrics = self.validator(self.make_scorer(params))
        record = {f"val_{k}": v for k, v in metrics.items() if k != "skipped_queries"}
        return metrics[self.metric], {"step": step, "epoch": epoch, **record}

    def validate(self, step: int, epoch: int, params: Any) -> dict[str, float]:
        """Validation metrics of `params`; saves them as the best if they are. Returns the record to log
        (without step and epoch, which the loop adds)."""
        value, record = self._measure(step, epoch, params)
        is_best = improved(value, self.selection.best_value)
        record["best_step"] = step if is_best else self.selection.best_step
        if is_best:  # saved and committed before best.json names it
            self.checkpoints.save(step, {"params": params}, wait=True)
            self.best_params = jax.device_get(params)
        self.selection.record(step, epoch, value, record)
        self.selection.save(self.run_dir)
        return {k: v for k, v in record.items() if k not in ("step", "epoch")}

    def record_of(self, step: int) -> dict[str, Any]:
        """The record a validation at `step` logged (kept in best.json, for a kill before it reached the log)."""
        h = next(h for h in self.selection.history if h["step"] == step)
        return h.get("record") or {"step": step, "epoch": h["epoch"], f"val_{self.metric}": h["value"],
                                   "best_step": self.selection.best_step}

    def already_validated(self, step: int) -> bool:
        return any(h["step"] == step for h in self.selection.history)

    def resume(self, step: int, epoch: int, known: dict[int, Any], checkpoints: "checkpointing.Checkpoints") -> None:
        """Continues the selection from `step`: the history is cut back to it, and where `best/` does not
        hold the best step intact (a kill mid-save, a damaged file), that step is validated again from the
        parameters at hand (`known`: step -> params, e.g. the initial and the restored ones, or a kept
        checkpoint); failing that, the restored parameters become the best so far, saying so."""
        self.selection = self.selection.up_to(step)
        best = self.selection.best_step
        if best is None or self._best_intact(best, known[step]):
            return
        params = known.get(best)
        if params is None and best in checkpoints.committed_steps():
            try:
                _, out = checkpoints.restore({"params": known[step]}, steps=[best])
                params = out["params"]
            except CheckpointError:
                params = None
        if params is not None:
            value, _ = self._measure(best, self.selection.best_epoch, params)
            log.warning("%s does not hold the best step %d intact: validated it again (%s %.4f) and saved it",
                        self.checkpoints.dir, best, self.metric, value)
            self.checkpoints.save(best, {"params": params}, wait=True)
            self.selection.best_value = value
        else:
            value, _ = self._measure(step, epoch, known[step])
            log.warning("%s does not hold the best step %d intact and its parameters are gone: the restored step %d "
                        "(%s %.4f) is the best so far", self.checkpoints.dir, best, step, self.metric, value)
            self.checkpoints.save(step, {"params": known[step]}, wait=True)
            self.selection.best_value, self.selection.best_step, self.selection.best_epoch = value, step, epoch
            self.selection.evaluations_since_best = 0
        self.selection.save(self.run_dir)

    def _best_intact(self, best: int, like: Any) -> bool:
        if self.checkpoints.latest_intact_step() != best:
            return False
        try:  # the hash check itself: a flipped bit is not intact
            self.checkpoints.restore({"params": like}, steps=[best])
        except CheckpointError:
            return False
        return True

    def close(self) -> None:
        self.checkpoints.close()


def describe(sel: Selection, base: Optional[str] = None) -> str:
    """One line on what validation selected; says so plainly when it kept the starting point."""
    if sel.best_step is None:
        return ""
    values = [h["value"] for h in sel.history]
    line = (f"validation {sel.metric}: start {values[0]:.4f}, best {sel.best_value:.4f} at step {sel.best_step} "
            f"(epoch {sel.best_epoch}), last {values[-1]:.4f}")
    if sel.best_step == 0 and base:
        line += (f". Training never beat the starting point on the validation classes, so the head kept is "
                 f"exactly its base metric ({base}).")
    return line


def make_keeper(cfg, stage, make_scorer: Callable[[Any], Scorer], out_dir: Path, min_rows: int = 1) -> Optional[BestKeeper]:
    """A BestKeeper over the split's validation rows (post-processed as a gallery of their own, as evaluation
    does), scoring parameters with `make_scorer`; None where the split has fewer than `min_rows`."""
    fs, rows = stage.features, stage.split.val
    if len(rows) < max(min_rows, 1):
        if cfg.train.patience is not None:
            raise ConfigError("train.patience needs validation rows: set data.split.val_fraction > 0")
        return None
    validator = Validator(as_gallery(cfg, fs.features[rows]), fs.labels[rows])
    return BestKeeper(out_dir, validator, make_scorer)


def selected_params(select: str, run: Path, last_params: Any, keeper: Optional[BestKeeper] = None) -> Any:
    """The parameters `eval.select` names: `last_params`, or the run's best-on-validation ones if it has them
    (from `keeper`'s host copy when it holds one, else from RUN/best)."""
    if checkpointing.resolve(run, select) == "last":
        return last_params
    if keeper is not None and keeper.best_params is not None:
        return keeper.best_params
    return checkpointing.restore_params(run, last_params, "best")
