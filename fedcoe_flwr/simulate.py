"""Run one experiment in Flower's Ray simulation from Python, without a SuperLink:

    python -m fedcoe_flwr.simulate --config configs/smoke.yaml --set algorithm=fedavg num_rounds=3

Same ServerApp logic (``run_server``) and the same ClientApp as ``flwr run .``; the
number of simulated SuperNodes is taken from the config. The comparison runner
calls this once per (method, seed) in a fresh process."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import yaml


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """key=value pairs; values parsed as YAML scalars (5 -> int, 0.1 -> float, true -> bool)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set expects key=value, got '{item}'")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value) if value != "" else ""
    return out


PATCH_ENV = "FEDCOE_FAST_VCE"  # "0" runs Flower's own message dispatcher (for comparison)


def _fast_add_messages_to_queue(state, queue, nodes_mapping, f_stop) -> None:  # noqa: ANN001
    """Flower 1.39's simulation dispatcher (``vce_api.add_messages_to_queue``) asks the
    LinkState, every 0.1 s, for one message per node: ``get_message_ins(node)`` scans
    every stored message and re-validates each one (TTL, federation membership), so one
    sweep costs nodes x messages checks -- 50,000 for 1000 nodes and 50 messages in
    flight, in the process that also runs the server, holding the GIL while the clients
    train. This does the same in one pass over the stored messages: each undelivered
    message validated once, at most one message per node per sweep (as before), marked
    delivered and queued in the order the server sent them."""
    from flwr.supercore.date import now

    store = getattr(state, "message_ins_store", None)
    lock = getattr(state, "lock", None)
    check = getattr(state, "_check_stored_messages", None)
    if store is None or lock is None or check is None:  # another LinkState: Flower's own loop
        return _ORIGINAL_DISPATCH(state, queue, nodes_mapping, f_stop)
    while not f_stop.is_set():
        batch = []
        with lock:
            pending = [mid for mid, msg in store.items() if msg.metadata.delivered_at == ""]
            if pending:
                check(set(pending))  # drops expired / out-of-federation messages, as get_message_ins does
                taken: set[int] = set()
                for mid in pending:
                    msg = store.get(mid)
                    if msg is None or msg.metadata.delivered_at != "":
                        continue
                    node = msg.metadata.dst_node_id
                    if node in taken or node not in nodes_mapping:
                        continue
                    taken.add(node)
                    batch.append(msg)
                stamp = now().isoformat()
                for msg in batch:
                    msg.metadata.delivered_at = stamp
        for msg in batch:
            queue.put(msg)
        f_stop.wait(0.1)


_ORIGINAL_DISPATCH = None


def install_fast_dispatch() -> bool:
    """Replace Flower's simulation dispatcher by ``_fast_add_messages_to_queue`` in this
    process (Flower 1.39.x only; ``FEDCOE_FAST_VCE=0`` keeps Flower's)."""
    global _ORIGINAL_DISPATCH
    if os.environ.get(PATCH_ENV, "1") == "0":
        return False
    try:
        import flwr
        from flwr.server.superlink.fleet.vce import vce_api
    except ImportError:
        return False
    if not flwr.__version__.startswith("1.39.") or not hasattr(vce_api, "add_messages_to_queue"):
        return False
    if vce_api.add_messages_to_queue is not _fast_add_messages_to_queue:
        _ORIGINAL_DISPATCH = vce_api.add_messages_to_queue
        vce_api.add_messages_to_queue = _fast_add_messages_to_queue
    return True


MAX_ACTORS_PER_GPU = 8  # small models: 8 actors keep one GPU busy without running out of CUDA contexts


def default_num_gpus(device: str, num_cpus_per_client: float, cores: int | None = None,
                     cuda_available: bool | None = None) -> float:
    """GPU share per client (actor) when none is given: 0 on a CPU machine (or device=cpu);
    with a GPU, one actor per ``num_cpus_per_client`` cores shares it, at most
    ``MAX_ACTORS_PER_GPU`` (e.g. 16 cores, 2 CPUs each -> 8 actors -> 0.125 GPU each)."""
    if cuda_available is None:
        import torch

        cuda_available = torch.cuda.is_available()
    if device == "cpu" or not cuda_available:
        return 0.0
    actors = max(1, min(MAX_ACTORS_PER_GPU, int((cores or os.cpu_count() or 1) // max(num_cpus_per_client, 1e-9))))
    return 1.0 / actors


def simulate(run_config: dict[str, Any], num_cpus_per_client: float = 1.0, num_gpus_per_client: float | None = None
             ) -> dict[str, Any]:
    """Actors = cores / ``num_cpus_per_client`` (each ClientApp actor sets torch to that
    many threads, so actors never oversubscribe the cores); ``num_gpus_per_client`` None
    = ``default_num_gpus``."""
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from client_app.app import app as client_app

    from .config import config_from_run_config
    from .server import project_dir, run_server

    cfg = config_from_run_config(run_config, str(project_dir()))  # validated before Ray starts
    result: dict[str, Any] = {}
    server = ServerApp()

    @server.main()
    def main(grid, context):  # noqa: ANN001
        result.update(run_server(grid, run_config))

    if num_gpus_per_client is None:
        num_gpus_per_client = default_num_gpus(cfg.device, num_cpus_per_client)
    backend = {"client_resources": {"num_cpus": num_cpus_per_client, "num_gpus": num_gpus_per_client}}
    install_fast_dispatch()
    run_simulation(server, client_app, num_supernodes=cfg.num_partitions, backend_config=backend)
    return result


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML in configs/")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--num-cpus-per-client", type=float, default=1.0)
    parser.add_argument("--num-gpus-per-client", type=float, default=None,
                        help="GPU share per actor (default: 0 without a GPU, else 1/min(8, cores/cpus-per-client))")
    args = parser.parse_args(argv)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    run_config = {"config": args.config, **parse_overrides(args.set)}
    result = simulate(run_config, args.num_cpus_per_client, args.num_gpus_per_client)
    return 0 if result else 1


if __name__ == "__main__":
    sys.exit(main())
