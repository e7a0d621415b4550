"""Bytes per client per round: FedCoE with m of K experts against dense FedAvg of the
same K-expert model (the gate and all K experts down and up every round).

    python benchmarks/comm.py                       # K=4 m=2 and a small (K, m) sweep
    python benchmarks/comm.py --experts 8 --top-m 2 --sweep ""

Measured, not computed from a formula: the script runs two real FedCoE rounds through
the method's own functions (``init_state``, ``train_payload``, ``client_train``,
``aggregate``) on ``--clients`` clients, so that every client's correlation row is
known in round 2 and it receives only its top-m experts. For every client and round it
counts

* tensor bytes: the arrays of the download (``train_payload``) and of the upload
  (``client_train``), i.e. what ``MoEStrategy`` adds to ``bytes_down``/``bytes_up``;
* wire bytes: the size of the Flower message content as protobuf (``RecordDict`` with
  the arrays, the per-client config and the experiment config, serialised by
  ``flwr.common.serde`` as the SuperLink would send it).

Dense FedAvg of the same model = the whole server state (gate + K experts) each way,
measured the same way. The expected FedCoE download is (gate + m experts) / (gate + K
experts) ~ m/K plus the gate; the script prints both so the claim can be checked."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from _common import ROOT, add_workload_args, load_average, workload_run_config  # noqa: F401 (sys.path)


def _wire_bytes(arrays: dict[str, Any], config: dict[str, Any], cfg: Any) -> int:
    from flwr.app import RecordDict
    from flwr.common.serde import recorddict_to_proto

    from fedcoe_flwr.records import (ARRAYS, CONFIG, EXPERIMENT, config_record, experiment_record,
                                     to_array_record)

    content = RecordDict({ARRAYS: to_array_record(arrays), CONFIG: config_record(config),
                          EXPERIMENT: experiment_record(cfg)})
    return int(recorddict_to_proto(content).ByteSize())


def _reply_wire_bytes(arrays: dict[str, Any], metrics: dict[str, Any]) -> int:
    """A training reply as the ClientApp packs it (``client._reply``): arrays + metrics."""
    from flwr.app import RecordDict
    from flwr.common.serde import recorddict_to_proto

    from fedcoe_flwr.records import ARRAYS, METRICS, metric_record, to_array_record

    content = RecordDict({METRICS: metric_record(metrics), ARRAYS: to_array_record(arrays)})
    return int(recorddict_to_proto(content).ByteSize())


def measure(experts: int, top_m: int, clients: int, args: argparse.Namespace) -> dict[str, Any]:
    import numpy as np
    import torch

    from fedcoe_flwr.algorithms import get_algorithm
    from fedcoe_flwr.algorithms.base import ClientStep, Reply
    from fedcoe_flwr.client.node import client_seed
    from fedcoe_flwr.config import config_from_run_config
    from fedcoe_flwr.data import federation_classes, load_client_data
    from fedcoe_flwr.records import array_bytes
    from fedcoe_flwr.server.run import absolute_paths

    torch.set_num_threads(1)
    extra = {"width_multiplier": args.width}
    run_config = workload_run_config(args.workload, clients, "fedcoe", 2, data_root=args.data_root,
                                     num_clients=clients, experts=experts, top_m=top_m, seed=args.seed, extra=extra)
    cfg = absolute_paths(config_from_run_config(run_config, str(ROOT)), ROOT)
    cfg = cfg.replace(local_epochs=1)
    num_classes = len(federation_classes(cfg))
    algo = get_algorithm("fedcoe")
    state = algo.init_state(cfg, num_classes)
    dense = array_bytes(state.arrays)  # gate + all K experts: dense FedAvg of this model, each way
    dense_wire = _wire_bytes(state.arrays, {"server_round": 1}, cfg)
    gate = array_bytes({k: v for k, v in state.arrays.items() if k.startswith("gate.")})
    per_round: list[dict[str, float]] = []
    privates: dict[int, Any] = {}
    for server_round in (1, 2):
        down, up, wire_down, wire_up, sets = [], [], [], [], []
        replies = []
        for client in range(clients):
            payload, pconfig = algo.train_payload(state, cfg, client, server_round)
            pconfig = {**pconfig, "server_round": server_round}
            upload, private, metrics = algo.client_train(ClientStep(arrays=payload, config=pconfig, private=privates.get(client), data=load_client_data(cfg, client), cfg=cfg, num_classes=num_classes, device=torch.device("cpu"), seed=client_seed(cfg, client, server_round)))
            if private:
                privates[client] = private
            down.append(array_bytes(payload))
            up.append(array_bytes(upload))
            wire_down.append(_wire_bytes(payload, pconfig, cfg))
            wire_up.append(_reply_wire_bytes(upload, metrics))
            sets.append(len(pconfig["expert_ids"]))
            replies.append(Reply(client, int(metrics["num_samples"]), upload, metrics))
        state, _ = algo.aggregate(state, replies, cfg, server_round)
        per_round.append({"round": server_round, "down": float(np.mean(down)), "up": float(np.mean(up)),
                          "wire_down": float(np.mean(wire_down)), "wire_up": float(np.mean(wire_up)),
                          "experts_sent": float(np.mean(sets))})
    private_bytes = float(np.mean([array_bytes(p) for p in privates.values()])) if privates else 0.0
    return {"K": experts, "m": top_m, "dense": dense, "dense_wire": dense_wire, "gate": gate,
            "expert": (dense - gate) / experts, "rounds": per_round, "private": private_bytes}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=4, help="clients trained per (K, m) setting")
    parser.add_argument("--width", type=float, default=1.0, help="width multiplier of the small CNN experts")
    parser.add_argument("--sweep", default="4:1,8:2,8:4",
                        help="extra K:m pairs, comma-separated ('' = only --experts/--top-m)")
    add_workload_args(parser)
    args = parser.parse_args(argv)
    pairs = [(args.experts, args.top_m)]
    for item in filter(None, (s.strip() for s in args.sweep.split(","))):
        k, m = (int(v) for v in item.split(":"))
        if (k, m) not in pairs:
            pairs.append((k, m))
    print(f"[comm] FedCoE vs dense FedAvg of the same K-expert model (gate + K small-CNN experts, width "
          f"{args.width:g}); {args.clients} clients trained 2 rounds per setting on workload {args.workload} "
          f"({args.data_root or 'CIFAR-10'}); load {load_average():.2f}", flush=True)
    print(f"{'K':>3} {'m':>3} | {'dense MB each way':>17} | {'FedCoE round 1 down/up MB':>25} | "
          f"{'FedCoE round 2 down/up MB':>25} | {'down ratio':>10} {'m/K + gate':>10} | {'wire down ratio':>15}")
    for k, m in pairs:
        r = measure(k, m, args.clients, args)
        r1, r2 = r["rounds"]
        expected = (r["gate"] + m * r["expert"]) / r["dense"]
        print(f"{k:3d} {m:3d} | {r['dense'] / 1e6:17.3f} | {r1['down'] / 1e6:12.3f} / {r1['up'] / 1e6:10.3f} | "
              f"{r2['down'] / 1e6:12.3f} / {r2['up'] / 1e6:10.3f} | {r2['down'] / r['dense']:10.3f} "
              f"{expected:10.3f} | {r2['wire_down'] / r['dense_wire']:15.3f}", flush=True)
        print(f"    per client per round, round 2 (correlation known): download {r2['down']:.0f} B = "
              f"ratio {r2['down'] / r['dense']:.3f} of dense ({m}/{k} = {m / k:.3f}; gate {r['gate']} B = "
              f"{r['gate'] / r['dense']:.4f} of dense); upload {r2['up']:.0f} B = {r2['up'] / r['dense']:.3f} of dense "
              f"(+ the K-float correlation row); wire down {r2['wire_down']:.0f} B vs dense {r['dense_wire']} B; "
              f"experts sent {r1['experts_sent']:.0f} in round 1 (rows unknown), {r2['experts_sent']:.0f} in round 2; "
              f"private state kept on the client {r['private']:.0f} B")
    return 0


if __name__ == "__main__":
    sys.exit(main())
