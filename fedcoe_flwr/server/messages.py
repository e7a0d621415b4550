"""Messages to clients and the bytes they carry: server -> client, client -> server,
peer-to-peer traffic the server only relays, and evaluation-protocol uploads."""

from __future__ import annotations

from typing import Any, Mapping

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message, RecordDict

from ..records import ARRAYS, CONFIG, EXPERIMENT, array_bytes, config_record, to_array_record


class Messenger:
    def __init__(self, experiment: ConfigRecord):
        self.experiment = experiment  # the config never changes during a run
        self.comm = {"bytes_down": 0, "bytes_up": 0, "bytes_p2p_relayed": 0, "bytes_eval_up": 0}

    def message(self, node: int, message_type: str, arrays: Mapping[str, torch.Tensor], config: Mapping[str, Any],
                records: dict[tuple, ArrayRecord] | None = None) -> Message:
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
        content = RecordDict({ARRAYS: array_record, CONFIG: config_record(config), EXPERIMENT: self.experiment})
        self.comm["bytes_down"] += array_bytes(arrays, relayed=False)
        self.comm["bytes_p2p_relayed"] += array_bytes(arrays, relayed=True)
        return Message(content=content, dst_node_id=node, message_type=message_type)

    def query(self, node: int, message_type: str) -> Message:
        """A message that carries only the experiment config (profile queries)."""
        return Message(content=RecordDict({EXPERIMENT: self.experiment}), dst_node_id=node, message_type=message_type)

    def count_upload(self, arrays: Mapping[str, torch.Tensor]) -> None:
        self.comm["bytes_up"] += array_bytes(arrays, relayed=False)
        self.comm["bytes_p2p_relayed"] += array_bytes(arrays, relayed=True)

    def count_eval_upload(self, arrays: Mapping[str, torch.Tensor]) -> None:
        self.comm["bytes_eval_up"] += array_bytes(arrays)
