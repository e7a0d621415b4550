"""accuracy.png (the three metrics over rounds) and the method's own plots."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the headless backend is chosen)

from .base import Callback  # noqa: E402

PLOT_KEYS = ("global_accuracy", "personalized_accuracy", "coldstart_accuracy")


def plot_accuracy(history: list[dict[str, Any]], title: str, path: Path) -> Path | None:
    if not history:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    rounds = [h["round"] for h in history]
    for key in PLOT_KEYS:
        values = [h.get(key) for h in history]
        if any(v is not None for v in values):
            ax.plot(rounds, [float("nan") if v is None else v for v in values], marker="o", label=key)
    ax.set_xlabel("round")
    ax.set_ylabel("accuracy")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


class Plots(Callback):
    def __init__(self, run_dir: Path):
        self.run_dir = run_dir

    def on_end(self, loop: Any, status: str) -> None:
        cfg = loop.cfg
        plot_accuracy(loop.history, f"{cfg.algorithm} ({cfg.resolved_run_name})", self.run_dir / "accuracy.png")
        loop.algorithm.write_plots(loop.state, cfg, self.run_dir)
