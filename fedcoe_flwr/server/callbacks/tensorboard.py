"""TensorBoard event files for every run, in ``<run_dir>/tb/`` (step = round):

- ``accuracy/global``, ``accuracy/personalised`` (sample-weighted), ``accuracy/personalised_mean``,
  ``accuracy/personalised_p10``, ``accuracy/coldstart`` and every variant the evaluation
  measured (``accuracy/global_raw`` or ``_balanced``, ``accuracy/coldstart_<adaptation>``);
  the histogram ``accuracy/personalised_per_client``;
- ``train/loss``, ``train/replies`` (valid updates aggregated);
- ``communication/train_bytes_down`` and ``train_bytes_up`` (the round's training traffic),
  ``communication/<counter>_total`` at each evaluation (every byte so far, evaluation included);
- ``time/round_s`` (sampling to aggregation, rounds.jsonl ``time_s``), ``time/client_train_s``,
  ``time/elapsed_s``;
- ``diagnostics/<key>``: every other number the method puts in a round or evaluation record, a
  list as one scalar per entry (``diagnostics/expert_usage/0``, ...).

The values are those of rounds.jsonl and metrics.jsonl, and so are the steps: a resumed run
deletes the event files and writes what its checkpoint knows again before it continues, so a
round the interrupted segment logged after its last checkpoint is never shown twice (TensorBoard
keeps every value of a step it reads). Events are flushed after every round, before the
checkpoint of that round is written, and the writer is closed when the run stops."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Iterable

import numpy as np
from torch.utils.tensorboard import SummaryWriter

from .base import Callback

TB_DIR = "tb"  # under the run's folder; the comparison runner links these
ACCURACY_KEYS = ("global_accuracy", "personalized_accuracy", "coldstart_accuracy")
PER_CLIENT_KEY = "personalized_accuracy_per_client"
# Round-record keys the loop writes itself; every other key is the method's diagnostics.
ROUND_KEYS = frozenset({"round", "train_loss", "clients", "client_train_s", "replies", "failed", "rejected",
                        "errors", "train_bytes_down", "bytes_down_total", "bytes_up_total", "started_at",
                        "aggregated_at", "time_s"})
# Evaluation-record keys that are not diagnostics (communication counters are logged as totals).
EVALUATION_KEYS = frozenset({"round", "train_loss", "elapsed_s"})
COMM_COUNTERS = ("bytes_down", "bytes_up", "bytes_p2p_relayed", "bytes_eval_up")


def accuracy_tag(key: str) -> str:
    """``personalized_accuracy_p10`` -> ``accuracy/personalised_p10``; ``global_accuracy`` -> ``accuracy/global``."""
    head, _, variant = key.partition("_accuracy")
    name = "personalised" if head == "personalized" else head
    return f"accuracy/{name}{variant}"


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


def diagnostic_scalars(key: str, value: Any) -> Iterable[tuple[str, float]]:
    """A number as one scalar, a flat list of numbers as one scalar per entry; anything else
    (text, lists of lists such as the cold-start routing rows) is not a curve and is left out."""
    if is_number(value):
        yield f"diagnostics/{key}", float(value)
    elif isinstance(value, (list, tuple)) and value and all(is_number(v) for v in value):
        for i, v in enumerate(value):
            yield f"diagnostics/{key}/{i}", float(v)


def round_scalars(record: dict[str, Any], previous: dict[str, Any] | None) -> dict[str, float]:
    """The scalars of one rounds.jsonl line; ``previous``: the line before it (for bytes up)."""
    out = {"train/loss": record.get("train_loss"), "train/replies": record.get("replies"),
           "time/round_s": record.get("time_s"), "time/client_train_s": record.get("client_train_s"),
           "communication/train_bytes_down": record.get("train_bytes_down")}
    if record.get("bytes_up_total") is not None:  # only training replies count as bytes up
        out["communication/train_bytes_up"] = record["bytes_up_total"] - (previous or {}).get("bytes_up_total", 0)
    for key, value in record.items():
        if key not in ROUND_KEYS:
            out.update(diagnostic_scalars(key, value))
    return {tag: float(v) for tag, v in out.items() if is_number(v) and np.isfinite(v)}


def evaluation_scalars(record: dict[str, Any]) -> dict[str, float]:
    """The scalars of one metrics.jsonl line (the per-client accuracies are a histogram)."""
    out: dict[str, Any] = {"time/elapsed_s": record.get("elapsed_s")}
    for key, value in record.items():
        if key == PER_CLIENT_KEY or key in EVALUATION_KEYS:
            continue
        if key.startswith(ACCURACY_KEYS):
            out[accuracy_tag(key)] = value
        elif key in COMM_COUNTERS:
            out[f"communication/{key}_total"] = value
        else:
            out.update(diagnostic_scalars(key, value))
    return {tag: float(v) for tag, v in out.items() if is_number(v) and np.isfinite(v)}


class TensorBoard(Callback):
    def __init__(self, run_dir: Path):
        self.dir = run_dir / TB_DIR
        self.writer: SummaryWriter | None = None

    def on_start(self, loop: Any) -> None:
        if loop.round:  # resumed: the checkpoint's records replace whatever the stopped segment wrote
            for old in self.dir.glob("events.out.tfevents.*"):
                old.unlink()
        when = {r["round"]: r.get("aggregated_at") for r in loop.round_log}
        for i, record in enumerate(loop.round_log):
            self.log_round(record, loop.round_log[i - 1] if i else None, record.get("aggregated_at"))
        for record in loop.history:
            self.log_evaluation(record, when.get(record["round"]))
        self.open().flush()

    def open(self) -> SummaryWriter:
        """The writer, opened on first use (a test may drive the loop's rounds without ``start``)."""
        if self.writer is None:
            self.writer = SummaryWriter(str(self.dir))
        return self.writer

    def log_round(self, record: dict[str, Any], previous: dict[str, Any] | None,
                  walltime: float | None = None) -> None:
        for tag, value in round_scalars(record, previous).items():
            self.open().add_scalar(tag, value, record["round"], walltime=walltime)

    def log_evaluation(self, record: dict[str, Any], walltime: float | None = None) -> None:
        step = record["round"]
        for tag, value in evaluation_scalars(record).items():
            self.open().add_scalar(tag, value, step, walltime=walltime)
        per_client = record.get(PER_CLIENT_KEY)
        if per_client:
            self.open().add_histogram(accuracy_tag(PER_CLIENT_KEY), np.asarray(per_client, dtype=float), step,
                                      walltime=walltime)

    def on_round(self, loop: Any, record: dict[str, Any]) -> None:
        self.log_round(record, loop.round_log[-2] if len(loop.round_log) > 1 else None)

    def on_evaluation(self, loop: Any, record: dict[str, Any]) -> None:
        self.log_evaluation(record)
        self.open().flush()

    def on_round_end(self, loop: Any) -> None:
        self.open().flush()  # before the round's checkpoint: what a resume restores is on disk here too

    def on_end(self, loop: Any, status: str) -> None:
        if self.writer is not None:
            self.writer.close()
            self.writer = None
