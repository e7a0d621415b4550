"""What the ServerApp does: validate the config and check the data once, then run the
round loop (or serving mode, which only onboards new sites)."""

from __future__ import annotations

import os
from logging import INFO
from pathlib import Path
from typing import Any, Mapping

import torch
from flwr.common.logger import log
from flwr.serverapp import Grid
from flwr.superlink.grid.inmemory_grid import InMemoryGrid

from ..algorithms import get_algorithm
from ..config import ConfigError, ExperimentConfig, config_from_run_config
from ..data import DataError, MissingDataError, Mode, client_splits, load_dataset, load_global_test
from .loop import RoundLoop
from .onboarding import serve
from .run_dir import RunDirectory

PROJECT_DIR_ENV = "FEDCOE_PROJECT_DIR"


def project_dir() -> Path:
    """Where relative paths (config, data_root, cache_dir, results_dir) resolve:
    $FEDCOE_PROJECT_DIR if set, else the working directory of the process."""
    return Path(os.environ.get(PROJECT_DIR_ENV) or os.getcwd()).resolve()


def absolute_paths(cfg: ExperimentConfig, base: Path) -> ExperimentConfig:
    """Clients run in other processes (Ray workers, SuperNodes) with other working
    directories: send them absolute paths."""
    def resolve(value: str) -> str:
        return str(base / os.path.expanduser(value)) if value and not os.path.isabs(os.path.expanduser(value)) \
            else os.path.expanduser(value)

    return cfg.replace(data_root=resolve(cfg.data_root) if cfg.data_root else "",
                       global_test_dir=resolve(cfg.global_test_dir) if cfg.global_test_dir else "",
                       cache_dir=resolve(cfg.cache_dir), results_dir=resolve(cfg.results_dir),
                       state_dir=resolve(cfg.state_dir) if cfg.state_dir else "",
                       serve_from=resolve(cfg.serve_from) if cfg.serve_from else "")


def check_global_test(cfg: ExperimentConfig, mode: Mode) -> None:
    """A server that evaluates the global model must be able to load the global test set:
    find out now, not after the first round (a deployed server may not hold the data set)."""
    if not get_algorithm(cfg.algorithm).has_global_model and mode == "deployment":
        return  # each site evaluates its own model on it (node config global-test-dir)
    try:
        load_global_test(cfg, mode=mode)
    except DataError as err:
        raise DataError(f"global accuracy is computed on the global test set, which cannot be loaded: {err}") from err


def check_device(cfg: ExperimentConfig) -> None:
    """device=cuda on a host without CUDA fails here, not in every client after round 1."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config key 'device' = 'cuda' is not allowed: this host has no CUDA device "
                          "(use 'auto' or 'cpu')")


def check_partitions(cfg: ExperimentConfig) -> None:
    """Where the server holds the data set (simulation, research-mode deployment), draw the
    partitions now: an impossible one (e.g. min_partition_size at a small alpha) stops the
    run before round 1 with the keys to change, not as a failure in every client."""
    try:
        load_dataset(cfg)
    except MissingDataError:
        return  # a deployment whose sites hold their own data: nothing to partition here
    client_splits(cfg)


def server_config(run_config: Mapping[str, Any], mode: Mode) -> ExperimentConfig:
    """The validated config with absolute paths, and every check that can run before round 1
    (``mode``: simulation or deployment, for the remedies an error names)."""
    base = project_dir()
    cfg = absolute_paths(config_from_run_config(run_config, str(base)), base)
    if not cfg.serve_from:
        check_device(cfg)
        check_global_test(cfg, mode)
        check_partitions(cfg)
    return cfg


def run_server(grid: Grid, run_config: Mapping[str, Any]) -> dict[str, Any]:
    cfg = server_config(run_config, "simulation" if isinstance(grid, InMemoryGrid) else "deployment")
    if cfg.serve_from:
        return {"onboarded": serve(grid, cfg)}
    run_dir = RunDirectory(cfg)
    log(INFO, "[fedcoe] config %s validated; results go to %s", cfg.config_path or "(defaults)", run_dir.path)
    if run_dir.previous_run:
        log(INFO, "[fedcoe] an earlier run with this name was moved to %s", run_dir.previous_run)
    return RoundLoop(cfg, run_dir).start(grid)
