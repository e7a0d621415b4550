"""A run's results folder, ``<results_dir>/<run_name>``: a new run never overwrites an
earlier one of the same name (that one is moved aside to ``<run_name>.old-<time>``); a
resumed run continues in it. While a run is live it holds a lock on its folder
(``LOCK_FILE``, released when it ends or its process dies), so a second run of the same name,
new or resumed, stops with a reason instead of moving or writing into the live run's folder."""

from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path
from typing import IO

from ..config import ExperimentConfig

LOCK_FILE = ".in-use"


class RunInUseError(RuntimeError):
    """Another live process is writing the run's folder."""


def lock_folder(path: Path) -> IO[str] | None:
    """An open, exclusively locked ``path/LOCK_FILE``, or None when another process holds it."""
    handle = open(path / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.close()
        return None
    return handle


def in_use(path: Path) -> RunInUseError:
    """The error for a run folder another live process holds, naming that process."""
    try:
        holder = (path / LOCK_FILE).read_text().strip() or "unknown"
    except OSError:
        holder = "unknown"
    return RunInUseError(f"run '{path.name}' in {path.parent} is in use by a live run ({holder}): "
                         "wait for it to end, or give this run another run_name")


class RunDirectory:
    def __init__(self, cfg: ExperimentConfig, base_dir: str | Path = "."):
        self.previous_run: Path | None = None
        results = (Path(base_dir) / cfg.results_dir).resolve()
        self.path = results / cfg.resolved_run_name
        if self.path.parent != results:  # the config check refuses such names; never write outside results_dir
            raise ValueError(f"run name {cfg.resolved_run_name!r} leaves results_dir {results}")
        if self.path.is_dir() and (self.path / LOCK_FILE).exists():
            probe = lock_folder(self.path)
            if probe is None:
                raise in_use(self.path)
            probe.close()
        if not (cfg.resume or cfg.resume_from) and self.path.exists() and any(self.path.iterdir()):
            stamp = f"{self.path.name}.old-{time.strftime('%Y%m%d-%H%M%S')}"
            kept = self.path.with_name(stamp)
            for n in range(1, 1000):  # two runs moved aside within one second keep both
                if not kept.exists():
                    break
                kept = self.path.with_name(f"{stamp}-{n}")
            self.path.rename(kept)
            self.previous_run = kept
        self.path.mkdir(parents=True, exist_ok=True)
        self._lock = lock_folder(self.path)
        if self._lock is None:  # another run took the folder between the check and now
            raise in_use(self.path)
        self._lock.truncate(0)
        self._lock.write(f"process {os.getpid()} on {os.uname().nodename}, since "
                         f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
        self._lock.flush()
        self.started = time.time()

    def release(self) -> None:
        """The run has ended: another run may take its name (idempotent)."""
        if self._lock is not None:
            self._lock.close()
            self._lock = None
