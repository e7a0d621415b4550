"""The Flower Strategy: finds the nodes, sends each client its own payload, validates
replies, calls the method's aggregation, evaluates the three metrics, writes results
and checkpoints. Algorithm logic lives in ``fedcoe_flwr.algorithms``."""

from __future__ import annotations

import json
import time
from pathlib import Path
from logging import ERROR, INFO, WARNING
from typing import Any, Iterable, Mapping

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from .algorithms import get_algorithm
from .algorithms.common import Reply, ServerState, accuracy
from .config import MODEL_KEYS, ExperimentConfig, saved_config
from .data import federation_classes, load_global_test
from .models import pick_device
from .records import (ARRAYS, CONFIG, EXPERIMENT, METRICS, array_bytes, config_record,
                      experiment_record, from_array_record, to_array_record)
from .results import ResultsWriter
from . import onboard as onb

# Keys a resumed run must share with its checkpoint: the model's and the partitions'.
RESUME_KEYS = MODEL_KEYS + ("num_clients", "num_coldstart_clients", "partition", "dirichlet_alpha", "seed")


class FederationError(RuntimeError):
    """The federation cannot go on (wrong node count, too few replies); says how to fix it."""


PROBABILITY_VECTORS = ("correlation", "class_marginal")  # uploads that must be probability vectors


def validate_reply(arrays: Mapping[str, torch.Tensor], metrics: Mapping[str, Any],
                   expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                   payload: Mapping[str, torch.Tensor], max_norm_ratio: float) -> str | None:
    """The reason a training reply must be rejected, or None when it is sound."""
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        return f"unexpected keys (missing {missing[:3]}, extra {extra[:3]})"
    deltas: dict[str, float] = {}
    for key, (shape, dtype) in expected.items():
        value = arrays[key]
        if tuple(value.shape) != shape:
            return f"'{key}' has shape {tuple(value.shape)}, expected {shape}"
        if value.dtype != dtype:
            return f"'{key}' has dtype {value.dtype}, expected {dtype}"
        if not value.is_floating_point():
            continue
        ref = payload.get(key)
        if ref is not None and ref.is_floating_point() and ref.shape == value.shape:
            # one pass: the norm of the update is finite exactly when the update is (the payload is)
            deltas[key] = float(torch.linalg.vector_norm(value.float() - ref.float()))
            finite = np.isfinite(deltas[key]) or bool(torch.isfinite(value).all())
        else:
            finite = bool(torch.isfinite(value).all())
        if not finite:
            return f"'{key}' holds NaN or Inf"
    n = metrics.get("num_samples")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return f"num_samples must be a positive integer, got {n!r}"
    for key in PROBABILITY_VECTORS:
        row = arrays.get(key)
        if row is not None and ((row < 0).any() or abs(float(row.sum()) - 1.0) > 1e-3):
            return f"{key} row is not a probability vector (sum {float(row.sum()):.4f})"
    if max_norm_ratio > 0:
        # only what the client sends back: a payload may also carry read-only parts (FedMoE-DA's relayed experts)
        for key, delta in deltas.items():
            if not key.endswith(("running_mean", "running_var")):
                bound = max_norm_ratio * (float(torch.linalg.vector_norm(payload[key].float())) + 1.0)
                if not delta <= bound:
                    return f"update of '{key}' has norm {delta:.3g} > bound {bound:.3g}"
    return None


def summarise_personalised(accs: list[float], weights: list[int]) -> dict[str, float]:
    a, w = np.array(accs, dtype=float), np.array(weights, dtype=float)
    return {"personalized_accuracy": float((a * w).sum() / w.sum()),
            "personalized_accuracy_mean": float(a.mean()),
            "personalized_accuracy_p10": float(np.percentile(a, 10))}


ONBOARD_JOIN_ALGORITHMS = ("fedcoe", "fedavg", "fedprox")  # no per-client server state but FedCoE's rows


class Onboarder:
    """Flower glue of onboarding (the maths is in ``fedcoe_flwr.onboard``): sends nodes the
    cold-start package as a ``query.onboard`` message, checks that each reply carries only
    the routing row and metrics, and appends one registry line per node to
    ``<run_dir>/onboarding.jsonl``. Used during training (MoEStrategy) and by the serving mode."""

    def __init__(self, cfg: ExperimentConfig, run_dir: str | Path, mode: str):
        self.cfg, self.run_dir, self.mode = cfg, Path(run_dir), mode
        self.algorithm = get_algorithm(cfg.algorithm)
        self.entries: list[dict[str, Any]] = []

    def onboard(self, grid: Grid, nodes: Mapping[int, Mapping[str, Any]], state: ServerState,
                package_round: int, phase: str, decide: Any = None) -> list[dict[str, Any]]:
        """Onboard ``nodes`` (node id -> what is known of it: its profile, if asked) with the
        package built from ``state``; ``decide(entry)`` may add to an entry before it is
        written to the registry. Returns the registry entries."""
        if not nodes:
            return []
        try:
            package, pconfig = onb.coldstart_package(self.algorithm, state, self.cfg)
        except onb.OnboardingError as err:
            log(WARNING, "[onboard] %s", err)
            return []
        crc = onb.package_crc(package)
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
        for r in grid.send_and_receive(msgs, timeout=self.cfg.round_timeout):
            if r.has_error():  # error replies come from the SuperLink (src 1), not from the node
                errors.append(str(r.error))
            else:
                by_node[int(r.metadata.src_node_id)] = r
        out = []
        k = self.cfg.num_experts if self.cfg.algorithm == "fedcoe" else None
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
                reason = onb.check_reply(metrics, list(row) if row is not None else None, k, arrays_n, configs_n)
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
            onb.append_registry(self.run_dir, entry)
            self.entries.append(entry)
            out.append(entry)
        return out


class MoEStrategy(Strategy):
    """One Strategy for every method: per-client payloads (FedCoE sends each client
    only its expert set), replies validated before the method aggregates them."""

    def __init__(self, cfg: ExperimentConfig, results: ResultsWriter):
        self.cfg = cfg
        self.algorithm = get_algorithm(cfg.algorithm)
        self.results = results
        self.device = pick_device(cfg.device)
        self.num_classes = len(federation_classes(cfg))
        self.state: ServerState = self.algorithm.init_state(cfg, self.num_classes)
        self.rng = np.random.default_rng(cfg.seed)
        self.round = 0
        self.history: list[dict[str, Any]] = []
        self.round_log: list[dict[str, Any]] = []
        # server-client bytes, peer-to-peer bytes relayed by the server (FedMoE-DA),
        # and evaluation-protocol uploads (private parts averaged for cold start)
        self.comm = {"bytes_down": 0, "bytes_up": 0, "bytes_p2p_relayed": 0, "bytes_eval_up": 0}
        self.node_of: dict[int, int] = {}  # partition id -> node id
        self._sent: dict[int, tuple[int, dict[str, torch.Tensor], dict[str, Any]]] = {}
        self._global_test: tuple[torch.Tensor, torch.Tensor] | None = None
        self._experiment_record = experiment_record(cfg)  # the config never changes during a run
        self._last_eval: dict[str, Any] = {}
        self._train_bytes_down = 0
        self._round_started = 0.0
        self._known_nodes: set[int] = set()  # every node id seen (answered discovery or onboarded)
        self._pending: dict[int, dict[str, Any]] = {}  # found at discovery, onboarded before round 1
        self.joined: dict[int, int] = {}  # client index -> node id of onboarded nodes that train
        self._has_trained: set[int] = set()
        self.onboarder = Onboarder(cfg, results.dir, "training")

    # ------------------------------------------------------------ checkpoints
    def checkpoint_payload(self) -> dict[str, Any]:
        return {"round": self.round, "arrays": self.state.arrays, "extra": self.state.extra,
                "history": self.history, "round_log": self.round_log, "comm": dict(self.comm),
                "rng": self.rng.bit_generator.state, "config": self.cfg.to_dict()}

    def restore(self, payload: Mapping[str, Any]) -> None:
        saved = saved_config(payload["config"])  # a key newer than the checkpoint: the value it ran with
        for key in RESUME_KEYS:
            saved_value = saved[key]
            if saved_value != getattr(self.cfg, key):
                raise FederationError(f"cannot resume: checkpoint has {key}={saved_value!r}, "
                                      f"this run has {key}={getattr(self.cfg, key)!r}")
        self.state = ServerState(dict(payload["arrays"]), dict(payload["extra"]))
        self.round, self.history = int(payload["round"]), list(payload["history"])
        self.round_log, self.comm = list(payload["round_log"]), dict(payload["comm"])
        self.rng.bit_generator.state = payload["rng"]
        self.results.rewrite_history(self.history, self.round_log)

    # ------------------------------------------------------------ nodes
    def discover(self, grid: Grid) -> None:
        """Ask every node for its partition (SuperNode ids change on restart, so sites
        are identified by node config) and check the federation matches the config."""
        want = self.cfg.num_partitions
        deadline = time.time() + self.cfg.wait_for_nodes
        node_ids = list(grid.get_node_ids())
        while len(node_ids) < want and time.time() < deadline:
            time.sleep(1.0)
            node_ids = list(grid.get_node_ids())
        # the experiment config lets a site (node config data-dir/site-id) find its client index
        msgs = [Message(content=RecordDict({EXPERIMENT: self._experiment_record}), dst_node_id=n,
                        message_type="query.profile") for n in node_ids]
        seen: dict[int, int] = {}
        extra: dict[int, dict[str, Any]] = {}  # new sites / surplus cold-start nodes: onboarded, not counted
        for reply in grid.send_and_receive(msgs, timeout=self.cfg.round_timeout):
            if reply.has_error():
                log(WARNING, "node did not answer the profile query: %s", reply.error)
                continue
            info = reply.content.config_records[CONFIG]
            pid, num = int(info["partition-id"]), int(info["num-partitions"])
            if num != want:
                raise FederationError(
                    f"node {reply.metadata.src_node_id} says num-partitions={num}, but the config has "
                    f"num_clients + num_coldstart_clients = {self.cfg.num_clients} + "
                    f"{self.cfg.num_coldstart_clients} = {want}. Run with --federation-config "
                    f"\"num-supernodes={want}\" or change num_clients/num_coldstart_clients.")
            node = int(reply.metadata.src_node_id)
            if self.cfg.onboard_new_nodes and (pid < 0 or (pid >= self.cfg.num_clients and pid in seen)):
                extra[node] = dict(info)
                continue
            seen[pid] = node
        missing = sorted(set(range(want)) - set(seen))
        if len(node_ids) - len(extra) != want or missing:
            raise FederationError(
                f"the federation has {len(node_ids)} nodes but the config needs {want} "
                f"({self.cfg.num_clients} training + {self.cfg.num_coldstart_clients} cold-start); "
                f"missing partitions {missing[:10]}. In simulation run "
                f"flwr run . --federation-config \"num-supernodes={want}\", or set num_clients and "
                f"num_coldstart_clients to match the nodes you have.")
        self._known_nodes = set(int(n) for n in node_ids)
        self._pending = extra
        self.node_of = seen
        log(INFO, "[fedcoe] %d nodes: partitions 0..%d train, %d..%d cold start", want,
            self.cfg.num_clients - 1, self.cfg.num_clients, want - 1)

    def check_new_nodes(self, grid: Grid, package_round: int, phase: str) -> list[dict[str, Any]]:
        """Onboard SuperNodes that joined since discovery (or were set aside by it): a node
        never seen answers the profile query; a training site back under a new node id is
        addressed under that id from now on; anything else gets the cold-start package built
        from the current state (= checkpoint ``package_round``) and, with
        ``coldstart_join_training``, trains from the next round on."""
        if not self.cfg.onboard_new_nodes:
            return []
        new = sorted(int(n) for n in grid.get_node_ids() if int(n) not in self._known_nodes)
        candidates = dict(self._pending)
        self._pending = {}
        if new:
            self._known_nodes.update(new)
            query = [Message(content=RecordDict({EXPERIMENT: self._experiment_record}), dst_node_id=n,
                             message_type="query.profile") for n in new]
            for reply in grid.send_and_receive(query, timeout=self.cfg.round_timeout):
                if reply.has_error():
                    log(WARNING, "[onboard] a new node did not answer the profile query: %s", reply.error)
                    continue
                info = dict(reply.content.config_records[CONFIG])
                node, pid = int(reply.metadata.src_node_id), int(info["partition-id"])
                if 0 <= pid < self.cfg.num_clients and not info.get("cold-start"):
                    log(INFO, "[onboard] training client %d is back as node %d (was %s)", pid, node,
                        self.node_of.get(pid))
                    self.node_of[pid] = node
                    continue
                candidates[node] = info
        if not candidates:
            return []
        log(INFO, "[onboard] %s: %d node(s) joined the running federation: %s", phase, len(candidates),
            sorted(candidates))
        return self.onboarder.onboard(grid, candidates, self.state, package_round, phase, decide=self.join_training)

    def join_training(self, entry: dict[str, Any]) -> None:
        """An onboarded node with labelled training images becomes a training client (a new
        client index after the configured ones) when ``coldstart_join_training`` is set."""
        if not self.cfg.coldstart_join_training or entry.get("status") != "onboarded":
            return
        if not entry.get("metrics", {}).get("can_train"):
            log(INFO, "[onboard] node %d has no labelled training images: it stays a cold-start node",
                entry["node_id"])
            return
        if self.cfg.algorithm not in ONBOARD_JOIN_ALGORITHMS:
            log(WARNING, "[onboard] coldstart_join_training is supported for %s, not %s: node %d does not train",
                ", ".join(ONBOARD_JOIN_ALGORITHMS), self.cfg.algorithm, entry["node_id"])
            return
        index = max([self.cfg.num_partitions - 1, *self.joined]) + 1
        self.joined[index] = entry["node_id"]
        self.node_of[index] = entry["node_id"]
        self.state = ServerState(self.state.arrays, onb.grow_client_rows(self.state.extra, index + 1,
                                                                         self.cfg.num_experts))
        entry["joined_as_client"] = index
        log(INFO, "[onboard] node %d joins training as client %d from the next round on", entry["node_id"], index)

    def _message(self, client: int, message_type: str, arrays: Mapping[str, torch.Tensor],
                 config: Mapping[str, Any], records: dict[tuple, ArrayRecord] | None = None) -> Message:
        """``records``: ArrayRecords already built in this batch of messages, by the identity of
        their tensors, so that clients sent the same arrays (FedAvg's model, one of FedCoE's
        expert sets) share one conversion instead of one each."""
        if records is None:
            array_record = to_array_record(arrays)
        else:
            ident = tuple((k, id(v)) for k, v in arrays.items())
            array_record = records.get(ident)
            if array_record is None:
                array_record = records[ident] = to_array_record(arrays)
        content = RecordDict({ARRAYS: array_record, CONFIG: config_record(config),
                              EXPERIMENT: self._experiment_record})
        self.comm["bytes_down"] += array_bytes(arrays, relayed=False)
        self.comm["bytes_p2p_relayed"] += array_bytes(arrays, relayed=True)
        return Message(content=content, dst_node_id=self.node_of[client], message_type=message_type)

    def _client_of(self, node_id: int) -> int | None:
        return next((c for c, n in self.node_of.items() if n == node_id), None)

    # ------------------------------------------------------------ training
    def sample_clients(self) -> list[int]:
        n = self.cfg.num_clients
        if self.joined:  # onboarded nodes that train: sampled like everyone else
            pool = list(range(n)) + sorted(self.joined)
            k = max(1, int(round(self.cfg.fraction_train * len(pool))))
            return sorted(int(c) for c in self.rng.choice(pool, size=k, replace=False)) if k < len(pool) else pool
        k = max(1, int(round(self.cfg.fraction_train * n)))
        return sorted(int(c) for c in self.rng.choice(n, size=k, replace=False)) if k < n else list(range(n))

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._sent = {}
        self._train_bytes_down = 0
        self._round_started = time.time()
        msgs = []
        records: dict[tuple, ArrayRecord] = {}  # payload tensors stay alive until the round's messages are built
        for client in self.sample_clients():
            payload, pconfig = self.algorithm.train_payload(self.state, self.cfg, client, server_round)
            pconfig = {**pconfig, "server_round": server_round}
            if client in self.joined:
                pconfig["joined"] = True  # an onboarded cold-start node allowed to train
            self._sent[client] = (self.node_of[client], payload, pconfig)
            self._train_bytes_down += array_bytes(payload, relayed=False)
            msgs.append(self._message(client, "train", payload, pconfig, records))
        return msgs

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        valid: list[Reply] = []
        rejected: dict[int, str] = {}
        answered: set[int] = set()
        for reply in replies:
            if reply.has_error():
                continue  # attributed below: the node is among those that never answered
            client = self._client_of(reply.metadata.src_node_id)
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
            self.comm["bytes_up"] += array_bytes(arrays, relayed=False)
            self.comm["bytes_p2p_relayed"] += array_bytes(arrays, relayed=True)
            expected = self.algorithm.expected_upload(payload, pconfig, self.cfg)
            reason = validate_reply(arrays, metrics, expected, payload, self.cfg.max_update_norm_ratio)
            if reason:
                rejected[client] = reason
                continue
            valid.append(Reply(client, int(metrics["num_samples"]), arrays, metrics))
        valid.sort(key=lambda r: r.client_index)  # aggregation order must not depend on arrival
        self._has_trained.update(r.client_index for r in valid)
        failed = sorted(set(self._sent) - answered)
        for client in failed:
            log(WARNING, "[round %d] client %d (node %d) failed or timed out; left out", server_round,
                client, self._sent[client][0])
        for client, reason in rejected.items():
            log(WARNING, "[round %d] rejected update of client %d (node %d): %s", server_round, client,
                self._sent[client][0], reason)
        needed = int(np.ceil(self.cfg.min_reply_fraction * len(self._sent)))
        if len(valid) < needed:
            raise FederationError(
                f"round {server_round}: only {len(valid)} of {len(self._sent)} sampled clients sent a valid "
                f"update, fewer than min_reply_fraction={self.cfg.min_reply_fraction} requires ({needed}); "
                f"failed: {failed}, rejected: {rejected}. The last checkpoint is in {self.results.checkpoint_dir}")
        self.state, diagnostics = self.algorithm.aggregate(self.state, valid, self.cfg, server_round)
        n = np.array([r.num_samples for r in valid], dtype=float)
        loss = float(np.dot(n, [r.metrics.get("train_loss", np.nan) for r in valid]) / n.sum())
        record = {"round": server_round, "train_loss": loss, "clients": len(self._sent),
                  # compute: the clients' local training time summed over the round
                  "client_train_s": float(sum(r.metrics.get("train_time_s", 0.0) for r in valid)),
                  "replies": len(valid), "failed": failed, "rejected": sorted(rejected),
                  "train_bytes_down": self._train_bytes_down,
                  "bytes_down_total": self.comm["bytes_down"], "bytes_up_total": self.comm["bytes_up"],
                  "started_at": self._round_started, "aggregated_at": time.time(),
                  "time_s": time.time() - self._round_started, **diagnostics}
        self.round_log.append(record)
        self.results.log_round(record)
        return None, MetricRecord({"train_loss": loss})

    # ------------------------------------------------------------ evaluation
    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        """Personalised evaluation of every training client and, unless the new-client
        model needs the training clients' private parts first, the cold-start clients."""
        msgs = []
        clients_global = not self.algorithm.has_global_model
        joined = sorted(c for c in self.joined if c in self._has_trained)  # evaluated once they trained
        for client in list(range(self.cfg.num_clients)) + joined:
            payload, pconfig = self.algorithm.eval_payload(self.state, self.cfg, client)
            msgs.append(self._message(client, "evaluate", payload,
                                      {**pconfig, "server_round": server_round, "global_test": clients_global}))
        if not self.algorithm.coldstart_needs_client_parts:
            msgs += self.configure_coldstart(server_round, None)
        return msgs

    def configure_coldstart(self, server_round: int, client_parts: list[tuple[dict[str, torch.Tensor], int]] | None
                            ) -> list[Message]:
        if not self.cfg.num_coldstart_clients:
            return []
        payload, pconfig = self.algorithm.coldstart_payload(self.state, self.cfg, client_parts)
        return [self._message(client, "evaluate.coldstart", payload, {**pconfig, "server_round": server_round})
                for client in range(self.cfg.num_clients, self.cfg.num_partitions)]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]) -> MetricRecord | None:
        personal: list[tuple[float, int, float | None]] = []
        cold: list[dict[str, Any]] = []
        for reply in replies:
            if reply.has_error():
                log(WARNING, "[round %d] evaluation failed on a node: %s", server_round, reply.error)
                continue
            metrics = dict(reply.content.metric_records[METRICS])
            if reply.metadata.message_type == "evaluate.coldstart":
                cold.append(metrics)
            else:
                personal.append((metrics["accuracy"], int(metrics["num_test"]), metrics.get("global_accuracy")))
        out: dict[str, Any] = {}
        if personal:
            out.update(summarise_personalised([p[0] for p in personal], [p[1] for p in personal]))
            if not self.algorithm.has_global_model:
                out["global_accuracy"] = float(np.mean([p[2] for p in personal]))
                out["global_accuracy_source"] = "mean of client models"
        if cold:
            w = np.array([c["num_test"] for c in cold], dtype=float)
            for key in sorted({k for c in cold for k in c if k.startswith("coldstart_accuracy")}):
                vals = [(c[key], wi) for c, wi in zip(cold, w) if key in c]
                out[key] = float(sum(v * wi for v, wi in vals) / sum(wi for _, wi in vals))
            rows = [c["routing_row"] for c in cold if "routing_row" in c]
            if rows:
                out["coldstart_routing_rows"] = rows
        self._last_eval = out
        return MetricRecord({k: v for k, v in out.items() if isinstance(v, (int, float))}) if out else None

    def evaluate_global(self) -> dict[str, Any]:
        """The global model's accuracy on the global test set, plus the method's diagnostics."""
        predict = self.algorithm.global_predict(self.state, self.cfg, self.num_classes, self.device)
        if predict is None:
            return {}
        if self._global_test is None:
            self._global_test = load_global_test(self.cfg)
        x, y = self._global_test
        return {"global_accuracy": accuracy(predict, x, y, self.cfg, self.device),
                "global_accuracy_source": "global model",
                **self.algorithm.global_diagnostics(self.state, self.cfg, self.num_classes, self.device, x, y)}

    def evaluate(self, server_round: int, grid: Grid) -> dict[str, Any]:
        replies = list(grid.send_and_receive(
            self.configure_evaluate(server_round, ArrayRecord(), ConfigRecord(), grid),
            timeout=self.cfg.round_timeout))
        if self.algorithm.coldstart_needs_client_parts:
            parts = []
            for reply in replies:
                if not reply.has_error() and ARRAYS in reply.content.array_records:
                    arrays = from_array_record(reply.content.array_records[ARRAYS])
                    self.comm["bytes_eval_up"] += array_bytes(arrays)
                    parts.append((arrays, int(reply.content.metric_records[METRICS]["num_samples"])))
            replies += list(grid.send_and_receive(self.configure_coldstart(server_round, parts),
                                                  timeout=self.cfg.round_timeout))
        self.aggregate_evaluate(server_round, replies)
        client_metrics = self._last_eval
        record: dict[str, Any] = {"round": server_round}
        record.update(self.evaluate_global())
        record.update(client_metrics)
        record.setdefault("global_accuracy", None)
        record.setdefault("personalized_accuracy", None)
        record.setdefault("coldstart_accuracy", None)
        record["train_loss"] = self.round_log[-1]["train_loss"] if self.round_log else None
        record["elapsed_s"] = round(time.time() - self.results.started, 2)
        record.update(self.comm)
        return record

    # ------------------------------------------------------------ the run
    def summary(self) -> None:
        log(INFO, "[fedcoe] algorithm=%s rounds=%d clients=%d (+%d cold start) model=%s experts=%d "
            "device=%s results=%s", self.cfg.algorithm, self.cfg.num_rounds, self.cfg.num_clients,
            self.cfg.num_coldstart_clients, self.cfg.model, self.cfg.num_experts, self.device, self.results.dir)

    def start(self, grid: Grid, initial_arrays: ArrayRecord | None = None, num_rounds: int | None = None,
              timeout: float | None = None, train_config: ConfigRecord | None = None,
              evaluate_config: ConfigRecord | None = None, evaluate_fn: Any = None) -> dict[str, Any]:
        self.summary()
        if self.cfg.resume or self.cfg.resume_from:
            ckpt = Path(self.cfg.resume_from) if self.cfg.resume_from else self.results.latest_checkpoint()
            if ckpt is not None and not ckpt.is_file():
                raise FederationError(f"resume_from='{ckpt}' does not exist")
            if ckpt is None:
                log(WARNING, "[fedcoe] resume=true but no checkpoint in %s; starting at round 1",
                    self.results.checkpoint_dir)
            else:
                self.restore(torch.load(ckpt, weights_only=False))
                log(INFO, "[fedcoe] resumed from %s (round %d done)", ckpt, self.round)
        status = "running"
        try:
            self.discover(grid)
            for server_round in range(self.round + 1, self.cfg.num_rounds + 1):
                t0 = time.time()
                log(INFO, "")
                log(INFO, "[ROUND %d/%d]", server_round, self.cfg.num_rounds)
                self.check_new_nodes(grid, self.round, f"before round {server_round}")
                replies = grid.send_and_receive(
                    self.configure_train(server_round, ArrayRecord(), ConfigRecord(), grid),
                    timeout=self.cfg.round_timeout)
                self.aggregate_train(server_round, replies)
                last = self.round_log[-1]
                log(INFO, "[round %d] train_loss=%.4f replies=%d/%d (%.1fs)", server_round, last["train_loss"],
                    last["replies"], last["clients"], time.time() - t0)
                if self.cfg.eval_every and (server_round % self.cfg.eval_every == 0
                                            or server_round == self.cfg.num_rounds):
                    self.check_new_nodes(grid, server_round, f"after round {server_round} training")
                    record = self.evaluate(server_round, grid)
                    self.history.append(record)
                    self.results.log_metrics(record)
                    log(INFO, "[round %d] global=%s personalised=%s cold-start=%s", server_round,
                        _fmt(record["global_accuracy"]), _fmt(record["personalized_accuracy"]),
                        _fmt(record["coldstart_accuracy"]))
                    diagnostics = {k: last[k] for k in DIAGNOSTICS if k in last}
                    diagnostics.update({k: record[k] for k in DIAGNOSTICS if k in record})
                    if diagnostics:
                        log(INFO, "[round %d] diagnostics %s", server_round, json.dumps(
                            {k: _round(v) for k, v in diagnostics.items()}))
                    self.results.write_summary("running", self.history, {"communication": self.comm})
                self.round = server_round
                self.results.save_checkpoint(self.checkpoint_payload(), server_round)
            status = "finished"
        except BaseException as err:
            status = f"failed: {type(err).__name__}: {err}"
            log(ERROR, "[fedcoe] run stopped at round %d: %s", self.round + 1, err)
            raise
        finally:
            self.results.write_summary(status, self.history, {
                "communication": self.comm, "rounds_completed": self.round,
                "checkpoint": str(self.results.latest_checkpoint() or "")})
            self.results.plot(self.history)
            if "correlation" in self.state.extra:
                self.results.plot_correlation(self.state.extra["correlation"], self.state.extra["correlation_known"])
            if status == "finished":
                self.results.save_final_state(self.checkpoint_payload())
        log(INFO, "[fedcoe] finished: results in %s", self.results.dir)
        return self.history[-1] if self.history else {}


DIAGNOSTICS = ("expert_usage_entropy", "correlation_row_entropy", "correlation_spread",
               "expert_max_client_share", "expert_global_accuracy")


def _round(value: Any) -> Any:
    return [round(v, 3) for v in value] if isinstance(value, list) else round(value, 3)


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"
