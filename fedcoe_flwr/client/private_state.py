"""A site's private parts (FedPer's head, FedCoE's local part, ...): kept in
``context.state`` and, with node config ``state-dir``, on disk under
``<state-dir>/<run>/<site>.pt`` (written atomically after every training round, reloaded
when a restarted SuperNode has an empty ``context.state``), with a journal of where each
round's state came from. They never leave the node."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from flwr.app import Context

from ..config import ExperimentConfig
from ..fileio import atomic_write
from ..records import from_array_record, tensors_crc, to_array_record
from .node import NodeRole, safe_name

log = logging.getLogger(__name__)
PRIVATE = "private"
STATE_FORMAT = 1


def state_checksum(arrays: Mapping[str, torch.Tensor] | None) -> int | None:
    """CRC-32 over the keys, dtypes, shapes and bytes of a state dict (None for no state)."""
    return None if arrays is None else tensors_crc(arrays)


def state_paths(state_dir: str | os.PathLike, run_name: str, site_key: str) -> tuple[Path, Path]:
    """(private-state file, journal) of one site in one run under a node's state-dir."""
    folder = Path(os.path.expanduser(str(state_dir))) / safe_name(run_name)
    return folder / f"{site_key}.pt", folder / f"{site_key}.journal.json"


def journal(role: NodeRole, cfg: ExperimentConfig, event: dict[str, Any]) -> None:
    """Append one event (round, phase, where the private state came from, checksums) to
    the site's journal: what a restart test or an operator checks."""
    _, path = state_paths(role.state_dir, cfg.resolved_run_name, role.key)
    try:
        events = json.loads(path.read_text()) if path.is_file() else []
    except (OSError, ValueError):
        events = []
    events.append({**event, "pid": os.getpid(), "time": round(time.time(), 3)})
    atomic_write(path, json.dumps(events, indent=1))


def save_private_state(role: NodeRole, cfg: ExperimentConfig, context: Context, private: Mapping[str, torch.Tensor],
                       server_round: int) -> int:
    """Write the private parts to <state-dir>/<run>/<site>.pt (tmp file + rename)."""
    path, _ = state_paths(role.state_dir, cfg.resolved_run_name, role.key)
    tensors = {k: v.detach().cpu().contiguous() for k, v in private.items()}
    crc = state_checksum(tensors)
    payload = {"format": STATE_FORMAT, "site": role.key, "run_id": int(context.run_id),
               "run_name": cfg.resolved_run_name, "round": int(server_round), "crc": crc, "private": tensors}
    atomic_write(path, lambda fh: torch.save(payload, fh))
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


def private_parts(context: Context, role: NodeRole | None = None, cfg: ExperimentConfig | None = None
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
