"""FedCoE's picture of its final state: the client x expert correlation matrix."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib
import numpy as np

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the headless backend is chosen)


def plot_correlation(correlation: Any, known: Any, path: Path) -> Path:
    """Rows of clients that never trained are left blank."""
    matrix = np.where(np.asarray(known)[:, None], np.asarray(correlation, dtype=float), np.nan)
    fig, ax = plt.subplots(figsize=(1.2 + 0.5 * matrix.shape[1], 1.5 + 0.25 * matrix.shape[0]))
    image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0, vmax=1)
    ax.set_xlabel("expert")
    ax.set_ylabel("client")
    ax.set_xticks(range(matrix.shape[1]))
    ax.set_title("correlation (mean gate prob.)")
    fig.colorbar(image, ax=ax)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
