"""Run one experiment in Flower's Ray simulation from Python, without a SuperLink:

    python -m fedcoe_flwr.simulate --config configs/smoke.yaml --set algorithm=fedavg num_rounds=3

Same ServerApp logic (``run_server``) and the same ClientApp as ``flwr run .``; the
number of simulated SuperNodes is taken from the config. Where ``uses_cohorts`` (config
key ``simulation_training``), the simulation runs on the cohort backend (``fedcoe_flwr.cohort.backend``):
each round's training messages are trained in one vectorised cohort, in this process,
instead of one by one in Ray actors. The comparison runner
calls this once per (method, seed) in a fresh process."""

from __future__ import annotations

import argparse
import os
import sys
from typing import Any

import torch
import yaml
from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation

from client_app.app import app as client_app

from .cohort.backend import CohortBackend
from .compat import install_fast_dispatch, simulation_backend
from .config import ExperimentConfig
from .cli import user_errors
from .server.run import run_server, server_config


def parse_overrides(items: list[str]) -> dict[str, Any]:
    """key=value pairs; values parsed as YAML scalars (5 -> int, 0.1 -> float, true -> bool)."""
    out: dict[str, Any] = {}
    for item in items:
        if "=" not in item:
            raise SystemExit(f"--set expects key=value, got '{item}'")
        key, value = item.split("=", 1)
        out[key.strip()] = yaml.safe_load(value) if value != "" else ""
    return out


MAX_ACTORS_PER_GPU = 8  # small models: 8 actors keep one GPU busy without running out of CUDA contexts


def default_num_gpus(device: str, num_cpus_per_client: float, cores: int | None = None,
                     cuda_available: bool | None = None) -> float:
    """GPU share per client (actor) when none is given: 0 on a CPU machine (or device=cpu);
    with a GPU, one actor per ``num_cpus_per_client`` cores shares it, at most
    ``MAX_ACTORS_PER_GPU`` (e.g. 16 cores, 2 CPUs each -> 8 actors -> 0.125 GPU each)."""
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    if device == "cpu" or not cuda_available:
        return 0.0
    actors = max(1, min(MAX_ACTORS_PER_GPU, int((cores or os.cpu_count() or 1) // max(num_cpus_per_client, 1e-9))))
    return 1.0 / actors


def simulate(run_config: dict[str, Any], num_cpus_per_client: float = 1.0, num_gpus_per_client: float | None = None,
             num_cpus: int | None = None) -> dict[str, Any]:
    """Actors = cores / ``num_cpus_per_client`` (each ClientApp actor sets torch to that
    many threads, so actors never oversubscribe the cores); ``num_gpus_per_client`` None
    = ``default_num_gpus``; ``num_cpus``: the cores Ray may use (None: all of them)."""
    cfg = server_config(run_config, "simulation")  # validated and the data checked before Ray starts
    result: dict[str, Any] = {}
    server = ServerApp()

    @server.main()
    def main(grid, context):  # noqa: ANN001
        result.update(run_server(grid, run_config))

    if num_gpus_per_client is None:
        num_gpus_per_client = default_num_gpus(cfg.device, num_cpus_per_client)
    backend: dict[str, Any] = {
        "client_resources": {"num_cpus": num_cpus_per_client, "num_gpus": num_gpus_per_client},
        "cohort": {"cohort_size": max(cohort_size(cfg), 1), "chunk_size": cfg.cohort_chunk_size}}
    if num_cpus is not None:
        backend["init_args"] = {"num_cpus": num_cpus}
    install_fast_dispatch()
    with simulation_backend(CohortBackend if uses_cohorts(cfg) else None):
        run_simulation(server, client_app, num_supernodes=cfg.num_partitions, backend_config=backend)
    return result


def uses_cohorts(cfg: ExperimentConfig, cuda_available: bool | None = None) -> bool:
    """Train each round's clients as vectorised cohorts (docs/COHORT.md)? With
    ``simulation_training: auto`` only where it is faster, on a GPU; on CPU the per-client
    loop measured faster (benchmarks/README.md)."""
    if cfg.simulation_training != "auto":
        return cfg.simulation_training == "cohort"
    if cuda_available is None:
        cuda_available = torch.cuda.is_available()
    return cuda_available and cfg.device != "cpu"


def cohort_size(cfg: ExperimentConfig) -> int:
    """Training messages the cohort backend collects at most: a round's sampled clients."""
    return int(round(cfg.fraction_train * cfg.num_clients)) + cfg.num_coldstart_clients


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True, help="YAML in configs/")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="config overrides")
    parser.add_argument("--num-cpus-per-client", type=float, default=1.0)
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="cores Ray may use in all (default: every core); on a shared machine, e.g. 1")
    parser.add_argument("--num-gpus-per-client", type=float, default=None,
                        help="GPU share per actor (default: 0 without a GPU, else 1/min(8, cores/cpus-per-client))")
    args = parser.parse_args(argv)
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    run_config = {"config": args.config, **parse_overrides(args.set)}
    with user_errors():
        result = simulate(run_config, args.num_cpus_per_client, args.num_gpus_per_client, args.num_cpus)
    return 0 if result else 1


if __name__ == "__main__":
    sys.exit(main())
