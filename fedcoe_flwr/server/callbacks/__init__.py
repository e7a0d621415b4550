"""What a run leaves on disk, one concern per file; the round loop calls each callback's
hooks (``base.Callback``) and knows nothing of files.

The callbacks load on first use: a ClientApp imports ``checkpoint`` (for its error type) and
must not pay for matplotlib and TensorBoard at every start-up (one process per message)."""

from __future__ import annotations

from importlib import import_module
from typing import Any

_WHERE = {"Callback": "base", "Checkpoints": "checkpoint", "CheckpointError": "checkpoint",
          "MetricsFiles": "metrics_files", "Plots": "plots", "Summary": "summary", "TensorBoard": "tensorboard"}

__all__ = list(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(import_module(f".{_WHERE[name]}", __name__), name)
