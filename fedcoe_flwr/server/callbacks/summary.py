"""summary.json: the run's status, config, final and best evaluated figures, timings and
versions; rewritten after every evaluation and when the run stops, however it stops."""

from __future__ import annotations

import json
import platform
from pathlib import Path
from typing import Any

import flwr
import numpy
import torch

from ...fileio import atomic_write
from .base import Callback

HEADLINE = ("global_accuracy", "personalized_accuracy", "coldstart_accuracy")


def versions() -> dict[str, str]:
    return {"python": platform.python_version(), "flwr": flwr.__version__, "torch": torch.__version__,
            "numpy": numpy.__version__, "cuda": str(torch.cuda.is_available())}


def best_of(scored: list[tuple[float, int]]) -> tuple[float, int] | None:
    """The highest (value, round); of equal values the earliest round; None when empty."""
    return max(scored, key=lambda t: (t[0], -t[1])) if scored else None


def best_round(history: list[dict[str, Any]]) -> dict[str, Any]:
    """For each headline metric, the best evaluated value and its round."""
    out: dict[str, Any] = {}
    for key in HEADLINE:
        best = best_of([(h[key], h["round"]) for h in history if isinstance(h.get(key), (int, float))])
        if best:
            out[key] = {"value": best[0], "round": best[1]}
    return out


class Summary(Callback):
    def __init__(self, run_dir: Path):
        self.path = run_dir / "summary.json"

    def write(self, loop: Any, status: str) -> Path:
        cfg = loop.cfg
        summary = {
            "run_name": cfg.resolved_run_name, "status": status, "algorithm": cfg.algorithm, "seed": cfg.seed,
            "config": cfg.to_dict(), "final": loop.history[-1] if loop.history else {},
            "best": best_round(loop.history),
            "wall_time_s": round(loop.elapsed(), 2), "segments": loop.segments,
            "versions": versions(), "communication": dict(loop.messenger.comm),
            "rounds_completed": loop.round, "checkpoint": str(loop.checkpoints.latest() or ""),
        }
        if loop.failure:
            summary["failure"] = loop.failure
        return atomic_write(self.path, json.dumps(summary, indent=2, default=float))

    def on_evaluation(self, loop: Any, record: dict[str, Any]) -> None:
        self.write(loop, "running")

    def on_end(self, loop: Any, status: str) -> None:
        self.write(loop, status)
