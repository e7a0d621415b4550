"""Conversions between the algorithms' tensors/configs and Flower records."""

from __future__ import annotations

import zlib
from typing import Any, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

from .config import ExperimentConfig, from_dict

EXPERIMENT = "experiment"  # the validated ExperimentConfig, sent with every message
ARRAYS = "arrays"
CONFIG = "config"
METRICS = "metrics"
# keys the server only relays between clients (peer-to-peer traffic, counted apart)
RELAY_PREFIX = "relay."


def tensors_crc(arrays: Mapping[str, torch.Tensor]) -> int:
    """CRC-32 over keys, dtypes, shapes and bytes: the same tensors give the same number on
    the server, on a node and in a test that rebuilds them (a value to compare, not a log line)."""
    crc = 0
    for key in sorted(arrays):
        t = arrays[key].detach().cpu().contiguous()
        crc = zlib.crc32(f"{key}|{t.dtype}|{tuple(t.shape)}".encode(), crc)
        crc = zlib.crc32(t.reshape(-1).view(torch.uint8).numpy().tobytes(), crc)
    return crc


def to_array_record(arrays: Mapping[str, torch.Tensor]) -> ArrayRecord:
    return ArrayRecord(torch_state_dict={k: v.detach().cpu() for k, v in arrays.items()})


def from_array_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    return dict(record.to_torch_state_dict())


def experiment_record(cfg: ExperimentConfig) -> ConfigRecord:
    return ConfigRecord(cfg.to_dict())


def experiment_from_record(record: ConfigRecord) -> ExperimentConfig:
    return from_dict(dict(record))


def config_record(values: Mapping[str, Any]) -> ConfigRecord:
    return ConfigRecord(dict(values))


def metric_record(values: Mapping[str, Any]) -> MetricRecord:
    """Numbers and lists of numbers only (MetricRecord's types)."""
    clean: dict[str, Any] = {}
    for key, value in values.items():
        if isinstance(value, bool):
            clean[key] = int(value)
        elif isinstance(value, (int, float)):
            clean[key] = value
        elif isinstance(value, (list, tuple)) and all(isinstance(v, (int, float)) for v in value):
            clean[key] = [float(v) for v in value]
    return MetricRecord(clean)


def array_bytes(arrays: Mapping[str, torch.Tensor], relayed: bool | None = None) -> int:
    """Bytes of the tensors; ``relayed`` True/False counts only relayed/other keys."""
    return int(sum(v.numel() * v.element_size() for k, v in arrays.items()
                   if relayed is None or k.startswith(RELAY_PREFIX) == relayed))
