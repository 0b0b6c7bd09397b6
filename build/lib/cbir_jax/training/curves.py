"""`curves.png`: a run's training loss per logged step and its validation MAP@R per epoch.

Drawn from the run's `metrics.jsonl`, not from the loop's memory, so the figure of a resumed run shows the
whole run (the records before the resume too) and always agrees with the log.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import matplotlib.pyplot as plt

from cbir_jax.evaluation import figures  # selects the Agg backend before pyplot draws anything
from cbir_jax.training.metrics_log import read_records

CURVES_FILE = "curves.png"
VAL_KEY = "val_map_at_r"  # the metric validation selects by (selection.py, rerank_training.py)
LOG_SCALE_SPREAD = 30.0  # a positive loss spanning more than this factor is drawn on a log axis


def _finite(record: dict[str, Any], key: str) -> bool:
    value = record.get(key)
    return isinstance(value, (int, float)) and math.isfinite(value)


def plot_curves(records: list[dict[str, Any]], path: Path, title: str = "") -> Path:
    """Writes the figure: the loss on top; below it, where there are validation records, MAP@R at the
    step each was measured, its best marked (the epochs they close label the figure's top axis)."""
    loss = [(r["step"], r["loss"]) for r in records if _finite(r, "loss")]
    val = [(r["step"], r.get("epoch"), r[VAL_KEY]) for r in records if _finite(r, VAL_KEY)]
    fig, axes = plt.subplots(2 if val else 1, 1, sharex=True, figsize=(7.0, 5.2 if val else 3.0), squeeze=False)
    ax = axes[0, 0]
    if loss:
        steps, values = zip(*loss)
        ax.plot(steps, values, color="tab:blue", marker="." if len(loss) < 40 else None, linewidth=1.2)
        if min(values) > 0 and max(values) / min(values) > LOG_SCALE_SPREAD:
            ax.set_yscale("log")
    else:
        ax.text(0.5, 0.5, "no training step logged", transform=ax.transAxes, ha="center", va="center")
    ax.set_ylabel("training loss")
    for step, _, _ in val:  # validation happens at epoch ends: the loss panel shows where they lie
        ax.axvline(step, color="0.85", linewidth=0.8, zorder=0)
    ax.grid(axis="y", alpha=0.3)
    if val:
        _plot_validation(axes[1, 0], val)
        _label_epochs(axes[0, 0], val)
    axes[-1, 0].set_xlabel("step")
    return figures.save(fig, path, suptitle=title)


def _plot_validation(ax: plt.Axes, val: list[tuple[int, Any, float]]) -> None:
    steps, epochs, values = zip(*val)
    ax.plot(steps, values, color="tab:orange", marker="o", linewidth=1.2)
    best = max(range(len(values)), key=lambda i: (values[i], -i))  # the first of equal bests, as selection keeps
    ax.plot(steps[best], values[best], marker="*", markersize=14, color="tab:red", linestyle="none",
            label=f"best {values[best]:.4f}" + (f" (epoch {epochs[best]})" if epochs[best] is not None else ""))
    ax.set_ylabel("validation MAP@R")
    ax.grid(alpha=0.3)
    ax.legend(loc="best", fontsize=8)


def _label_epochs(ax: plt.Axes, val: list[tuple[int, Any, float]]) -> None:
    steps, epochs, _ = zip(*val)
    if any(e is None for e in epochs):
        return
    top = ax.twiny()
    top.set_xlim(ax.get_xlim())
    top.set_xticks(steps, [str(e) for e in epochs], fontsize=8)
    top.set_xlabel("epochs done", fontsize=8)


def write_curves(run_dir: Path, title: str = "") -> Path:
    """`RUN/curves.png` from `RUN/metrics.jsonl`."""
    run_dir = Path(run_dir)
    return plot_curves(read_records(run_dir), run_dir / CURVES_FILE, title)
