"""The three metrics of every evaluation round: global accuracy (the method's global model
on the global test set, or the mean of the clients' models on it), personalised accuracy
(each training client's model on its own test split: weighted mean, mean, 10th
percentile) and cold-start accuracy (clients that never trained, no gradient step).

Every method with a global or new-client model is also scored with the label-free adaptations
of ``algorithms.adaptation``: the training clients predict the federation's training prior with
the new-client model (one more exchange), the cold-start clients get it for EM, and every
global model gets ``global_accuracy_balanced``, that prior divided out."""

from __future__ import annotations

from logging import WARNING
from typing import Any, Iterable

import numpy as np
import torch
from flwr.app import Message
from flwr.common.logger import log
from flwr.serverapp import Grid

from ..algorithms.adaptation import (PREDICTED_PRIOR_RECORD, TRAIN_PRIOR_KEY, Calibration, balanced,
                                     calibration_config, calibration_record, federation_calibration, tempered_prior)
from ..algorithms.base import Algorithm, ServerState
from ..algorithms.specialisation import COUNTS_KEY, mean_client_mi_bits
from ..algorithms.training import accuracy
from ..config import ExperimentConfig
from ..data import load_global_test
from ..records import ARRAYS, METRICS, from_array_record
from .exchange import exchange
from .messages import Messenger
from .nodes import NodeDirectory

COLDSTART = "evaluate.coldstart"
PRIOR = "evaluate.prior"


def summarise_personalised(accs: list[float], weights: list[int]) -> dict[str, float]:
    a, w = np.array(accs, dtype=float), np.array(weights, dtype=float)
    return {"personalized_accuracy": float((a * w).sum() / w.sum()),
            "personalized_accuracy_mean": float(a.mean()),
            "personalized_accuracy_p10": float(np.percentile(a, 10)),
            "personalized_accuracy_per_client": [float(v) for v in a]}


class Evaluator:
    def __init__(self, cfg: ExperimentConfig, algorithm: Algorithm, messenger: Messenger, nodes: NodeDirectory,
                 num_classes: int, device: torch.device):
        self.cfg, self.algorithm, self.messenger, self.nodes = cfg, algorithm, messenger, nodes
        self.num_classes, self.device = num_classes, device
        self._global_test: tuple[torch.Tensor, torch.Tensor] | None = None

    def personalised_messages(self, state: ServerState, server_round: int, has_trained: set[int]) -> list[Message]:
        """Every training client (and each onboarded node that trained) and, unless the
        new-client model needs the training clients' private parts first, the cold-start clients."""
        clients_global = not self.algorithm.has_global_model
        joined = sorted(c for c in self.nodes.joined if c in has_trained)
        msgs = []
        for client in list(range(self.cfg.num_clients)) + joined:
            payload, pconfig = self.algorithm.eval_payload(state, self.cfg, client)
            msgs.append(self.messenger.message(self.nodes.node_of[client], "evaluate", payload,
                                               {**pconfig, "server_round": server_round,
                                                "global_test": clients_global}))
        return msgs

    def coldstart_messages(self, package: tuple[dict[str, torch.Tensor], dict[str, Any]], server_round: int,
                           prior: torch.Tensor | None, calibration: Calibration | None = None) -> list[Message]:
        payload, pconfig = package
        extra = {TRAIN_PRIOR_KEY: [float(v) for v in prior]} if prior is not None else {}
        extra.update(calibration_config(calibration))
        return [self.messenger.message(self.nodes.node_of[client], COLDSTART, payload,
                                       {**pconfig, **extra, "server_round": server_round})
                for client in range(self.cfg.num_clients, self.cfg.num_partitions)]

    def predicted_prior(self, grid: Grid, package: tuple[dict[str, torch.Tensor], dict[str, Any]],
                        server_round: int) -> tuple[torch.Tensor | None, Calibration | None]:
        """The federation's training prior as the new-client model predicts it: every training
        client's mean class probabilities on its own images, sample-weighted (None when no
        client answered); and the federation's temperature with the prior at it
        (``adaptation.federation_calibration``)."""
        payload, pconfig = package
        msgs = [self.messenger.message(self.nodes.node_of[client], PRIOR, payload,
                                       {**pconfig, "server_round": server_round})
                for client in range(self.cfg.num_clients)]
        shares = []
        for reply in exchange(grid, msgs, self.cfg):
            if reply.has_error():
                log(WARNING, "[round %d] training-prior prediction failed on a node: %s", server_round, reply.error)
                continue
            shares.append(reply.content.metric_records[METRICS])
        trained = any(int(m["num_samples"]) > 0 for m in shares)
        return (tempered_prior(shares, 0) if trained else None), federation_calibration(shares)

    def client_metrics(self, server_round: int, replies: Iterable[Message]) -> dict[str, Any]:
        personal: list[tuple[float, int, float | None]] = []
        gates: list[dict[str, Any]] = []  # per-client mixtures: each gate's top-expert counts
        cold: list[dict[str, Any]] = []
        for reply in replies:
            if reply.has_error():
                log(WARNING, "[round %d] evaluation failed on a node: %s", server_round, reply.error)
                continue
            metrics = dict(reply.content.metric_records[METRICS])
            if reply.metadata.message_type == COLDSTART:
                cold.append(metrics)
            else:
                personal.append((metrics["accuracy"], int(metrics["num_test"]), metrics.get("global_accuracy")))
                if COUNTS_KEY in metrics:
                    gates.append(metrics)
        out: dict[str, Any] = {}
        scored = [p for p in personal if p[1] > 0]  # test_fraction 0: clients train on all, nothing to score
        if scored:
            out.update(summarise_personalised([p[0] for p in scored], [p[1] for p in scored]))
            if not self.algorithm.has_global_model:
                out["global_accuracy"] = float(np.mean([p[2] for p in personal]))
                out["global_accuracy_source"] = "mean of client models"
        out.update(mean_client_mi_bits(gates, self.num_classes))
        if cold:
            w = np.array([c["num_test"] for c in cold], dtype=float)
            for key in sorted({k for c in cold for k in c if k.startswith("coldstart_accuracy")}):
                vals = [(c[key], wi) for c, wi in zip(cold, w) if key in c]
                out[key] = float(sum(v * wi for v, wi in vals) / sum(wi for _, wi in vals))
            rows = [c["routing_row"] for c in cold if "routing_row" in c]
            if rows:
                out["coldstart_routing_rows"] = rows
        return out

    def global_metrics(self, state: ServerState, prior: torch.Tensor | None = None) -> dict[str, Any]:
        """The global model's accuracy on the global test set, plus the method's diagnostics;
        with ``prior`` (the predicted training prior) also the balanced global model."""
        predict = self.algorithm.global_predict(state, self.cfg, self.num_classes, self.device)
        if predict is None:
            return {}
        if self._global_test is None:
            self._global_test = load_global_test(self.cfg)
        x, y = self._global_test
        out = {"global_accuracy": accuracy(predict, x, y, self.cfg, self.device),
               "global_accuracy_source": "global model",
               **self.algorithm.global_diagnostics(state, self.cfg, self.num_classes, self.device, x, y)}
        if prior is not None:
            out["global_accuracy_balanced"] = accuracy(balanced(predict, prior), x, y, self.cfg, self.device)
        return out

    def evaluate(self, grid: Grid, state: ServerState, server_round: int, has_trained: set[int]) -> dict[str, Any]:
        replies = exchange(grid, self.personalised_messages(state, server_round, has_trained), self.cfg)
        parts = None
        if self.algorithm.coldstart_needs_client_parts:
            parts = []
            for reply in replies:
                if not reply.has_error() and ARRAYS in reply.content.array_records:
                    arrays = from_array_record(reply.content.array_records[ARRAYS])
                    self.messenger.count_eval_upload(arrays)
                    parts.append((arrays, int(reply.content.metric_records[METRICS]["num_samples"])))
        prior, calibration = None, None
        if self.cfg.num_coldstart_clients or self.algorithm.has_global_model:
            package = self.algorithm.coldstart_payload(state, self.cfg, parts)
            prior, calibration = self.predicted_prior(grid, package, server_round)
            if self.cfg.num_coldstart_clients:
                cold = self.coldstart_messages(package, server_round, prior, calibration)
                replies += exchange(grid, cold, self.cfg)
        record: dict[str, Any] = {"round": server_round}
        record.update(self.global_metrics(state, prior))
        if prior is not None:
            record[PREDICTED_PRIOR_RECORD] = [round(float(v), 5) for v in prior]
        record.update(calibration_record(calibration))  # what a site onboarded later calibrates with
        record.update(self.client_metrics(server_round, replies))
        for key in ("global_accuracy", "personalized_accuracy", "coldstart_accuracy"):
            record.setdefault(key, None)
        return record
