"""ClientApp handlers: unpack records, call the method's pure client functions, pack
the reply. Private parts live in ``context.state`` (they never leave the client).

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

import json
import logging
import os
import re
import time
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import torch
from flwr.app import Context, Message, RecordDict

from .algorithms import get_algorithm
from .algorithms.common import accuracy
from .config import ExperimentConfig
from .data import (ClientData, DataError, federation_classes, is_coldstart, load_client_data,
                   load_global_test, load_site_data)
from .models import pick_device
from .records import (ARRAYS, CONFIG, EXPERIMENT, METRICS, config_record, experiment_from_record, tensors_crc,
                      from_array_record, metric_record, to_array_record)

log = logging.getLogger(__name__)
PRIVATE = "private"
STATE_FORMAT = 1


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
    try:
        import ray

        if ray.is_initialized():
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
            return _safe(self.site_name)
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


def partition_of(context: Context, cfg: ExperimentConfig | None = None) -> tuple[int, int]:
    """(client index, number of clients) as the server numbers them."""
    role = node_role(context)
    if role.mode == "partition":
        return role.site_id, int(role.num_partitions)  # type: ignore[arg-type]
    if cfg is None:
        raise NodeConfigError("a site's client index needs the experiment config")
    return role.index(cfg), cfg.num_partitions


def client_seed(cfg: ExperimentConfig, partition_id: int, server_round: int) -> int:
    return zlib.crc32(f"{cfg.seed}/{partition_id}/{server_round}".encode())


def client_data(cfg: ExperimentConfig, role: NodeRole, index: int) -> ClientData:
    """This node's local train/test split: its own images (site) or its partition."""
    if role.mode == "partition":
        return load_client_data(cfg, index)
    cache = role.cache_dir or (str(Path(role.state_dir) / "cache") if role.state_dir else None)
    return load_site_data(role.data_dir, cfg, need_train=not role.coldstart, cache_dir=cache)


# ------------------------------------------------------------------ node-local private state
def state_checksum(arrays: Mapping[str, torch.Tensor] | None) -> int | None:
    """CRC-32 over the keys, dtypes, shapes and bytes of a state dict (None for no state)."""
    return None if arrays is None else tensors_crc(arrays)


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name) or "run"


def state_paths(state_dir: str | os.PathLike, run_name: str, site_key: str) -> tuple[Path, Path]:
    """(private-state file, journal) of one site in one run under a node's state-dir."""
    folder = Path(os.path.expanduser(str(state_dir))) / _safe(run_name)
    return folder / f"{site_key}.pt", folder / f"{site_key}.journal.json"


def _atomic_write(path: Path, write) -> None:  # noqa: ANN001
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        write(fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _journal(role: NodeRole, cfg: ExperimentConfig, event: dict[str, Any]) -> None:
    """Append one event (round, phase, where the private state came from, checksums) to
    the site's journal: what a restart test or an operator checks."""
    _, path = state_paths(role.state_dir, cfg.resolved_run_name, role.key)
    try:
        events = json.loads(path.read_text()) if path.is_file() else []
    except (OSError, ValueError):
        events = []
    events.append({**event, "pid": os.getpid(), "time": round(time.time(), 3)})
    _atomic_write(path, lambda fh: fh.write(json.dumps(events, indent=1).encode()))


def save_private_state(role: NodeRole, cfg: ExperimentConfig, context: Context, private: Mapping[str, torch.Tensor],
                       server_round: int) -> int:
    """Write the private parts to <state-dir>/<run>/<site>.pt (tmp file + rename)."""
    path, _ = state_paths(role.state_dir, cfg.resolved_run_name, role.key)
    tensors = {k: v.detach().cpu().contiguous() for k, v in private.items()}
    crc = state_checksum(tensors)
    payload = {"format": STATE_FORMAT, "site": role.key, "run_id": int(context.run_id),
               "run_name": cfg.resolved_run_name, "round": int(server_round), "crc": crc, "private": tensors}
    _atomic_write(path, lambda fh: torch.save(payload, fh))
    return crc  # type: ignore[return-value]


def load_private_state(role: NodeRole, cfg: ExperimentConfig, context: Context
                       ) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The private parts saved by this site in this run (or in the run being resumed)."""
    path, _ = state_paths(role.state_dir, cfg.resolved_run_name, role.key)
    if not path.is_file():
        return None
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
        private = dict(payload["private"])
    except Exception as err:  # unreadable: start this site's private parts afresh, loudly
        log.warning("private state file '%s' is unreadable (%s); starting without it", path, err)
        return None
    same_run = int(payload.get("run_id", -1)) == int(context.run_id)
    if not same_run and not (cfg.resume or cfg.resume_from):
        log.warning("private state '%s' belongs to run %s, not this run %s; ignored (set resume to continue "
                    "an earlier run)", path, payload.get("run_id"), context.run_id)
        return None
    if state_checksum(private) != payload.get("crc"):
        log.warning("private state '%s' fails its checksum; ignored", path)
        return None
    return private, payload


def _private(context: Context, role: NodeRole | None = None, cfg: ExperimentConfig | None = None
             ) -> tuple[dict[str, torch.Tensor] | None, str]:
    """(private parts, where they came from: 'context' | 'state-dir' | 'none')."""
    record = context.state.array_records.get(PRIVATE)
    if record is not None:
        return from_array_record(record), "context"
    if role is not None and cfg is not None and role.state_dir:
        loaded = load_private_state(role, cfg, context)
        if loaded is not None:
            private, payload = loaded
            context.state[PRIVATE] = to_array_record(private)  # the SuperNode keeps it from now on
            log.info("site %s: private state of round %s reloaded from %s", role.key, payload.get("round"),
                     role.state_dir)
            return private, "state-dir"
    return None, "none"


# ------------------------------------------------------------------ handlers
def _unpack(msg: Message, context: Context | None = None
            ) -> tuple[ExperimentConfig, dict[str, torch.Tensor], dict[str, Any]]:
    configure_threads(context.node_config if context is not None else None)
    cfg = experiment_from_record(msg.content.config_records[EXPERIMENT])
    arrays = from_array_record(msg.content.array_records[ARRAYS])
    config = dict(msg.content.config_records[CONFIG])
    return cfg, arrays, config


def _reply(msg: Message, arrays: dict[str, torch.Tensor] | None, metrics: dict[str, Any]) -> Message:
    content = RecordDict({METRICS: metric_record(metrics)})
    if arrays is not None:
        content[ARRAYS] = to_array_record(arrays)
    return Message(content=content, reply_to=msg)


def handle_profile(msg: Message, context: Context) -> Message:
    """Tell the server this node's client index ('partition-id') and the federation size
    it expects ('num-partitions'). A site checks its role and its data here, so a wrong
    node config or an unknown class folder stops the run before training."""
    role = node_role(context)
    records = msg.content.config_records
    cfg = experiment_from_record(records[EXPERIMENT]) if EXPERIMENT in records else None
    if role.mode == "partition":
        pid, num = role.site_id, int(role.num_partitions)  # type: ignore[arg-type]
    else:
        if cfg is None:
            raise NodeConfigError("this server sent no experiment config with its profile query, which a site "
                                  "needs to find its client index")
        pid, num = role.index(cfg), cfg.num_partitions
        if not role.new_site:  # a new site's data is checked when it is onboarded
            load_site_data_checked(role, cfg)
    coldstart = bool(role.coldstart) if role.coldstart is not None else (cfg is not None and is_coldstart(cfg, pid))
    info: dict[str, Any] = {"partition-id": pid, "num-partitions": num, "site": role.key,
                            "state-dir": bool(role.state_dir), "cold-start": coldstart}
    return Message(content=RecordDict({CONFIG: config_record(info)}), reply_to=msg)


def load_site_data_checked(role: NodeRole, cfg: ExperimentConfig) -> ClientData:
    data = client_data(cfg, role, role.index(cfg))
    if not role.coldstart and data.num_train == 0:
        raise DataError(f"training site {role.key} has no images under {role.data_dir}/train/<class>/")
    return data


def handle_train(msg: Message, context: Context) -> Message:
    cfg, arrays, config = _unpack(msg, context)
    role = node_role(context)
    pid = role.index(cfg)
    if (is_coldstart(cfg, pid) or role.coldstart) and not config.get("joined"):
        raise ValueError(f"client {pid} ({role.key}) is a cold-start client and must never train")
    algo = get_algorithm(cfg.algorithm)
    data = client_data(cfg, role, pid)
    num_classes = len(federation_classes(cfg))
    server_round = int(config.get("server_round", 0))
    private_in, source = _private(context, role, cfg)
    started = time.perf_counter()
    upload, private, metrics = algo.client_train(
        arrays, config, private_in, data, cfg, num_classes, pick_device(cfg.device),
        client_seed(cfg, pid, server_round))
    if private:
        context.state[PRIVATE] = to_array_record(private)
    metrics["train_time_s"] = time.perf_counter() - started
    if role.state_dir and private:
        crc_out = save_private_state(role, cfg, context, private, server_round)
        _journal(role, cfg, {"round": server_round, "phase": "train", "source": source,
                             "crc_in": state_checksum(private_in), "crc_out": crc_out, "run_id": int(context.run_id)})
    return _reply(msg, upload, metrics)


def handle_evaluate(msg: Message, context: Context) -> Message:
    """Personalised accuracy on the local test split; for methods with no single
    global model also this client's model on the global test set."""
    cfg, arrays, config = _unpack(msg, context)
    role = node_role(context)
    pid = role.index(cfg)
    algo = get_algorithm(cfg.algorithm)
    data = client_data(cfg, role, pid)
    num_classes = len(federation_classes(cfg))
    device = pick_device(cfg.device)
    private, source = _private(context, role, cfg)
    predict = algo.client_predict(arrays, config, private, cfg, num_classes, device)
    metrics: dict[str, Any] = {"accuracy": accuracy(predict, data.test_x, data.test_y, cfg, device),
                               "num_test": int(len(data.test_y)), "num_samples": data.num_train}
    if config.get("global_test"):
        try:
            gx, gy = load_global_test(cfg, role.global_test_dir)
        except DataError as err:
            raise DataError(f"{cfg.algorithm} has no single global model, so its global accuracy is the mean of "
                            f"the client models on the global test set, which this node cannot load ({err}). "
                            "Give the node the test set with --node-config 'global-test-dir=\"/path\"' "
                            "(test/<class>/* images).") from err
        metrics["global_accuracy"] = accuracy(predict, gx, gy, cfg, device)
    if role.state_dir:
        _journal(role, cfg, {"round": int(config.get("server_round", 0)), "phase": "evaluate", "source": source,
                             "crc_in": state_checksum(private), "run_id": int(context.run_id)})
    upload = algo.client_eval_upload(arrays, config, private, cfg) if algo.coldstart_needs_client_parts else None
    return _reply(msg, upload, metrics)


def handle_coldstart(msg: Message, context: Context) -> Message:
    """A client that never trained gets the new-client model and no gradient step."""
    cfg, arrays, config = _unpack(msg, context)
    role = node_role(context)
    pid = role.index(cfg)
    algo = get_algorithm(cfg.algorithm)
    data = client_data(cfg, role, pid)
    num_classes = len(federation_classes(cfg))
    metrics = algo.client_coldstart(arrays, config, data, cfg, num_classes, pick_device(cfg.device))
    metrics.setdefault("num_test", int(len(data.test_y)))
    return _reply(msg, None, metrics)


# ------------------------------------------------------------------ onboarding a new site
def onboard_data(role: NodeRole, cfg: ExperimentConfig) -> ClientData:
    """What a node being onboarded adapts to: its partition (research mode), its image folder
    in the train/test class layout (labels used only to score test/), or any folder of images
    (unlabeled: no accuracy is reported)."""
    from . import onboard

    if role.mode == "partition":
        return load_client_data(cfg, role.site_id)
    if onboard.has_labelled_layout(role.data_dir):
        return client_data(cfg, role, role.index(cfg))
    x, _ = onboard.read_unlabeled_images(role.data_dir, cfg.image_size)
    return onboard.unlabeled_only(x)


def onboarded_model_path(role: NodeRole, run_name: str) -> Path:
    """node config model-path (a file, or a folder ending in '/'), else
    <state-dir>/<run>/<site>.onboarded.pt, else ./onboarded/<run>/<site>.pt."""
    if role.model_path:
        path = Path(os.path.expanduser(role.model_path))
        return path / f"{_safe(run_name)}-{role.key}.pt" if role.model_path.endswith("/") or path.is_dir() else path
    if role.state_dir:
        folder, _ = state_paths(role.state_dir, run_name, role.key)
        return folder.with_name(f"{role.key}.onboarded.pt")
    return Path.cwd() / "onboarded" / _safe(run_name) / f"{role.key}.pt"


def handle_onboard(msg: Message, context: Context) -> Message:
    """A node joining a trained federation: adapt the cold-start package to its own images
    (no gradient step), save the routed model locally, and send back only its routing row
    (K floats) and its cold-start metrics."""
    from . import onboard

    cfg, arrays, config = _unpack(msg, context)
    role = node_role(context)
    received = onboard.package_crc(arrays)
    if "package_crc" in config and int(config["package_crc"]) != received:
        raise ValueError(f"the cold-start package arrived damaged (crc {received}, sent {config['package_crc']})")
    data = onboard_data(role, cfg)
    run_name = str(config.get("run_name") or cfg.resolved_run_name)
    meta = {"run_name": run_name, "package_round": int(config.get("package_round", 0)), "package_crc": received,
            "site": role.key, "node_id": int(context.node_id)}
    done = onboard.build_onboarded(arrays, config, data, cfg, pick_device(cfg.device), meta)
    path = onboarded_model_path(role, run_name)
    size = onboard.save_bundle(done.bundle, path)
    summary = {**meta, "model": str(path), "model_bytes": size, "routing_row": done.metrics.get("routing_row"),
               "metrics": done.bundle["metrics"]}
    _atomic_write(path.with_name(path.name + ".json"), lambda fh: fh.write(json.dumps(summary, indent=1).encode()))
    log.info("site %s onboarded: model saved to %s (%d bytes); cold-start accuracy %s", role.key, path, size,
             done.metrics.get("coldstart_accuracy", "n/a"))
    context.state["onboarded"] = config_record({"model": str(path), "run-name": run_name,
                                                "package-round": meta["package_round"]})
    # only the routing row and numbers leave the node (onboard.check_reply enforces it on the server)
    return Message(content=RecordDict({METRICS: metric_record({**done.metrics, "model_bytes": size})}), reply_to=msg)
