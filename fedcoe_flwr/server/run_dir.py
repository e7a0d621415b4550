"""A run's results folder, ``<results_dir>/<run_name>``: a new run never overwrites an
earlier one of the same name (that one is moved aside to ``<run_name>.old-<time>``); a
resumed run continues in it."""

from __future__ import annotations

import time
from pathlib import Path

from ..config import ExperimentConfig


class RunDirectory:
    def __init__(self, cfg: ExperimentConfig, base_dir: str | Path = "."):
        self.previous_run: Path | None = None
        results = (Path(base_dir) / cfg.results_dir).resolve()
        self.path = results / cfg.resolved_run_name
        if self.path.parent != results:  # the config check refuses such names; never write outside results_dir
            raise ValueError(f"run name {cfg.resolved_run_name!r} leaves results_dir {results}")
        if not (cfg.resume or cfg.resume_from) and self.path.exists() and any(self.path.iterdir()):
            kept = self.path.with_name(f"{self.path.name}.old-{time.strftime('%Y%m%d-%H%M%S')}")
            self.path.rename(kept)
            self.previous_run = kept
        self.path.mkdir(parents=True, exist_ok=True)
        self.started = time.time()
