"""Conversions between the algorithms' tensors/configs and Flower records."""

from __future__ import annotations

import json
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


# An ArrayRecord's every Array is at least two objects that a SuperNode or the ServerApp pushes
# and pulls one RPC (and one SuperLink database write) each: a 146-tensor model made a 3-node
# round spend most of its time on them. Tensors are sent packed, one byte buffer per group of
# keys, with their names, dtypes and shapes in LAYOUT. A group is a key's first component (and
# its index when the second is one: ``expert.2``), so clients sent the same trunk or the same
# expert share that group's object in Flower's content-addressed store.
LAYOUT = "__layout__"


def _group_of(key: str) -> str:
    parts = key.split(".")
    return ".".join(parts[:2]) if len(parts) > 2 and parts[1].isdigit() else parts[0]


def to_array_record(arrays: Mapping[str, torch.Tensor]) -> ArrayRecord:
    layout: list[list[Any]] = []
    buffers: dict[str, list[torch.Tensor]] = {}
    for key, value in arrays.items():
        group = _group_of(key)
        if group == LAYOUT:
            raise ValueError(f"tensor name {key!r} is reserved for the packed layout")
        t = value.detach().cpu().contiguous()
        layout.append([key, str(t.dtype).removeprefix("torch."), list(t.shape)])
        buffers.setdefault(group, []).append(t.reshape(-1).view(torch.uint8))
    packed = {group: torch.cat(parts) for group, parts in buffers.items()}
    packed[LAYOUT] = torch.frombuffer(bytearray(json.dumps(layout).encode()), dtype=torch.uint8)
    return ArrayRecord(torch_state_dict=packed)


def from_array_record(record: ArrayRecord) -> dict[str, torch.Tensor]:
    """The tensors ``to_array_record`` packed, by name and in order; a record of plain arrays
    (any other Flower sender) as it is. A layout that does not fit its buffers: ValueError."""
    if LAYOUT not in record:
        return dict(record.to_torch_state_dict())
    try:
        layout = json.loads(record[LAYOUT].numpy().tobytes())
        buffers = {group: torch.from_numpy(record[group].numpy().reshape(-1))
                   for group in {_group_of(key) for key, _, _ in layout}}
        offsets = dict.fromkeys(buffers, 0)
        out: dict[str, torch.Tensor] = {}
        for key, dtype_name, shape in layout:
            dtype, group = getattr(torch, dtype_name), _group_of(key)
            start = offsets[group]
            offsets[group] = end = start + torch.Size(shape).numel() * dtype.itemsize
            chunk = buffers[group][start:end]
            if chunk.numel() != end - start:
                raise ValueError(f"group {group!r} holds {buffers[group].numel()} bytes, too few for {key!r}")
            out[key] = chunk.clone().view(dtype).reshape(shape)  # clone: an aligned buffer of its own
    except (KeyError, AttributeError, TypeError, json.JSONDecodeError) as err:
        raise ValueError(f"malformed packed arrays ({type(err).__name__}: {err})") from err
    if any(offsets[group] != buffers[group].numel() for group in buffers):
        raise ValueError("malformed packed arrays: bytes left over after the layout's tensors")
    return out


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
