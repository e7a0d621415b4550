"""Onboarding, server side: the cold-start package a new site gets, the reply it may
send back, the registry of onboarded nodes (``<run>/onboarding.jsonl``), and serving
mode (onboard every node that connects to a finished run, no training).

What moves (ALGORITHMS.md, "Cold start"; docs/DEPLOYMENT.md, "Onboarding a new site"):

* server -> node: the method's new-client model (FedCoE: the gate and the expert pool);
* node -> server: its routing row (a mixture method's K floats: mean gate probabilities on
  its own unlabeled images) and, when it holds labelled test images, its cold-start
  accuracy (plus counts). Never images, labels or model weights: ``check_reply`` rejects
  any reply that carries more. The node side is ``fedcoe_flwr.client.onboarding``."""

from __future__ import annotations

import json
import os
import time
from logging import INFO, WARNING
from pathlib import Path
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from flwr.app import Message, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid

from ..algorithms.adaptation import TRAIN_PRIOR_KEY, calibration_config, latest_calibration, latest_predicted_prior
from ..algorithms.base import Algorithm, ServerState
from ..algorithms import algorithm_class, get_algorithm
from ..config import ExperimentConfig, from_dict, saved_config
from ..fileio import append_jsonl, read_jsonl
from ..records import (ARRAYS, CONFIG, EXPERIMENT, METRICS, array_bytes, config_record, experiment_record,
                       tensors_crc, to_array_record)
from .callbacks.checkpoint import CheckpointError, load_checkpoint
from .exchange import exchange

REGISTRY = "onboarding.jsonl"
# Everything a node may report back (all numbers): the routing row, counts, and its
# cold-start accuracy under each adaptation the method reports (coldstart_accuracy_*).
ALLOWED_METRICS = frozenset({"routing_row", "model_accuracy", "num_test", "num_unlabeled", "can_train",
                             "onboard_time_s", "model_bytes"})
ACCURACY_PREFIX = "coldstart_accuracy"
# Keys of a serving run's config taken from the serving run instead of the checkpoint
# (plus the method's own adaptation switches, ``Params.adaptation_keys``).
SERVE_KEYS = ("device", "round_timeout", "wait_for_nodes", "node_restart_grace", "eval_batch_size", "serve_from",
              "serve_max_nodes", "serve_timeout", "results_dir")


class OnboardingError(RuntimeError):
    """A package cannot be built or a reply is not acceptable; the message says why."""


def coldstart_package(algorithm: Algorithm, state: ServerState, cfg: ExperimentConfig
                      ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(arrays, payload config) a new node gets: the method's new-client model."""
    if algorithm.coldstart_needs_client_parts:
        raise OnboardingError(f"{cfg.algorithm}'s new-client model averages the training clients' private parts, "
                              "which only a training round can collect: it cannot onboard a node outside evaluation")
    return algorithm.coldstart_payload(state, cfg, None)


def load_served_checkpoint(source: str | os.PathLike) -> tuple[dict[str, Any], Path, Path]:
    """(checkpoint payload, the file, the run's results folder) from a run folder (its
    final_state.pt, else its latest checkpoint) or a checkpoint file."""
    path = Path(os.path.expanduser(str(source)))
    if path.is_dir():
        candidates = [path / "final_state.pt"] + sorted((path / "checkpoints").glob("round-*.pt"), reverse=True)
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise OnboardingError(f"serve_from='{source}' holds neither final_state.pt nor checkpoints/round-*.pt")
        path = found
    if not path.is_file():
        raise OnboardingError(f"serve_from='{source}' does not exist (give a finished run's results folder, "
                              "e.g. results/deploy-fedcoe-s0, or one of its checkpoint files)")
    try:
        payload = load_checkpoint(path)
    except CheckpointError as err:
        raise OnboardingError(str(err)) from None
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return payload, path, run_dir


def serving_config(checkpoint_config: Mapping[str, Any], serving: ExperimentConfig) -> ExperimentConfig:
    """The checkpoint's config (it defines the model and the label space) with the
    serving run's run-time keys."""
    values = saved_config(checkpoint_config)
    for key in SERVE_KEYS + algorithm_class(values["algorithm"]).Params.adaptation_keys:
        values[key] = getattr(serving, key)
    return from_dict(values)


def check_reply(metric_keys: Iterable[str], routing_row: list[float] | None, row_size: int | None,
                array_records: int, config_records: int) -> str | None:
    """Why an onboarding reply must be refused (it carries more than the row and
    metrics, or the row is not K probabilities), or None."""
    if array_records or config_records:
        return f"the reply carries {array_records} array and {config_records} config record(s); only metrics may come back"
    extra = sorted(k for k in set(metric_keys) - ALLOWED_METRICS if not k.startswith(ACCURACY_PREFIX))
    if extra:
        return f"the reply carries metric(s) {extra} that onboarding does not ask for"
    if row_size is not None:
        if routing_row is None or len(routing_row) != row_size:
            return f"routing_row must hold {row_size} floats, got {None if routing_row is None else len(routing_row)}"
        row = np.asarray(routing_row, dtype=float)
        if not np.isfinite(row).all() or (row < 0).any() or abs(row.sum() - 1.0) > 1e-3:
            return f"routing_row is not a probability vector: {routing_row}"
    return None


def append_registry(run_dir: str | os.PathLike, entry: Mapping[str, Any]) -> Path:
    return append_jsonl(Path(run_dir) / REGISTRY, entry)


def read_registry(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    return read_jsonl(Path(run_dir) / REGISTRY)


class Onboarder:
    """Sends nodes the
    cold-start package as a ``query.onboard`` message, checks that each reply carries only
    the routing row and metrics, and appends one registry line per node to
    ``<run_dir>/onboarding.jsonl``. Used during training (MoEStrategy) and by the serving mode."""

    def __init__(self, cfg: ExperimentConfig, run_dir: str | Path, mode: str):
        self.cfg, self.run_dir, self.mode = cfg, Path(run_dir), mode
        self.algorithm = get_algorithm(cfg.algorithm)
        self.entries: list[dict[str, Any]] = []
        # the federation's predicted training prior of the newest evaluation: a new node's EM
        # starts from the same prior as the cold-start clients the evaluation scored
        self.train_prior: list[float] | None = None
        self.calibration = None  # and its temperature with the prior at it (em_calibrated)

    def follow(self, history: Iterable[Mapping[str, Any]]) -> None:
        """Take the training prior and the calibration the newest evaluation in ``history``
        predicted (if any did)."""
        self.train_prior = latest_predicted_prior(history) or self.train_prior
        self.calibration = latest_calibration(history) or self.calibration

    def onboard(self, grid: Grid, nodes: Mapping[int, Mapping[str, Any]], state: ServerState,
                package_round: int, phase: str, decide: Any = None) -> list[dict[str, Any]]:
        """Onboard ``nodes`` (node id -> what is known of it: its profile, if asked) with the
        package built from ``state``; ``decide(entry)`` may add to an entry before it is
        written to the registry. Returns the registry entries."""
        if not nodes:
            return []
        try:
            package, pconfig = coldstart_package(self.algorithm, state, self.cfg)
        except OnboardingError as err:
            log(WARNING, "[onboard] %s", err)
            return []
        crc = tensors_crc(package)  # the node checks it on arrival
        if self.train_prior is not None:
            pconfig = {**pconfig, TRAIN_PRIOR_KEY: self.train_prior}
        pconfig = {**pconfig, **calibration_config(self.calibration)}
        config = {**pconfig, "server_round": package_round, "package_round": package_round, "package_crc": crc,
                  "run_name": self.cfg.resolved_run_name}
        content = RecordDict({ARRAYS: to_array_record(package), CONFIG: config_record(config),
                              EXPERIMENT: experiment_record(self.cfg)})
        msgs = [Message(content=content, dst_node_id=n, message_type="query.onboard") for n in nodes]
        sent_at = time.time()
        log(INFO, "[onboard] %s: sending the cold-start package (%d arrays, %.1f kB, crc %d) to %d new node(s): %s",
            phase, len(package), array_bytes(package) / 1e3, crc, len(msgs), sorted(nodes))
        by_node: dict[int, Message] = {}
        errors: list[str] = []
        for r in exchange(grid, msgs, self.cfg):
            if r.has_error():  # error replies come from the SuperLink (src 1), not from the node
                errors.append(str(r.error))
            else:
                by_node[int(r.metadata.src_node_id)] = r
        out = []
        k = self.algorithm.routing_row_size(self.cfg)
        for node in sorted(nodes):
            reply = by_node.get(node)
            entry: dict[str, Any] = {
                "node_id": int(node), "time": round(time.time(), 3),
                "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "mode": self.mode, "phase": phase,
                "run_name": self.cfg.resolved_run_name, "algorithm": self.cfg.algorithm,
                "package_round": package_round, "package_crc": crc, "package_bytes": array_bytes(package),
                "profile": dict(nodes[node])}
            if reply is None:
                entry.update(status="failed", error="; ".join(errors) or "no reply within round_timeout")
                log(WARNING, "[onboard] node %d was not onboarded: %s", node, entry["error"])
            else:
                arrays_n, configs_n = len(reply.content.array_records), len(reply.content.config_records)
                metrics = dict(reply.content.metric_records.get(METRICS, {}))
                row = metrics.get("routing_row")
                reason = check_reply(metrics, list(row) if row is not None else None, k, arrays_n, configs_n)
                entry["reply_records"] = {"arrays": list(reply.content.array_records),
                                          "configs": list(reply.content.config_records),
                                          "metrics": sorted(metrics)}
                entry["reply_payload_bytes"] = len(json.dumps(metrics).encode())
                entry["round_trip_s"] = round(time.time() - sent_at, 3)
                if reason:
                    entry.update(status="rejected", error=reason)
                    log(WARNING, "[onboard] reply of node %d rejected: %s", node, reason)
                else:
                    entry.update(status="onboarded", routing_row=[float(v) for v in row] if row is not None else None,
                                 metrics={key: v for key, v in metrics.items() if key != "routing_row"})
                    acc = metrics.get("coldstart_accuracy")
                    log(INFO, "[onboard] node %d onboarded in %.1fs: routing row %s, cold-start accuracy %s", node,
                        entry["round_trip_s"], None if row is None else [round(float(v), 3) for v in row],
                        "n/a (no labelled test images)" if acc is None else f"{acc:.4f}")
            if decide is not None:
                decide(entry)
            append_registry(self.run_dir, entry)
            self.entries.append(entry)
            out.append(entry)
        return out


def serve(grid: Grid, serving: ExperimentConfig) -> list[dict[str, Any]]:
    """Serving mode: no training. Load a finished run's checkpoint and onboard every SuperNode
    that connects (the cold-start package, its routing row and metrics back, one line per node
    in ``<run>/onboarding.jsonl``) until ``serve_max_nodes`` nodes are onboarded or
    ``serve_timeout`` seconds have passed."""
    payload, path, run_dir = load_served_checkpoint(serving.serve_from)
    cfg = serving_config(payload["config"], serving)
    state = ServerState(dict(payload["arrays"]), dict(payload.get("extra", {})))
    package_round = int(payload.get("round", 0))
    onboarder = Onboarder(cfg, run_dir, "serve")
    onboarder.follow(payload.get("history", []))
    log(INFO, "[serve] onboarding new sites from %s (run %s, %s, round %d); registry %s; up to %s node(s), "
        "%.0fs", path, cfg.resolved_run_name, cfg.algorithm, package_round, run_dir / REGISTRY,
        serving.serve_max_nodes or "any number of", serving.serve_timeout)
    deadline = time.time() + serving.serve_timeout
    known: set[int] = set()
    done: list[dict[str, Any]] = []
    while time.time() < deadline:
        new = sorted(int(n) for n in grid.get_node_ids() if int(n) not in known)
        if serving.serve_max_nodes:
            new = new[: serving.serve_max_nodes - len(done)]
        if new:
            known.update(new)
            entries = onboarder.onboard(grid, {n: {} for n in new}, state, package_round, "serve")
            done += [e for e in entries if e["status"] == "onboarded"]
        if serving.serve_max_nodes and len(done) >= serving.serve_max_nodes:
            break
        time.sleep(1.0)
    log(INFO, "[serve] stopped: %d node(s) onboarded; registry %s", len(done), run_dir / REGISTRY)
    return done
