"""The ServerApp's own record of a run, read from its results folder: ``rounds.jsonl`` (one
line per training round), ``metrics.jsonl`` (one per evaluation) and ``summary.json``.
The orchestrator and the tests judge a run by these files, not by its log text."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from fedcoe_flwr.fileio import read_jsonl


def round_lines(results: Path) -> list[dict[str, Any]]:
    return read_jsonl(results / "rounds.jsonl")


def metrics_lines(results: Path) -> list[dict[str, Any]]:
    return read_jsonl(results / "metrics.jsonl")


def summary(results: Path) -> dict[str, Any]:
    try:
        return dict(json.loads((results / "summary.json").read_text()))
    except (OSError, ValueError):
        return {}


def run_status(results: Path) -> str:
    """'finished', 'failed: ...', 'running' (from summary.json) or 'no summary'."""
    return str(summary(results).get("status", "no summary"))


def rounds_done(results: Path) -> int:
    """The last training round the server aggregated (0: none yet)."""
    return max((int(r["round"]) for r in round_lines(results)), default=0)


def format_metrics(line: dict[str, Any]) -> str:
    """One metrics.jsonl line as `global=... personalised=... cold-start=...`."""
    def fmt(value: Any) -> str:
        return "n/a" if value is None else f"{value:.4f}"

    return (f"global={fmt(line.get('global_accuracy'))} personalised={fmt(line.get('personalized_accuracy'))} "
            f"cold-start={fmt(line.get('coldstart_accuracy'))}")
