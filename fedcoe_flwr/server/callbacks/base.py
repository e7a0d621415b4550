"""The hooks the round loop calls; ``loop`` is the running ``RoundLoop`` (read it, never
change it)."""

from __future__ import annotations

from typing import Any


class Callback:
    def on_start(self, loop: Any) -> None:
        """Before round 1 (or the first round after a resume)."""

    def on_round(self, loop: Any, record: dict[str, Any]) -> None:
        """A round was aggregated; ``record`` is its line of rounds.jsonl."""

    def on_evaluation(self, loop: Any, record: dict[str, Any]) -> None:
        """An evaluation finished; ``record`` is its line of metrics.jsonl."""

    def on_round_end(self, loop: Any) -> None:
        """The round is complete (training and, when due, evaluation)."""

    def on_end(self, loop: Any, status: str) -> None:
        """The run stopped: ``finished``, or ``interrupted`` / ``failed: ...``."""
