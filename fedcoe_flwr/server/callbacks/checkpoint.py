"""Server-state checkpoints: ``checkpoints/round-NNNNN.pt`` after every round (the last
``keep_checkpoints`` kept) and ``final_state.pt`` when the run finishes.

A checkpoint holds tensors and plain data only and is read with
``torch.load(weights_only=True)``: loading one never runs code from the file."""

from __future__ import annotations

import logging
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch

from ...fileio import atomic_write
from .base import Callback

log = logging.getLogger(__name__)
FORMAT = 2


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be used; the message names the file."""


def to_payload(state: Mapping[str, Any]) -> dict[str, Any]:
    """numpy arrays (the server state's extras) become tensors: weights_only loading accepts them."""
    return {**state, "format": FORMAT,
            "extra": {k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in state["extra"].items()}}


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    """The payload of one checkpoint file; CheckpointError names the file and the reason."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint '{path}' does not exist")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # truncated, corrupt, or pickled objects a safe load refuses
        raise CheckpointError(f"checkpoint '{path}' cannot be read safely ({type(err).__name__}: "
                              f"{str(err).splitlines()[0] if str(err) else 'no detail'})") from None
    missing = [k for k in ("round", "arrays", "extra", "config") if not isinstance(payload, dict) or k not in payload]
    if missing:
        raise CheckpointError(f"checkpoint '{path}' lacks {missing}: not a fedcoe-flwr checkpoint of format {FORMAT}")
    payload["extra"] = {k: v.numpy() for k, v in payload["extra"].items()}
    return payload


class Checkpoints(Callback):
    def __init__(self, run_dir: Path, keep: int):
        self.run_dir, self.dir, self.keep = run_dir, run_dir / "checkpoints", keep

    def candidates(self) -> list[Path]:
        """Round checkpoints, newest first."""
        return sorted(self.dir.glob("round-*.pt"), reverse=True)

    def latest(self) -> Path | None:
        found = self.candidates()
        return found[0] if found else None

    def save(self, state: Mapping[str, Any], server_round: int) -> Path:
        path = atomic_write(self.dir / f"round-{server_round:05d}.pt", lambda fh: torch.save(to_payload(state), fh))
        for old in self.candidates()[self.keep:]:
            old.unlink(missing_ok=True)
        return path

    def load_newest(self) -> tuple[dict[str, Any], Path, list[str]] | None:
        """The newest checkpoint that loads, and why each newer one was skipped; None if none loads."""
        skipped = []
        for path in self.candidates():
            try:
                return load_checkpoint(path), path, skipped
            except CheckpointError as err:
                skipped.append(str(err))
                log.warning("skipping %s", err)
        return None

    def on_round_end(self, loop: Any) -> None:
        self.save(loop.checkpoint_payload(), loop.round)

    def on_end(self, loop: Any, status: str) -> None:
        if status == "finished":
            atomic_write(self.run_dir / "final_state.pt", lambda fh: torch.save(to_payload(loop.checkpoint_payload()), fh))


def runs_with_checkpoints(results_dir: Path) -> list[str]:
    """Run names under ``results_dir`` that hold at least one round checkpoint."""
    if not results_dir.is_dir():
        return []
    return sorted(p.name for p in results_dir.iterdir() if p.is_dir() and any((p / "checkpoints").glob("round-*.pt")))
