"""metrics.jsonl (one line per evaluation) and rounds.jsonl (one line per round)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ...fileio import append_jsonl, atomic_write
from .base import Callback


class MetricsFiles(Callback):
    def __init__(self, run_dir: Path):
        self.metrics_path = run_dir / "metrics.jsonl"
        self.rounds_path = run_dir / "rounds.jsonl"

    def on_start(self, loop: Any) -> None:
        # after a resume the files hold exactly what the checkpoint knew: a round the
        # crashed segment logged after its last checkpoint is not logged twice
        if loop.round:
            atomic_write(self.metrics_path, "".join(json.dumps(m) + "\n" for m in loop.history))
            atomic_write(self.rounds_path, "".join(json.dumps(r) + "\n" for r in loop.round_log))

    def on_round(self, loop: Any, record: dict[str, Any]) -> None:
        append_jsonl(self.rounds_path, record)

    def on_evaluation(self, loop: Any, record: dict[str, Any]) -> None:
        append_jsonl(self.metrics_path, record)
