"""Onboarding, node side: a site joining a trained federation adapts the cold-start
package to its own images with no gradient step (the method's ``onboard`` hook), saves
the result as one model file (``fedcoe_flwr.bundle``) that ``python -m fedcoe_flwr.predict``
uses without Flower, and reports only its routing row and numbers."""

from __future__ import annotations

import json
import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
from flwr.app import Context, Message, RecordDict

from ..algorithms import get_algorithm
from ..algorithms.base import ClientStep
from ..algorithms.training import accuracy
from ..bundle import BUNDLE_FORMAT, bundle_predictor, save_bundle
from ..config import ExperimentConfig
from ..data import (IMAGE_SUFFIXES, ClientData, DataError, decode_image, federation_classes, load_client_data,
                    to_tensor_images)
from ..fileio import atomic_write
from ..models import pick_device
from ..records import (ARRAYS, CONFIG, EXPERIMENT, METRICS, config_record, experiment_from_record,
                       from_array_record, metric_record, tensors_crc)
from .node import NodeRole, client_data, configure_threads, node_role, safe_name
from .private_state import state_paths

log = logging.getLogger(__name__)


def read_unlabeled_images(folder: str | os.PathLike, size: int) -> tuple[torch.Tensor, list[Path]]:
    """Every image under ``folder`` (sorted paths) as uint8 NCHW, resized as the training data was."""
    root = Path(os.path.expanduser(str(folder)))
    if not root.exists():
        raise DataError(f"image folder '{root}' does not exist")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*")
                                                  if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise DataError(f"'{root}' holds no images ({', '.join(IMAGE_SUFFIXES)})")
    arrays = np.stack([decode_image(p.read_bytes(), str(p), size) for p in files])
    return to_tensor_images(arrays), files


def has_labelled_layout(folder: str | os.PathLike) -> bool:
    """train/<class>/* or test/<class>/* (a .tar.gz counts as that layout)."""
    root = Path(os.path.expanduser(str(folder)))
    if root.is_file():
        return True
    return any((root / split).is_dir() and any(p.is_dir() for p in (root / split).iterdir())
               for split in ("train", "test"))


def unlabeled_only(x: torch.Tensor) -> ClientData:
    empty = torch.zeros((0, *x.shape[1:]), dtype=torch.uint8)
    return ClientData(x, torch.zeros(len(x), dtype=torch.int64), empty, torch.zeros(0, dtype=torch.int64))


def unlabeled_images(data: ClientData) -> torch.Tensor:
    """What the node adapts and routes on: its train/ images with the labels unused, or its
    test/ images when it has no train/ split."""
    return data.train_x if len(data.train_x) else data.test_x


@dataclass
class Onboarded:
    bundle: dict[str, Any]  # what the node saves (``save_bundle``)
    metrics: dict[str, Any]  # what the node reports (the routing row among them)


def build_onboarded(package: Mapping[str, torch.Tensor], payload_config: Mapping[str, Any], data: ClientData,
                    cfg: ExperimentConfig, device: torch.device, meta: Mapping[str, Any] | None = None) -> Onboarded:
    """The node's routed, adapted model and its report, from the package and its own
    images (no gradient step, labels used only to score the labelled test split)."""
    t0 = time.perf_counter()
    names = federation_classes(cfg)
    num_classes = len(names)
    unlabeled = unlabeled_images(data)
    if len(unlabeled) == 0:
        raise DataError("this node has no images to adapt to")
    algo = get_algorithm(cfg.algorithm)
    bundle: dict[str, Any] = {"format": BUNDLE_FORMAT, "algorithm": cfg.algorithm, "config": cfg.to_dict(),
                              "class_names": list(names), "created": time.time(), **dict(meta or {})}
    metrics: dict[str, Any] = {"num_unlabeled": int(len(unlabeled)), "num_test": int(len(data.test_y)),
                               "can_train": int(data.num_train > 0 and len(data.train_x) > 0)}
    step = ClientStep(dict(package), payload_config, None, data, cfg, num_classes, device)
    part, row = algo.onboard(step, unlabeled)
    bundle.update(part)
    if row is not None:
        bundle["routing_row"] = row
        metrics["routing_row"] = row
    if len(data.test_y):
        reported = algo.client_coldstart(step)
        metrics.update({k: v for k, v in reported.items() if k.startswith("coldstart_accuracy")})
        metrics["model_accuracy"] = accuracy(bundle_predictor(bundle, device), data.test_x, data.test_y, cfg, device)
    bundle["metrics"] = {k: v for k, v in metrics.items() if k != "routing_row"}
    metrics["onboard_time_s"] = time.perf_counter() - t0
    return Onboarded(bundle, metrics)


def onboard_data(role: NodeRole, cfg: ExperimentConfig) -> ClientData:
    """What a node being onboarded adapts to: its partition (research mode), its image folder
    in the train/test class layout (labels used only to score test/), or any folder of images
    (unlabeled: no accuracy is reported)."""
    if role.mode == "partition":
        return load_client_data(cfg, role.site_id)
    if has_labelled_layout(role.data_dir):
        return client_data(cfg, role, role.index(cfg))
    x, _ = read_unlabeled_images(role.data_dir, cfg.image_size)
    return unlabeled_only(x)


def onboarded_model_path(role: NodeRole, run_name: str) -> Path:
    """node config model-path (a file, or a folder ending in '/'), else
    <state-dir>/<run>/<site>.onboarded.pt, else ./onboarded/<run>/<site>.pt."""
    if role.model_path:
        path = Path(os.path.expanduser(role.model_path))
        return path / f"{safe_name(run_name)}-{role.key}.pt" if role.model_path.endswith("/") or path.is_dir() else path
    if role.state_dir:
        folder, _ = state_paths(role.state_dir, run_name, role.key)
        return folder.with_name(f"{role.key}.onboarded.pt")
    return Path.cwd() / "onboarded" / safe_name(run_name) / f"{role.key}.pt"


def handle_onboard(msg: Message, context: Context) -> Message:
    """A node joining a trained federation: adapt the cold-start package to its own images
    (no gradient step), save the routed model locally, and send back only its routing row
    (K floats) and its cold-start metrics."""
    configure_threads(context.node_config)
    cfg = experiment_from_record(msg.content.config_records[EXPERIMENT])
    arrays = from_array_record(msg.content.array_records[ARRAYS])
    config = dict(msg.content.config_records[CONFIG])
    role = node_role(context)
    received = tensors_crc(arrays)
    if "package_crc" in config and int(config["package_crc"]) != received:
        raise ValueError(f"the cold-start package arrived damaged (crc {received}, sent {config['package_crc']})")
    data = onboard_data(role, cfg)
    run_name = str(config.get("run_name") or cfg.resolved_run_name)
    meta = {"run_name": run_name, "package_round": int(config.get("package_round", 0)), "package_crc": received,
            "site": role.key, "node_id": int(context.node_id)}
    done = build_onboarded(arrays, config, data, cfg, pick_device(cfg.device), meta)
    path = onboarded_model_path(role, run_name)
    size = save_bundle(done.bundle, path)
    summary = {**meta, "model": str(path), "model_bytes": size, "routing_row": done.metrics.get("routing_row"),
               "metrics": done.bundle["metrics"]}
    atomic_write(path.with_name(path.name + ".json"), json.dumps(summary, indent=1))
    log.info("site %s onboarded: model saved to %s (%d bytes); cold-start accuracy %s", role.key, path, size,
             done.metrics.get("coldstart_accuracy", "n/a"))
    context.state["onboarded"] = config_record({"model": str(path), "run-name": run_name,
                                                "package-round": meta["package_round"]})
    # only the routing row and numbers leave the node (the server's onboarding.check_reply enforces it)
    return Message(content=RecordDict({METRICS: metric_record({**done.metrics, "model_bytes": size})}), reply_to=msg)
