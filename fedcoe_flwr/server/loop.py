"""The round loop: sample clients, send each its own payload, validate the replies, let
the method aggregate, evaluate every ``eval_every`` rounds, and hand every record to the
callbacks (files, checkpoints, summary, plots).

It replaces Flower's ``Strategy.start`` rather than subclassing ``Strategy``: every
client gets its own payload (FedCoE sends each client only its expert set) and an
evaluation may take two exchanges (the new-client model of some methods averages the
training clients' private parts first)."""

from __future__ import annotations

import json
import signal
import threading
import time
from logging import ERROR, INFO, WARNING
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord, Message
from flwr.common.logger import log
from flwr.serverapp import Grid

from ..algorithms import get_algorithm
from ..algorithms.base import Reply, ServerState
from ..config import ExperimentConfig, checkpoint_keys, saved_config
from ..data import federation_classes
from ..models import pick_device
from ..records import ARRAYS, METRICS, array_bytes, experiment_record, from_array_record
from .callbacks import Callback, CheckpointError, Checkpoints, MetricsFiles, Plots, Summary, TensorBoard
from .callbacks.checkpoint import load_checkpoint, runs_with_checkpoints
from .evaluation import Evaluator
from .exchange import exchange
from .messages import Messenger
from .nodes import FederationError, NodeDirectory
from .onboarding import Onboarder
from .run_dir import RunDirectory
from .validation import validate_reply


class Terminated(SystemExit):
    """SIGTERM (an operator's kill, a container stop): the run ends as ``interrupted``."""


def stop_on_sigterm() -> Any:
    """Turn SIGTERM into an exception in the server's main thread, so that the summary and
    the last checkpoint are written as on any other stop (elsewhere the default applies).
    Returns the handler it replaced (None when it replaced none), to be put back."""
    if threading.current_thread() is not threading.main_thread():
        return None

    def handler(signum: int, frame: Any) -> None:
        raise Terminated(f"signal {signum}")

    return signal.signal(signal.SIGTERM, handler)


def error_text(reply: Message) -> str:
    """The last line of a failed reply's error (a client's exception: its type and message)."""
    reason = str(reply.error.reason or reply.error.code).strip()
    return reason.splitlines()[-1][:500] if reason else "unknown error"


class RoundLoop:
    def __init__(self, cfg: ExperimentConfig, run_dir: RunDirectory | None = None,
                 callbacks: list[Callback] | None = None):
        self.cfg = cfg
        self.run_dir = run_dir or RunDirectory(cfg)
        self.algorithm = get_algorithm(cfg.algorithm)
        self.device = pick_device(cfg.device)
        self.num_classes = len(federation_classes(cfg))
        self.state: ServerState = self.algorithm.init_state(cfg, self.num_classes)
        self.rng = np.random.default_rng(cfg.seed)
        self.round = 0
        self.history: list[dict[str, Any]] = []
        self.round_log: list[dict[str, Any]] = []
        self.messenger = Messenger(experiment_record(cfg))
        self.onboarder = Onboarder(cfg, self.run_dir.path, "training")
        self.nodes = NodeDirectory(cfg, self.algorithm, self.messenger, self.onboarder)
        self.evaluator = Evaluator(cfg, self.algorithm, self.messenger, self.nodes, self.num_classes, self.device)
        self.checkpoints = Checkpoints(self.run_dir.path, cfg.keep_checkpoints)
        self.callbacks = callbacks if callbacks is not None else [
            MetricsFiles(self.run_dir.path), Summary(self.run_dir.path), Plots(self.run_dir.path),
            TensorBoard(self.run_dir.path), self.checkpoints]  # checkpoints last: a round is on disk before it
        self.has_trained: set[int] = set()
        self.segments: list[dict[str, Any]] = []  # one per process that ran part of this run
        self.failure: dict[str, Any] | None = None
        self._sent: dict[int, tuple[int, dict[str, torch.Tensor], dict[str, Any]]] = {}
        self._sent_ids: dict[str, int] = {}  # message id -> client

    @property
    def comm(self) -> dict[str, int]:
        return self.messenger.comm

    def elapsed(self) -> float:
        """Wall time over every segment of the run (resumes included)."""
        return sum(s["wall_time_s"] for s in self.segments[:-1]) + time.time() - self.run_dir.started

    # ------------------------------------------------------------ checkpoints
    def checkpoint_payload(self) -> dict[str, Any]:
        segments = self.segments[:-1] + [{**self.segments[-1], "wall_time_s": time.time() - self.run_dir.started}] \
            if self.segments else []
        return {"round": self.round, "arrays": self.state.arrays, "extra": self.state.extra,
                "history": self.history, "round_log": self.round_log, "comm": dict(self.comm),
                "rng": self.rng.bit_generator.state, "config": self.cfg.to_dict(), "segments": segments,
                "has_trained": sorted(self.has_trained)}

    def restore(self, payload: Mapping[str, Any]) -> None:
        saved = saved_config(payload["config"])  # a key newer than the checkpoint: the value it ran with
        current = self.cfg.to_dict()
        for key in checkpoint_keys(self.cfg.algorithm):
            if saved[key] != current[key]:
                raise FederationError(f"cannot resume: checkpoint has {key}={saved[key]!r}, "
                                      f"this run has {key}={current[key]!r}")
        self.state = ServerState(dict(payload["arrays"]), dict(payload["extra"]))
        self.round, self.history = int(payload["round"]), list(payload["history"])
        self.round_log = list(payload["round_log"])
        self.messenger.comm.update(payload["comm"])
        self.rng.bit_generator.state = payload["rng"]
        self.segments = list(payload.get("segments", []))
        self.has_trained = set(payload.get("has_trained", []))
        self.onboarder.follow(self.history)

    def resume_point(self) -> None:
        """With ``resume_from`` or ``resume``: restore the checkpoint, or stop with a reason."""
        if self.cfg.resume_from:
            path = Path(self.cfg.resume_from)
            self.restore(load_checkpoint(path))
        else:
            found = self.checkpoints.load_newest()
            if found is None:
                others = runs_with_checkpoints(self.run_dir.path.parent)
                tried = [str(p) for p in self.checkpoints.candidates()]
                raise CheckpointError(
                    f"resume=true, but run '{self.cfg.resolved_run_name}' has no checkpoint that loads"
                    + (f" (tried {tried})" if tried else f" (none in {self.checkpoints.dir})")
                    + (f"; runs with checkpoints in {self.run_dir.path.parent}: {', '.join(others)}" if others
                       else "") + ". Set run_name to one of them, or resume=false to start afresh.")
            payload, path, skipped = found
            self.restore(payload)
            for reason in skipped:
                log(WARNING, "[fedcoe] resume: skipped %s", reason)
        log(INFO, "[fedcoe] resumed from %s (round %d done)", path, self.round)

    # ------------------------------------------------------------ training
    def sample_clients(self) -> list[int]:
        n = self.cfg.num_clients
        if self.nodes.joined:  # onboarded nodes that train: sampled like everyone else
            pool = list(range(n)) + sorted(self.nodes.joined)
            k = max(1, int(round(self.cfg.fraction_train * len(pool))))
            return sorted(int(c) for c in self.rng.choice(pool, size=k, replace=False)) if k < len(pool) else pool
        k = max(1, int(round(self.cfg.fraction_train * n)))
        return sorted(int(c) for c in self.rng.choice(n, size=k, replace=False)) if k < n else list(range(n))

    def configure_train(self, server_round: int) -> list[Message]:
        self._sent, self._sent_ids = {}, {}
        self._train_bytes_down = 0
        self._round_started = time.time()
        msgs = []
        records: dict[tuple, ArrayRecord] = {}  # payload tensors stay alive until the round's messages are built
        for client in self.sample_clients():
            payload, pconfig = self.algorithm.train_payload(self.state, self.cfg, client, server_round)
            pconfig = {**pconfig, "server_round": server_round}
            if client in self.nodes.joined:
                pconfig["joined"] = True  # an onboarded cold-start node allowed to train
            node = self.nodes.node_of[client]
            self._sent[client] = (node, payload, pconfig)
            self._train_bytes_down += array_bytes(payload, relayed=False)
            msgs.append(self.messenger.message(node, "train", payload, pconfig, records))
        return msgs

    def aggregate_train(self, server_round: int, replies: Iterable[Message], sent: list[Message] | None = None
                        ) -> dict[str, Any]:
        """Validate the replies, aggregate the valid ones; ``sent``: the messages as sent
        (their ids attribute an error reply to its client). Returns the round's record."""
        by_id = {m.metadata.message_id: c for m, c in zip(sent or [], self._sent) if m.metadata.message_id}
        valid: list[Reply] = []
        rejected: dict[int, str] = {}
        errors: dict[int, str] = {}
        answered: set[int] = set()
        for reply in replies:
            if reply.has_error():
                client = by_id.get(reply.metadata.reply_to_message_id)
                if client is not None:
                    errors[client] = error_text(reply)
                continue
            client = self.nodes.client_of(reply.metadata.src_node_id)
            if client is None or client not in self._sent:
                continue
            answered.add(client)
            node, payload, pconfig = self._sent[client]
            try:
                arrays = from_array_record(reply.content.array_records[ARRAYS])
                metrics = dict(reply.content.metric_records[METRICS])
            except (KeyError, ValueError, TypeError) as err:
                rejected[client] = f"malformed reply ({err})"
                continue
            self.messenger.count_upload(arrays)
            expected = self.algorithm.expected_upload(payload, pconfig, self.cfg)
            reason = validate_reply(arrays, metrics, expected, payload, self.cfg.max_update_norm_ratio,
                                    lambda a: self.algorithm.validate_upload(a, self.cfg))
            if reason:
                rejected[client] = reason
                continue
            valid.append(Reply(client, int(metrics["num_samples"]), arrays, metrics))
        valid.sort(key=lambda r: r.client_index)  # aggregation order must not depend on arrival
        self.has_trained.update(r.client_index for r in valid)
        failed = sorted(set(self._sent) - answered)
        for client in failed:
            log(WARNING, "[round %d] client %d (node %d) failed or timed out: %s; left out", server_round,
                client, self._sent[client][0], errors.get(client, "no reply within round_timeout"))
        for client, reason in rejected.items():
            log(WARNING, "[round %d] rejected update of client %d (node %d): %s", server_round, client,
                self._sent[client][0], reason)
        needed = int(np.ceil(self.cfg.min_reply_fraction * len(self._sent)))
        if len(valid) < needed:
            causes = {c: errors.get(c, "no reply within round_timeout") for c in failed}
            self.failure = {"round": server_round, "failed": {str(c): r for c, r in causes.items()},
                            "rejected": {str(c): r for c, r in rejected.items()}}
            latest = self.checkpoints.latest()
            raise FederationError(
                f"round {server_round}: only {len(valid)} of {len(self._sent)} sampled clients sent a valid "
                f"update, fewer than min_reply_fraction={self.cfg.min_reply_fraction} requires ({needed}); "
                + "; ".join([f"client {c} (node {self._sent[c][0]}) failed: {r}" for c, r in causes.items()]
                            + [f"client {c} rejected: {r}" for c, r in rejected.items()])
                + (f". The last checkpoint is {latest}" if latest else ". No checkpoint was written yet"))
        self.state, diagnostics = self.algorithm.aggregate(self.state, valid, self.cfg, server_round)
        n = np.array([r.num_samples for r in valid], dtype=float)
        loss = float(np.dot(n, [r.metrics.get("train_loss", np.nan) for r in valid]) / n.sum())
        record = {"round": server_round, "train_loss": loss, "clients": len(self._sent),
                  # compute: the clients' local training time summed over the round
                  "client_train_s": float(sum(r.metrics.get("train_time_s", 0.0) for r in valid)),
                  "replies": len(valid), "failed": failed, "rejected": sorted(rejected),
                  "errors": {str(c): r for c, r in errors.items()},
                  "train_bytes_down": self._train_bytes_down,
                  "bytes_down_total": self.comm["bytes_down"], "bytes_up_total": self.comm["bytes_up"],
                  "started_at": self._round_started, "aggregated_at": time.time(),
                  "time_s": time.time() - self._round_started, **diagnostics}
        self.round_log.append(record)
        for callback in self.callbacks:
            callback.on_round(self, record)
        return record

    def train_round(self, grid: Grid, server_round: int) -> dict[str, Any]:
        sent = self.configure_train(server_round)
        replies = exchange(grid, sent, self.cfg)
        return self.aggregate_train(server_round, replies, sent)

    # ------------------------------------------------------------ evaluation
    def evaluate(self, grid: Grid, server_round: int) -> dict[str, Any]:
        record = self.evaluator.evaluate(grid, self.state, server_round, self.has_trained)
        record["train_loss"] = self.round_log[-1]["train_loss"] if self.round_log else None
        record["elapsed_s"] = round(self.elapsed(), 2)
        record.update(self.comm)
        self.history.append(record)
        self.onboarder.follow([record])
        for callback in self.callbacks:
            callback.on_evaluation(self, record)
        log(INFO, "[round %d] global=%s personalised=%s cold-start=%s", server_round,
            _fmt(record["global_accuracy"]), _fmt(record["personalized_accuracy"]), _fmt(record["coldstart_accuracy"]))
        keys = self.algorithm.diagnostic_keys
        diagnostics = {k: v for source in (self.round_log[-1] if self.round_log else {}, record)
                       for k, v in source.items() if k in keys}
        if diagnostics:
            log(INFO, "[round %d] diagnostics %s", server_round, json.dumps({k: _round(v) for k, v in diagnostics.items()}))
        return record

    def check_new_nodes(self, grid: Grid, package_round: int, phase: str) -> list[dict[str, Any]]:
        entries, self.state = self.nodes.check_new_nodes(grid, self.state, package_round, phase)
        return entries

    # ------------------------------------------------------------ the run
    def start(self, grid: Grid) -> dict[str, Any]:
        cfg = self.cfg
        log(INFO, "[fedcoe] algorithm=%s rounds=%d clients=%d (+%d cold start) %s device=%s results=%s",
            cfg.algorithm, cfg.num_rounds, cfg.num_clients, cfg.num_coldstart_clients,
            self.algorithm.describe(cfg), self.device, self.run_dir.path)
        if cfg.resume or cfg.resume_from:
            self.resume_point()
        previous_handler = stop_on_sigterm()
        self.segments.append({"started_at": self.run_dir.started, "from_round": self.round, "wall_time_s": 0.0})
        status = "running"
        try:
            for callback in self.callbacks:
                callback.on_start(self)
            self.nodes.discover(grid)
            for server_round in range(self.round + 1, cfg.num_rounds + 1):
                t0 = time.time()
                log(INFO, "")
                log(INFO, "[ROUND %d/%d]", server_round, cfg.num_rounds)
                self.check_new_nodes(grid, self.round, f"before round {server_round}")
                last = self.train_round(grid, server_round)
                log(INFO, "[round %d] train_loss=%.4f replies=%d/%d (%.1fs)", server_round, last["train_loss"],
                    last["replies"], last["clients"], time.time() - t0)
                if cfg.eval_every and (server_round % cfg.eval_every == 0 or server_round == cfg.num_rounds):
                    self.check_new_nodes(grid, server_round, f"after round {server_round} training")
                    self.evaluate(grid, server_round)
                self.round = server_round
                for callback in self.callbacks:
                    callback.on_round_end(self)
            status = "finished"
        except BaseException as err:
            status = "interrupted"  # resume=true continues it from the last finished round
            self.failure = {**(self.failure or {}), "error": f"{type(err).__name__}: {err}",
                            "last_finished_round": self.round}
            log(ERROR, "[fedcoe] run stopped at round %d: %s", self.round + 1, err)
            raise
        finally:
            if previous_handler is not None:
                signal.signal(signal.SIGTERM, previous_handler)
            for callback in self.callbacks:
                callback.on_end(self, status)
            self.run_dir.release()
        log(INFO, "[fedcoe] finished: results in %s", self.run_dir.path)
        return self.history[-1] if self.history else {}


def _round(value: Any) -> Any:
    return [round(v, 3) for v in value] if isinstance(value, list) else round(value, 3)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
