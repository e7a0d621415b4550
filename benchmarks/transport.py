"""Flower objects per message and their conversion time: the model sent as one Flower Array
per tensor (``ArrayRecord(torch_state_dict=...)``) against ``records.to_array_record`` (one
byte buffer per key group), side by side in one process.

    python benchmarks/transport.py                                   # deploy-sized and CIFAR-10 FedCoE models
    python benchmarks/transport.py --config configs/compare_cifar10_dir0.1.yaml --repeat 20

Every object of a message is one RPC per hop (ServerApp -> SuperLink -> SuperNode and back)
and one write to the SuperLink's database, which is what a deployed round waits on with a
small model; the bytes are the same either way. For each config the script builds FedCoE's
initial server state (gate + K experts + trunk), puts it in a message content as the server
does, and measures: the number of Flower objects (``get_all_nested_objects``), their total
bytes, and the time to deflate every object and inflate the message back to tensors (median
of ``--repeat``, one thread). The tensors read back are checked equal to those sent."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from typing import Any, Callable

from _common import ROOT, load_average  # noqa: F401 (sys.path)

DEFAULT_CONFIGS = ("configs/deploy.yaml", "configs/compare_cifar10_dir0.1.yaml")


def _layouts() -> dict[str, tuple[Callable[[dict], Any], Callable[[Any], dict]]]:
    from flwr.app import ArrayRecord

    from fedcoe_flwr.records import from_array_record, to_array_record

    def per_tensor(arrays: dict) -> Any:
        return ArrayRecord(torch_state_dict={k: v.detach().cpu() for k, v in arrays.items()})

    return {"one Array per tensor": (per_tensor, lambda record: dict(record.to_torch_state_dict())),
            "packed (to_array_record)": (to_array_record, from_array_record)}


def measure(arrays: dict, pack: Callable[[dict], Any], unpack: Callable[[Any], dict], repeat: int) -> dict[str, float]:
    import torch
    from flwr.app import Message, RecordDict
    from flwr.supercore.inflatable.inflatable_object import get_all_nested_objects
    from flwr.supercore.inflatable.inflatable_utils import inflate_object_from_contents
    from flwr.supercore.task_identity import TaskIdentity

    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1  # what a ServerApp process has set

    seconds: list[float] = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        msg = Message(content=RecordDict({"arrays": pack(arrays)}), dst_node_id=1, message_type="train")
        objects = get_all_nested_objects(msg)
        contents = {object_id: obj.deflate() for object_id, obj in objects.items()}
        count, size = len(contents), sum(len(c) for c in contents.values())
        back = inflate_object_from_contents(msg.object_id, contents)
        got = unpack(back.content.array_records["arrays"])
        seconds.append(time.perf_counter() - t0)
    assert list(got) == list(arrays) and all(torch.equal(got[k], arrays[k]) for k in arrays), "round trip changed tensors"
    return {"objects": count, "bytes": size, "seconds": statistics.median(seconds)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", nargs="+", default=list(DEFAULT_CONFIGS), help="experiment YAMLs (FedCoE's model of each)")
    parser.add_argument("--repeat", type=int, default=10, help="conversions per layout (median)")
    args = parser.parse_args(argv)
    if args.repeat < 1:
        raise SystemExit(f"--repeat must be >= 1, got {args.repeat}")
    import torch

    from fedcoe_flwr.algorithms import get_algorithm
    from fedcoe_flwr.config import load_config

    torch.set_num_threads(1)
    print(f"[transport] load {load_average():.2f}; median of {args.repeat}, one thread", flush=True)
    for path in args.config:
        cfg = load_config(ROOT / path, {"algorithm": "fedcoe"})
        arrays = get_algorithm("fedcoe").init_state(cfg, 10).arrays
        results = {name: measure(arrays, pack, unpack, args.repeat) for name, (pack, unpack) in _layouts().items()}
        (plain, plain_r), (packed, packed_r) = results.items()
        print(f"{path}: {len(arrays)} tensors, model={cfg.model} experts={cfg.num_experts}", flush=True)
        for name, r in results.items():
            print(f"    {name:26s} {r['objects']:5d} objects {r['bytes'] / 1e6:9.3f} MB {r['seconds'] * 1e3:9.1f} ms")
        print(f"    ratio per tensor / packed: objects {plain_r['objects'] / packed_r['objects']:.1f}x, "
              f"bytes {plain_r['bytes'] / packed_r['bytes']:.4f}x, time {plain_r['seconds'] / packed_r['seconds']:.2f}x",
              flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
