"""The confusion-matrix figure (rows: true bucket, columns: predicted), used by ``rlpredict eval``
and ``ecoserve demo``. Drawn with matplotlib's object API, so it never switches the process's
backend (plots keep showing inline in notebooks)."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from rlpredict.buckets import range_label
from rlpredict.outputs import atomic_path


def plot_confusion(matrix: np.ndarray, edges: Sequence[float | None], title: str, path: str | Path) -> Path:
    """Write a PNG of ``matrix`` (counts), shaded by each true bucket's share; atomically."""
    from matplotlib.figure import Figure

    counts = np.asarray(matrix, dtype=float)
    share = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    labels = [range_label(edges, k) for k in range(len(edges))]
    fig = Figure(figsize=(6.5, 5.5))
    ax = fig.subplots()
    im = ax.imshow(share, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(len(labels)), labels, rotation=45, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("predicted bucket (tokens)")
    ax.set_ylabel("true bucket (tokens)")
    ax.set_title(title, fontsize=9)
    for i in range(share.shape[0]):
        for j in range(share.shape[1]):
            if counts[i, j]:
                ax.text(j, i, f"{share[i, j]:.2f}", ha="center", va="center", fontsize=6,
                        color="white" if share[i, j] > 0.5 else "black")
    fig.colorbar(im, ax=ax, label="share of the true bucket")
    fig.tight_layout()
    with atomic_path(path) as tmp:
        fig.savefig(tmp, dpi=110, format="png")
    return Path(path)
