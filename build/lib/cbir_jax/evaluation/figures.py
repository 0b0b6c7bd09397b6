"""Figures of results: the seed-style top-k grid (a query and its top-k, one row per scorer, scores under each
image), and a bar chart of a metric with error bars (one bar per scorer or configuration)."""

from __future__ import annotations

import math
import textwrap
from pathlib import Path
from typing import Optional, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402


def topk_grid(
    query: np.ndarray,
    rows: dict[str, Sequence[tuple[np.ndarray, float, Optional[bool]]]],
    path: str | Path,
    title: str = "",
) -> Path:
    """Writes a PNG: per scorer, the query then its ranked results; green/red frames mark relevance."""
    k = max(len(r) for r in rows.values())
    fig, axes = plt.subplots(len(rows), k + 1, figsize=(1.6 * (k + 1), 1.9 * len(rows)), squeeze=False)
    for r, (name, results) in enumerate(rows.items()):
        axes[r, 0].imshow(query)
        axes[r, 0].set_title("query", fontsize=8)
        axes[r, 0].set_ylabel(name, fontsize=8, rotation=90)
        for c in range(k):
            ax = axes[r, c + 1]
            if c < len(results):
                image, score, relevant = results[c]
                ax.imshow(image)
                ax.set_title(f"{c + 1}: {score:.3g}", fontsize=7)
                if relevant is not None:
                    for spine in ax.spines.values():
                        spine.set_edgecolor("tab:green" if relevant else "tab:red")
                        spine.set_linewidth(3)
        for ax in axes[r]:
            ax.set_xticks([])
            ax.set_yticks([])
    return save(fig, path, dpi=80, suptitle=title)


def save(fig: plt.Figure, path: str | Path, dpi: int = 100, suptitle: str = "") -> Path:
    """Titles, lays out and writes `fig` as a PNG, then frees it (pyplot keeps every open figure)."""
    if suptitle:
        fig.suptitle(suptitle, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=dpi)
    plt.close(fig)
    return path


def bar_chart(
    bars: Sequence[tuple[str, float, float, bool]], path: str | Path, xlabel: str, title: str = ""
) -> Path:
    """Writes a PNG of horizontal bars, top to bottom in the given order: (label, value, error, highlighted).
    A NaN error (a single job) draws no error bar; highlighted bars (learned scorers) stand out from the
    grey ones (baselines). Values are printed at the bars' ends, so the chart reads without the table."""
    labels = [b[0] for b in bars]
    values = np.array([b[1] for b in bars], np.float64)
    errors = np.array([b[2] for b in bars], np.float64)
    fig, ax = plt.subplots(figsize=(8.0, 1.0 + 0.42 * len(bars)))
    y = np.arange(len(bars))
    colors = ["tab:blue" if b[3] else "0.6" for b in bars]
    ax.barh(y, np.nan_to_num(values), xerr=np.where(np.isnan(errors), 0.0, errors), color=colors,
            error_kw={"ecolor": "black", "capsize": 3, "linewidth": 1})
    for i, (value, error) in enumerate(zip(values, errors)):
        text = "nan" if math.isnan(value) else f"{value:.4f}" + ("" if math.isnan(error) else f" ± {error:.4f}")
        ax.text(np.nan_to_num(value) + np.nan_to_num(error), i, f"  {text}", va="center", fontsize=8)
    ax.set_yticks(y, labels, fontsize=8)
    ax.invert_yaxis()
    top = np.nanmax(values + np.nan_to_num(errors)) if np.isfinite(values).any() else 1.0
    ax.set_xlim(0, top * 1.3 if top > 0 else 1.0)  # room for the printed values
    ax.set_xlabel(xlabel, fontsize=9)
    ax.grid(axis="x", alpha=0.3)
    if title:
        ax.set_title(textwrap.fill(title, 90), fontsize=9)  # a sweep's shared overrides make long titles
    return save(fig, path)
