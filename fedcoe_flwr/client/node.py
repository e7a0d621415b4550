"""Who this node is, from its node config, and where its data comes from.

Who a node is comes from its node config (``--node-config``), in one of two modes:

* research mode (simulation, or a deployment over one shared data set):
  ``partition-id=3 num-partitions=5`` -- the node uses partition 3 of the configured data set;
* site mode (a real site with its own images): ``data-dir="/data/site-a" site-id=0``
  (+ ``cold-start=true`` for a site held out of training). Training sites are numbered
  0..num_clients-1 by ``site-id``, cold-start sites 0..num_coldstart_clients-1 by theirs;
  the server's client index is ``site-id`` resp. ``num_clients + site-id``. ``data-dir`` is
  an image folder or ``.tar.gz`` with ``train/<class>/*`` and ``test/<class>/*``, labelled
  with the run config's ``class_names``.

Optional in both modes: ``state-dir="/var/lib/fedcoe"`` keeps the private parts on disk
(written atomically after every training round, reloaded when a restarted SuperNode has
an empty ``context.state``), ``global-test-dir=...`` (the global test set on this node, for
methods without a single global model), ``cache-dir=...`` (decoded site images; default
``<state-dir>/cache``) and ``torch-threads=N``.
"""

from __future__ import annotations

import logging
import re
import sys
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from flwr.app import Context

from ..config import ExperimentConfig
from ..data import ClientData, load_client_data, load_site_data

log = logging.getLogger(__name__)


def safe_name(name: str) -> str:
    """A name usable as one path component."""
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name).strip(".") or "run"


def configure_threads(node_config: Mapping[str, Any] | None = None) -> None:
    """In a Ray actor, use as many torch threads as CPUs Ray gave it: several actors
    each using every core oversubscribe the machine (measured 5x slower steps). A
    deployed node may set ``torch-threads=N`` in its node config for the same reason."""
    global _THREADS_SET
    if _THREADS_SET:
        return
    _THREADS_SET = True
    threads = (node_config or {}).get("torch-threads")
    if threads is not None:
        torch.set_num_threads(max(1, int(threads)))
        return
    ray = sys.modules.get("ray")  # only a Ray worker has it; importing it costs every ClientApp start-up
    try:
        if ray is not None and ray.is_initialized():
            cpus = ray.get_runtime_context().get_assigned_resources().get("CPU")
            if cpus:
                torch.set_num_threads(max(1, int(cpus)))
    except Exception as err:  # not fatal: torch keeps its default
        log.debug("could not read Ray's CPU assignment: %s", err)


_THREADS_SET = False  # a per-process setting, not client state


# ------------------------------------------------------------------ who this node is
class NodeConfigError(ValueError):
    """The node config cannot identify this node; the message says what to pass."""


NODE_CONFIG_HELP = (
    "start the SuperNode with --node-config 'data-dir=\"/data/site-a\" site-id=0' (a site with its own "
    "images; add cold-start=true for a cold-start site), --node-config 'data-dir=\"/data/new-site\" cold-start=true' "
    "(a new site to onboard) or --node-config 'partition-id=0 num-partitions=N' (a partition of the configured "
    "data set)")


def _flag(value: Any) -> bool:
    if isinstance(value, bool):
        return value
    if isinstance(value, (int, float)):
        return bool(value)
    if isinstance(value, str) and value.strip().lower() in ("true", "1", "yes", "false", "0", "no", ""):
        return value.strip().lower() in ("true", "1", "yes")
    raise NodeConfigError(f"node config cold-start must be true or false, got {value!r}")


def _int(node_config: Mapping[str, Any], key: str) -> int:
    value = node_config[key]
    try:
        if isinstance(value, bool) or int(value) != float(value):
            raise ValueError
        return int(value)
    except (TypeError, ValueError):
        raise NodeConfigError(f"node config {key} must be an integer, got {value!r}") from None


@dataclass(frozen=True)
class NodeRole:
    """This node's identity from its node config."""

    mode: str  # "partition" (research mode) or "site"
    site_id: int  # partition-id, or site-id within its role
    coldstart: bool | None  # site mode: from cold-start=...; partition mode: None (decided by the config)
    num_partitions: int | None  # partition mode: num-partitions
    data_dir: str = ""
    state_dir: str = ""
    global_test_dir: str = ""
    cache_dir: str = ""
    site_name: str = ""  # optional site-name (a new site's name in file names and the registry)
    model_path: str = ""  # optional model-path: where an onboarded node saves its routed model

    @property
    def new_site(self) -> bool:
        """A site that was not part of the federation's plan (cold-start=true, no site-id): it is
        onboarded when it joins, never counted as one of the configured clients."""
        return self.mode == "site" and self.site_id < 0

    def index(self, cfg: ExperimentConfig | None) -> int:
        """The client index the server uses (its 'partition-id'; -1 for a new site)."""
        if self.mode == "partition":
            return self.site_id
        if self.new_site:
            return -1
        if cfg is None:
            raise NodeConfigError("the client index of a site needs the experiment config")
        limit = cfg.num_coldstart_clients if self.coldstart else cfg.num_clients
        if self.site_id >= limit:
            role = "cold-start" if self.coldstart else "training"
            key = "num_coldstart_clients" if self.coldstart else "num_clients"
            raise NodeConfigError(f"{role} site-id {self.site_id} is outside 0..{limit - 1} ({key}={limit} in "
                                  f"the run config); {role} sites are numbered from 0")
        return cfg.num_clients + self.site_id if self.coldstart else self.site_id

    @property
    def key(self) -> str:
        """Stable name of this site for node-local files (node ids change on restart)."""
        if self.site_name:
            return safe_name(self.site_name)
        if self.mode == "partition":
            return f"partition-{self.site_id}"
        if self.new_site:
            return "new-site"
        return f"coldstart-{self.site_id}" if self.coldstart else f"site-{self.site_id}"


def node_role(context: Context) -> NodeRole:
    nc = context.node_config
    common = {"state_dir": str(nc.get("state-dir", "") or ""), "global_test_dir": str(nc.get("global-test-dir", "") or ""),
              "cache_dir": str(nc.get("cache-dir", "") or ""), "site_name": str(nc.get("site-name", "") or ""),
              "model_path": str(nc.get("model-path", "") or "")}
    site_mode = "data-dir" in nc or "site-id" in nc
    partition_mode = "partition-id" in nc or "num-partitions" in nc
    if site_mode and partition_mode:
        raise NodeConfigError(f"node config {dict(nc)} mixes a site (data-dir/site-id) and a partition "
                              f"(partition-id/num-partitions); give one of them: {NODE_CONFIG_HELP}")
    if site_mode:
        if "site-id" not in nc and str(nc.get("data-dir", "")) and _flag(nc.get("cold-start", False)):
            # a new site joining a trained federation: onboarded, not one of the configured clients
            return NodeRole("site", -1, True, None, data_dir=str(nc["data-dir"]), **common)
        if "site-id" not in nc or not str(nc.get("data-dir", "")):
            raise NodeConfigError(f"a site needs both data-dir and site-id in its node config, got {dict(nc)}; "
                                  f"{NODE_CONFIG_HELP}")
        site_id = _int(nc, "site-id")
        if site_id < 0:
            raise NodeConfigError(f"node config site-id must be >= 0, got {site_id}")
        return NodeRole("site", site_id, _flag(nc.get("cold-start", False)), None,
                        data_dir=str(nc["data-dir"]), **common)
    if "partition-id" in nc and "num-partitions" in nc:
        return NodeRole("partition", _int(nc, "partition-id"), None, _int(nc, "num-partitions"), **common)
    raise NodeConfigError(f"this SuperNode's node config {dict(nc)} says neither which site nor which "
                          f"partition it is: {NODE_CONFIG_HELP}")


def data_mode(role: NodeRole) -> str:
    """Which remedies a data error names: a site's (deployment) or a partition's (simulation)."""
    return "deployment" if role.mode == "site" else "simulation"


def client_seed(cfg: ExperimentConfig, partition_id: int, server_round: int) -> int:
    return zlib.crc32(f"{cfg.seed}/{partition_id}/{server_round}".encode())


def client_data(cfg: ExperimentConfig, role: NodeRole, index: int) -> ClientData:
    """This node's local train/test split: its own images (site) or its partition."""
    if role.mode == "partition":
        return load_client_data(cfg, index)
    cache = role.cache_dir or (str(Path(role.state_dir) / "cache") if role.state_dir else None)
    return load_site_data(role.data_dir, cfg, need_train=not role.coldstart, cache_dir=cache)
