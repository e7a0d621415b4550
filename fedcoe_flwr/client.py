"""ClientApp handlers: unpack records, call the method's pure client functions, pack
the reply. Private parts live in ``context.state`` (they never leave the client)."""

from __future__ import annotations

import logging
import time
import zlib
from typing import Any

import torch
from flwr.app import Context, Message, RecordDict

from .algorithms import get_algorithm
from .algorithms.common import accuracy
from .config import ExperimentConfig
from .data import federation_classes, is_coldstart, load_client_data, load_global_test
from .models import pick_device
from .records import (ARRAYS, CONFIG, EXPERIMENT, METRICS, config_record, experiment_from_record,
                      from_array_record, metric_record, to_array_record)

log = logging.getLogger(__name__)
PRIVATE = "private"


def configure_threads() -> None:
    """In a Ray actor, use as many torch threads as CPUs Ray gave it: several actors
    each using every core oversubscribe the machine (measured 5x slower steps)."""
    global _THREADS_SET
    if _THREADS_SET:
        return
    _THREADS_SET = True
    try:
        import ray

        if ray.is_initialized():
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
            if cpus:
                torch.set_num_threads(max(1, int(cpus)))
    except Exception as err:  # not fatal: torch keeps its default
        log.debug("could not read Ray's CPU assignment: %s", err)


_THREADS_SET = False  # a per-process setting, not client state


def partition_of(context: Context) -> tuple[int, int]:
    cfg = context.node_config
    if "partition-id" not in cfg or "num-partitions" not in cfg:
        raise ValueError("this SuperNode has no 'partition-id'/'num-partitions' in its node config; "
                         "start it with --node-config \"partition-id=0 num-partitions=N\"")
    return int(cfg["partition-id"]), int(cfg["num-partitions"])


def client_seed(cfg: ExperimentConfig, partition_id: int, server_round: int) -> int:
    return zlib.crc32(f"{cfg.seed}/{partition_id}/{server_round}".encode())


def _unpack(msg: Message) -> tuple[ExperimentConfig, dict[str, torch.Tensor], dict[str, Any]]:
    configure_threads()
    cfg = experiment_from_record(msg.content.config_records[EXPERIMENT])
    arrays = from_array_record(msg.content.array_records[ARRAYS])
    config = dict(msg.content.config_records[CONFIG])
    return cfg, arrays, config


def _private(context: Context) -> dict[str, torch.Tensor] | None:
    record = context.state.array_records.get(PRIVATE)
    return from_array_record(record) if record is not None else None


def _reply(msg: Message, arrays: dict[str, torch.Tensor] | None, metrics: dict[str, Any]) -> Message:
    content = RecordDict({METRICS: metric_record(metrics)})
    if arrays is not None:
        content[ARRAYS] = to_array_record(arrays)
    return Message(content=content, reply_to=msg)


def handle_profile(msg: Message, context: Context) -> Message:
    pid, num = partition_of(context)
    return Message(content=RecordDict({CONFIG: config_record({"partition-id": pid, "num-partitions": num})}),
                   reply_to=msg)


def handle_train(msg: Message, context: Context) -> Message:
    cfg, arrays, config = _unpack(msg)
    pid, _ = partition_of(context)
    if is_coldstart(cfg, pid):
        raise ValueError(f"partition {pid} is a cold-start client and must never train")
    algo = get_algorithm(cfg.algorithm)
    data = load_client_data(cfg, pid)
    num_classes = len(federation_classes(cfg))
    started = time.perf_counter()
    upload, private, metrics = algo.client_train(
        arrays, config, _private(context), data, cfg, num_classes, pick_device(cfg.device),
        client_seed(cfg, pid, int(config.get("server_round", 0))))
    if private:
        context.state[PRIVATE] = to_array_record(private)
    metrics["train_time_s"] = time.perf_counter() - started
    return _reply(msg, upload, metrics)


def handle_evaluate(msg: Message, context: Context) -> Message:
    """Personalised accuracy on the local test split; for methods with no single
    global model also this client's model on the global test set."""
    cfg, arrays, config = _unpack(msg)
    pid, _ = partition_of(context)
    algo = get_algorithm(cfg.algorithm)
    data = load_client_data(cfg, pid)
    num_classes = len(federation_classes(cfg))
    device = pick_device(cfg.device)
    private = _private(context)
    predict = algo.client_predict(arrays, config, private, cfg, num_classes, device)
    metrics: dict[str, Any] = {"accuracy": accuracy(predict, data.test_x, data.test_y, cfg, device),
                               "num_test": int(len(data.test_y)), "num_samples": data.num_train}
    if config.get("global_test"):
        gx, gy = load_global_test(cfg)
        metrics["global_accuracy"] = accuracy(predict, gx, gy, cfg, device)
    upload = algo.client_eval_upload(arrays, config, private, cfg) if algo.coldstart_needs_client_parts else None
    return _reply(msg, upload, metrics)


def handle_coldstart(msg: Message, context: Context) -> Message:
    """A client that never trained gets the new-client model and no gradient step."""
    cfg, arrays, config = _unpack(msg)
    pid, _ = partition_of(context)
    algo = get_algorithm(cfg.algorithm)
    data = load_client_data(cfg, pid)
    num_classes = len(federation_classes(cfg))
    metrics = algo.client_coldstart(arrays, config, data, cfg, num_classes, pick_device(cfg.device))
    metrics.setdefault("num_test", int(len(data.test_y)))
    return _reply(msg, None, metrics)
