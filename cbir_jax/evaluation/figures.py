"""The seed-style figure: a query and its top-k, one row per scorer, scores under each image."""

from __future__ import annotations

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
    if title:
        fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=80)
    plt.close(fig)
    return path
