"""Results on disk: metrics.jsonl (one line per evaluation), rounds.jsonl (one line per
round), summary.json, the accuracy-curve PNG and atomic server-state checkpoints."""

from __future__ import annotations

import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from .config import ExperimentConfig

PLOT_KEYS = ("global_accuracy", "personalized_accuracy", "coldstart_accuracy")


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def versions() -> dict[str, str]:
    import flwr
    import numpy

    return {"python": platform.python_version(), "flwr": flwr.__version__, "torch": torch.__version__,
            "numpy": numpy.__version__, "cuda": str(torch.cuda.is_available())}


class ResultsWriter:
    def __init__(self, cfg: ExperimentConfig, base_dir: str | os.PathLike = "."):
        self.cfg = cfg
        self.previous_run: Path | None = None
        self.dir = (Path(base_dir) / cfg.results_dir / cfg.resolved_run_name).resolve()
        if not (cfg.resume or cfg.resume_from) and self.dir.exists() and any(self.dir.iterdir()):
            # a fresh run never overwrites an earlier one: that one is kept beside it
            kept = self.dir.with_name(f"{self.dir.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
            self.dir.rename(kept)
            self.previous_run = kept
        self.checkpoint_dir = self.dir / "checkpoints"
        self.checkpoint_dir.mkdir(parents=True, exist_ok=True)
        self.metrics_path = self.dir / "metrics.jsonl"
        self.rounds_path = self.dir / "rounds.jsonl"
        self.started = time.time()

    # ---- line logs
    def _append(self, path: Path, record: dict[str, Any]) -> None:
        with open(path, "a") as fh:
            fh.write(json.dumps(record) + "\n")
            fh.flush()
            os.fsync(fh.fileno())

    def log_metrics(self, record: dict[str, Any]) -> None:
        self._append(self.metrics_path, record)

    def log_round(self, record: dict[str, Any]) -> None:
        self._append(self.rounds_path, record)

    def rewrite_history(self, metrics: list[dict[str, Any]], rounds: list[dict[str, Any]]) -> None:
        """After a resume: the logs hold exactly what the checkpoint knew."""
        _atomic_write_text(self.metrics_path, "".join(json.dumps(m) + "\n" for m in metrics))
        _atomic_write_text(self.rounds_path, "".join(json.dumps(r) + "\n" for r in rounds))

    # ---- summary and plot
    def write_summary(self, status: str, history: list[dict[str, Any]], extra: dict[str, Any]) -> Path:
        summary = {
            "run_name": self.cfg.resolved_run_name,
            "status": status,
            "algorithm": self.cfg.algorithm,
            "seed": self.cfg.seed,
            "config": self.cfg.to_dict(),
            "final": history[-1] if history else {},
            "wall_time_s": round(time.time() - self.started, 2),
            "versions": versions(),
            **extra,
        }
        path = self.dir / "summary.json"
        _atomic_write_text(path, json.dumps(summary, indent=2))
        return path

    def plot(self, history: list[dict[str, Any]]) -> Path | None:
        if not history:
            return None
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        fig, ax = plt.subplots(figsize=(6, 4))
        rounds = [h["round"] for h in history]
        for key in PLOT_KEYS:
            values = [h.get(key) for h in history]
            if any(v is not None for v in values):
                ax.plot(rounds, [float("nan") if v is None else v for v in values], marker="o", label=key)
        ax.set_xlabel("round")
        ax.set_ylabel("accuracy")
        ax.set_title(f"{self.cfg.algorithm} ({self.cfg.resolved_run_name})")
        ax.grid(alpha=0.3)
        ax.legend()
        path = self.dir / "accuracy.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        return path

    def plot_correlation(self, correlation: Any, known: Any) -> Path | None:
        """The client x expert correlation matrix at the end of the run (rows of clients
        never trained are left blank)."""
        import matplotlib
        import numpy as np

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        matrix = np.where(np.asarray(known)[:, None], np.asarray(correlation, dtype=float), np.nan)
        fig, ax = plt.subplots(figsize=(1.2 + 0.5 * matrix.shape[1], 1.5 + 0.25 * matrix.shape[0]))
        image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_xlabel("expert")
        ax.set_ylabel("client")
        ax.set_xticks(range(matrix.shape[1]))
        ax.set_title("correlation (mean gate prob.)")
        fig.colorbar(image, ax=ax)
        path = self.dir / "correlation.png"
        fig.savefig(path, dpi=100, bbox_inches="tight")
        plt.close(fig)
        return path

    # ---- checkpoints
    def save_checkpoint(self, payload: dict[str, Any], server_round: int) -> Path:
        path = self.checkpoint_dir / f"round-{server_round:05d}.pt"
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        torch.save(payload, tmp)
        os.replace(tmp, path)
        for old in sorted(self.checkpoint_dir.glob("round-*.pt"))[: -self.cfg.keep_checkpoints]:
            old.unlink(missing_ok=True)
        return path

    def latest_checkpoint(self) -> Path | None:
        found = sorted(self.checkpoint_dir.glob("round-*.pt"))
        return found[-1] if found else None

    def save_final_state(self, payload: dict[str, Any]) -> Path:
        path = self.dir / "final_state.pt"
        tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
        torch.save(payload, tmp)
        os.replace(tmp, path)
        return path
