"""What the ServerApp does: validate the config once, then run the Strategy."""

from __future__ import annotations

import os
from logging import INFO
from pathlib import Path
from typing import Any, Mapping

from flwr.common.logger import log
from flwr.serverapp import Grid

from .config import ExperimentConfig, config_from_run_config
from .results import ResultsWriter
from .strategy import MoEStrategy

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
                       serve_from=resolve(cfg.serve_from) if cfg.serve_from else "")


def check_global_test(cfg: ExperimentConfig) -> None:
    """A server that evaluates the global model must be able to load the global test set:
    find out now, not after the first round (a deployed server may not hold the data set)."""
    from .algorithms import get_algorithm
    from .data import DataError, load_global_test

    if not get_algorithm(cfg.algorithm).has_global_model:
        return  # the clients evaluate their own models on it (node config global-test-dir)
    try:
        load_global_test(cfg)
    except DataError as err:
        raise DataError(f"the server computes global accuracy on the global test set but cannot load it: {err}. "
                        "A server that does not hold the data set needs global_test_dir: an image folder or "
                        ".tar.gz with test/<class>/* on the SuperLink host (see docs/DEPLOYMENT.md).") from err


def check_partitions(cfg: ExperimentConfig) -> None:
    """Where the server holds the data set (simulation, research-mode deployment), draw the
    partitions now: an impossible one (e.g. min_partition_size at a small alpha) stops the
    run before round 1 with the keys to change, not as a failure in every client."""
    from .data import DataError, client_splits, load_dataset

    try:
        load_dataset(cfg)
    except DataError:
        return  # a deployment whose sites hold their own data: nothing to partition here
    client_splits(cfg)


def serve(grid: Grid, serving: ExperimentConfig) -> list[dict[str, Any]]:
    """Serving mode: no training. Load a finished run's checkpoint and onboard every SuperNode
    that connects (the cold-start package, its routing row and metrics back, one line per node
    in ``<run>/onboarding.jsonl``) until ``serve_max_nodes`` nodes are onboarded or
    ``serve_timeout`` seconds have passed."""
    import time

    from .algorithms.common import ServerState
    from .onboard import load_checkpoint, serving_config
    from .strategy import Onboarder

    payload, path, run_dir = load_checkpoint(serving.serve_from)
    cfg = serving_config(payload["config"], serving)
    state = ServerState(dict(payload["arrays"]), dict(payload.get("extra", {})))
    package_round = int(payload.get("round", 0))
    onboarder = Onboarder(cfg, run_dir, "serve")
    log(INFO, "[serve] onboarding new sites from %s (run %s, %s, round %d); registry %s; up to %s node(s), "
        "%.0fs", path, cfg.resolved_run_name, cfg.algorithm, package_round, run_dir / "onboarding.jsonl",
        serving.serve_max_nodes or "any number of", serving.serve_timeout)
    deadline = time.time() + serving.serve_timeout
    known: set[int] = set()
    done: list[dict[str, Any]] = []
    while time.time() < deadline:
        new = sorted(int(n) for n in grid.get_node_ids() if int(n) not in known)
        if serving.serve_max_nodes:
            new = new[: serving.serve_max_nodes - len(done)]
        if new:
            known.update(new)
            entries = onboarder.onboard(grid, {n: {} for n in new}, state, package_round, "serve")
            done += [e for e in entries if e["status"] == "onboarded"]
        if serving.serve_max_nodes and len(done) >= serving.serve_max_nodes:
            break
        time.sleep(1.0)
    log(INFO, "[serve] stopped: %d node(s) onboarded; registry %s", len(done), run_dir / "onboarding.jsonl")
    return done


def run_server(grid: Grid, run_config: Mapping[str, Any]) -> dict[str, Any]:
    base = project_dir()
    cfg = absolute_paths(config_from_run_config(run_config, str(base)), base)
    if cfg.serve_from:
        return {"onboarded": serve(grid, cfg)}
    check_global_test(cfg)
    check_partitions(cfg)
    results = ResultsWriter(cfg)
    log(INFO, "[fedcoe] config %s validated; results go to %s", cfg.config_path or "(defaults)", results.dir)
    if results.previous_run:
        log(INFO, "[fedcoe] an earlier run with this name was moved to %s", results.previous_run)
    return MoEStrategy(cfg, results).start(grid)
