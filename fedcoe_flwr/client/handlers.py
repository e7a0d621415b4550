"""ClientApp handlers: one shared preamble (``Call``) unpacks the message, then each
handler calls the method's client hook and packs the reply. The same code runs in Ray
simulation and on a networked SuperNode; ``handle_train_cohort`` answers several nodes'
training messages with one vectorised cohort (the simulation's cohort backend)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any

import torch
from flwr.app import Context, Message, RecordDict

from ..algorithms import get_algorithm
from ..algorithms.adaptation import prior_share
from ..algorithms.base import Algorithm, ClientStep
from ..algorithms.training import accuracy
from ..cohort import DEFAULT_CHUNK_SIZE, train_clients
from ..config import ExperimentConfig
from ..data import ClientData, DataError, federation_classes, is_coldstart, load_global_test
from ..models import pick_device
from ..records import (ARRAYS, CONFIG, EXPERIMENT, METRICS, config_record, experiment_from_record,
                       from_array_record, metric_record, to_array_record)
from .node import NodeConfigError, NodeRole, client_data, client_seed, configure_threads, data_mode, node_role
from .private_state import journal, private_parts, save_private_state, state_checksum


@dataclass
class Call:
    """What every handler starts from: the experiment config, the payload and its config,
    who this node is (its role and client index), the method, and where to compute."""

    msg: Message
    context: Context
    cfg: ExperimentConfig
    arrays: dict[str, torch.Tensor]
    config: dict[str, Any]
    role: NodeRole
    index: int
    algorithm: Algorithm
    num_classes: int
    device: torch.device

    @classmethod
    def of(cls, msg: Message, context: Context) -> "Call":
        configure_threads(context.node_config)
        cfg = experiment_from_record(msg.content.config_records[EXPERIMENT])
        role = node_role(context)
        return cls(msg, context, cfg, from_array_record(msg.content.array_records[ARRAYS]),
                   dict(msg.content.config_records[CONFIG]), role, role.index(cfg), get_algorithm(cfg.algorithm),
                   len(federation_classes(cfg, mode=data_mode(role))), pick_device(cfg.device))

    @property
    def server_round(self) -> int:
        return int(self.config.get("server_round", 0))

    def data(self) -> ClientData:
        return client_data(self.cfg, self.role, self.index)

    def step(self, private: dict[str, torch.Tensor] | None, data: ClientData | None, seed: int = 0) -> ClientStep:
        return ClientStep(self.arrays, self.config, private, data, self.cfg, self.num_classes, self.device, seed)

    def reply(self, arrays: dict[str, torch.Tensor] | None, metrics: dict[str, Any]) -> Message:
        content = RecordDict({METRICS: metric_record(metrics)})
        if arrays is not None:
            content[ARRAYS] = to_array_record(arrays)
        return Message(content=content, reply_to=self.msg)


def handle_profile(msg: Message, context: Context) -> Message:
    """Tell the server this node's client index ('partition-id') and the federation size
    it expects ('num-partitions'). A site checks its role and its data here, so a wrong
    node config or an unknown class folder stops the run before training."""
    role = node_role(context)
    records = msg.content.config_records
    cfg = experiment_from_record(records[EXPERIMENT]) if EXPERIMENT in records else None
    if role.mode == "partition":
        pid, num = role.site_id, int(role.num_partitions)  # type: ignore[arg-type]
    else:
        if cfg is None:
            raise NodeConfigError("this server sent no experiment config with its profile query, which a site "
                                  "needs to find its client index")
        pid, num = role.index(cfg), cfg.num_partitions
        if not role.new_site:  # a new site's data is checked when it is onboarded
            load_site_data_checked(role, cfg)
    coldstart = bool(role.coldstart) if role.coldstart is not None else (cfg is not None and is_coldstart(cfg, pid))
    info: dict[str, Any] = {"partition-id": pid, "num-partitions": num, "site": role.key,
                            "state-dir": bool(role.state_dir), "cold-start": coldstart}
    return Message(content=RecordDict({CONFIG: config_record(info)}), reply_to=msg)


def load_site_data_checked(role: NodeRole, cfg: ExperimentConfig) -> ClientData:
    data = client_data(cfg, role, role.index(cfg))
    if not role.coldstart and data.num_train == 0:
        raise DataError(f"training site {role.key} has no images under {role.data_dir}/train/<class>/")
    return data


@dataclass
class TrainCall:
    """A training call up to the training itself: its ``Call``, the method's step and the
    private parts it started from (and where they came from, for the journal)."""

    call: Call
    step: ClientStep
    private_in: dict[str, torch.Tensor] | None
    source: str

    @classmethod
    def of(cls, msg: Message, context: Context) -> "TrainCall":
        call = Call.of(msg, context)
        role, cfg, pid = call.role, call.cfg, call.index
        if (is_coldstart(cfg, pid) or role.coldstart) and not call.config.get("joined"):
            raise ValueError(f"client {pid} ({role.key}) is a cold-start client and must never train")
        private_in, source = private_parts(context, role, cfg, before_round=call.server_round)
        return cls(call, call.step(private_in, call.data(), client_seed(cfg, pid, call.server_round)), private_in,
                   source)

    def reply(self, result: tuple[dict[str, torch.Tensor], dict[str, torch.Tensor] | None, dict[str, Any]],
              train_time_s: float) -> Message:
        """Save the new private parts, journal them and reply with the upload."""
        call, role, cfg = self.call, self.call.role, self.call.cfg
        upload, private, metrics = result
        metrics["train_time_s"] = train_time_s
        if private:
            crc_out = save_private_state(role, cfg, call.context, private, call.server_round)
            journal(role, cfg, {"round": call.server_round, "phase": "train", "source": self.source,
                                "crc_in": state_checksum(self.private_in), "crc_out": crc_out,
                                "run_id": int(call.context.run_id)})
        return call.reply(upload, metrics)


def handle_train(msg: Message, context: Context) -> Message:
    train = TrainCall.of(msg, context)
    started = time.perf_counter()
    result = train.call.algorithm.client_train(train.step)
    return train.reply(result, time.perf_counter() - started)


def handle_train_cohort(calls: list[tuple[Message, Context]], chunk_size: int = DEFAULT_CHUNK_SIZE
                        ) -> list[Message | Exception]:
    """Several nodes' training messages in one call (simulation, ``cohort.backend``): each
    call prepared and answered as ``handle_train`` does, the training of all of them one
    ``cohort.train_clients`` call. Returns each call's reply, or the exception that failed
    it (a bad call fails alone; a failure in training fails the whole cohort). Each reply's
    ``train_time_s`` is the cohort's training time shared equally."""
    out: list[Message | Exception | None] = [None] * len(calls)
    prepared: list[tuple[int, TrainCall]] = []
    for i, (msg, context) in enumerate(calls):
        try:
            prepared.append((i, TrainCall.of(msg, context)))
        except Exception as err:  # noqa: BLE001 - reported as this call's error reply
            out[i] = err
    if prepared:
        try:
            started = time.perf_counter()
            results = train_clients(prepared[0][1].call.algorithm, [t.step for _, t in prepared], chunk_size)
            share = (time.perf_counter() - started) / len(prepared)
            for (i, train), result in zip(prepared, results):
                out[i] = train.reply(result, share)
        except Exception as err:  # noqa: BLE001
            for i, _ in prepared:
                out[i] = out[i] if isinstance(out[i], Message) else err
    return out  # type: ignore[return-value]


def handle_evaluate(msg: Message, context: Context) -> Message:
    """Personalised accuracy on the local test split; for methods with no single
    global model also this client's model on the global test set."""
    call = Call.of(msg, context)
    cfg, role, device = call.cfg, call.role, call.device
    data = call.data()
    private, source = private_parts(context, role, cfg, before_round=call.server_round + 1)
    predict = call.algorithm.client_predict(call.step(private, None))
    metrics: dict[str, Any] = {"accuracy": accuracy(predict, data.test_x, data.test_y, cfg, device),
                               "num_test": int(len(data.test_y)), "num_samples": data.num_train}
    if call.config.get("global_test"):
        try:
            gx, gy = load_global_test(cfg, role.global_test_dir, mode=data_mode(role))
        except DataError as err:
            raise DataError(f"{cfg.algorithm} has no single global model, so its global accuracy is the mean of "
                            f"the client models on the global test set, which this node cannot load: {err}") from err
        metrics["global_accuracy"] = accuracy(predict, gx, gy, cfg, device)
        gate = call.algorithm.client_gate(call.step(private, None))
        if gate is not None:  # a per-client mixture: how its gate routes the global test set
            from ..algorithms.specialisation import client_gate_counts  # matplotlib: not at every start-up

            metrics.update(client_gate_counts(gate, gx, gy, call.num_classes, cfg, device))
    journal(role, cfg, {"round": call.server_round, "phase": "evaluate", "source": source,
                        "crc_in": state_checksum(private), "run_id": int(context.run_id)})
    upload = call.algorithm.client_eval_upload(call.step(private, None)) \
        if call.algorithm.coldstart_needs_client_parts else None
    return call.reply(upload, metrics)


def handle_coldstart(msg: Message, context: Context) -> Message:
    """A client that never trained gets the new-client model and no gradient step."""
    call = Call.of(msg, context)
    data = call.data()
    metrics = call.algorithm.client_coldstart(call.step(None, data))
    metrics.setdefault("num_test", int(len(data.test_y)))
    return call.reply(None, metrics)


def handle_prior(msg: Message, context: Context) -> Message:
    """A training client's share of the federation's predicted training prior and temperature
    (``adaptation.prior_share``) for the new-client model (the cold-start package). No image or
    label leaves the node, only a few floats per class and temperature."""
    call = Call.of(msg, context)
    predict, _ = call.algorithm.new_client_model(call.step(None, None))
    return call.reply(None, prior_share(predict, call.data(), call.cfg, call.device))
