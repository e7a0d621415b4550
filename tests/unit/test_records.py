"""Tensors to and from Flower's ArrayRecord: packed one buffer per key group, read back exactly."""

from __future__ import annotations

import pytest
import torch
from flwr.app import Array, ArrayRecord

from fedcoe_flwr.records import LAYOUT, from_array_record, tensors_crc, to_array_record


def mixed_tensors() -> dict[str, torch.Tensor]:
    torch.manual_seed(0)
    return {"trunk.conv.weight": torch.randn(4, 3, 3, 3), "trunk.bn.num_batches_tracked": torch.tensor(7),
            "expert.0.fc.weight": torch.randn(10, 4), "expert.1.fc.weight": torch.randn(10, 4),
            "gate.out.bias": torch.randn(3).half(), "prior": torch.rand(10, dtype=torch.float64),
            "mask": torch.tensor([True, False, True]), "empty": torch.zeros(0, 5)}


def test_round_trip_keeps_names_order_dtypes_shapes_and_values():
    arrays = mixed_tensors()
    back = from_array_record(to_array_record(arrays))
    assert list(back) == list(arrays)
    for key, value in arrays.items():
        assert back[key].dtype == value.dtype and back[key].shape == value.shape and torch.equal(back[key], value), key
    assert tensors_crc(back) == tensors_crc(arrays)


def test_one_array_per_group_and_shared_groups_are_identical_objects():
    """Far fewer Arrays than tensors (each Array is an RPC per hop); two payloads that share the
    trunk and expert 0 but not expert 1 give byte-identical Arrays for what they share, so
    Flower's content-addressed store keeps one copy."""
    arrays = mixed_tensors()
    record = to_array_record(arrays)
    assert sorted(record) == sorted(["trunk", "expert.0", "expert.1", "gate", "prior", "mask", "empty", LAYOUT])
    other = {**arrays, "expert.1.fc.weight": torch.zeros(10, 4)}
    record_b = to_array_record(other)
    for group in ("trunk", "expert.0", "gate"):
        assert record[group].object_id == record_b[group].object_id, group
    assert record["expert.1"].object_id != record_b["expert.1"].object_id


def test_a_record_of_plain_arrays_is_read_as_it_is():
    plain = ArrayRecord(torch_state_dict={"w": torch.ones(2, 2), "b": torch.zeros(2)})
    back = from_array_record(plain)
    assert list(back) == ["w", "b"] and torch.equal(back["w"], torch.ones(2, 2))


def test_malformed_packing_is_a_value_error_naming_it():
    record = to_array_record({"trunk.w": torch.randn(4, 4), "head.b": torch.randn(2)})
    short = ArrayRecord({**{k: record[k] for k in record}, "trunk": Array(torch.zeros(3, dtype=torch.uint8).numpy())})
    with pytest.raises(ValueError, match="too few for 'trunk.w'"):
        from_array_record(short)
    missing = ArrayRecord({k: record[k] for k in record if k != "head"})
    with pytest.raises(ValueError, match="malformed packed arrays"):
        from_array_record(missing)
    longer = ArrayRecord({**{k: record[k] for k in record}, "head": Array(torch.zeros(64, dtype=torch.uint8).numpy())})
    with pytest.raises(ValueError, match="left over"):
        from_array_record(longer)


def test_the_layout_name_is_reserved():
    with pytest.raises(ValueError, match="reserved"):
        to_array_record({LAYOUT: torch.zeros(1)})
