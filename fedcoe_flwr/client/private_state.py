"""A site's private parts (FedPer's head, FedCoE's local part, ...): kept in
``context.state`` and on disk, one version per round the site trained in
(``<state-dir>/<run>/<site>/round-NNNNN.pt``, written atomically), with a journal of where
each round's state came from. They never leave the node.

A client always starts from the version of the last round the server could have
aggregated (the message's ``server_round`` says which): after a crash and a resume the
versions of the round that was never aggregated are skipped, so a resumed run trains each
private part exactly as the uninterrupted run would."""

from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any, Mapping

import torch
from flwr.app import ConfigRecord, Context

from ..config import ExperimentConfig
from ..fileio import atomic_write
from ..records import from_array_record, tensors_crc, to_array_record
from .node import NodeRole, safe_name

log = logging.getLogger(__name__)
PRIVATE = "private"
PRIVATE_ROUND = "private-round"  # the round the private parts in context.state were trained in
STATE_FORMAT = 2
KEEP_VERSIONS = 3


def state_checksum(arrays: Mapping[str, torch.Tensor] | None) -> int | None:
    """CRC-32 over the keys, dtypes, shapes and bytes of a state dict (None for no state)."""
    return None if arrays is None else tensors_crc(arrays)


def state_dir_of(role: NodeRole, cfg: ExperimentConfig) -> str:
    """Where this node keeps its private parts on disk: node config ``state-dir``; for a
    partition of a configured data set (simulation, research deployments) the run config's
    ``state_dir`` (default ``<cache_dir>/state``); '' (memory only) for a site without one."""
    if role.state_dir:
        return role.state_dir
    if role.mode == "partition":
        return cfg.state_dir or str(Path(cfg.cache_dir) / "state")
    return ""


def state_paths(state_dir: str | os.PathLike, run_name: str, site_key: str) -> tuple[Path, Path]:
    """(folder of the site's private-state versions, its journal) in one run under a state dir."""
    folder = Path(os.path.expanduser(str(state_dir))) / safe_name(run_name)
    return folder / site_key, folder / f"{site_key}.journal.json"


def version_path(folder: Path, server_round: int) -> Path:
    return folder / f"round-{server_round:05d}.pt"


def journal(role: NodeRole, cfg: ExperimentConfig, event: dict[str, Any]) -> None:
    """Append one event (round, phase, where the private state came from, checksums) to
    the site's journal: what a restart test or an operator checks. Only for a node whose
    operator named a state-dir: a simulation's nodes would rewrite it on every call for no reader."""
    if not role.state_dir:
        return
    _, path = state_paths(role.state_dir, cfg.resolved_run_name, role.key)
    try:
        events = json.loads(path.read_text()) if path.is_file() else []
    except (OSError, ValueError):
        events = []
    events.append({**event, "pid": os.getpid(), "time": round(time.time(), 3)})
    atomic_write(path, json.dumps(events, indent=1))


def save_private_state(role: NodeRole, cfg: ExperimentConfig, context: Context, private: Mapping[str, torch.Tensor],
                       server_round: int) -> int:
    """Keep the private parts trained in ``server_round``: in ``context.state`` and, with a
    state dir, as ``<state-dir>/<run>/<site>/round-NNNNN.pt`` (the last KEEP_VERSIONS kept)."""
    tensors = {k: v.detach().cpu().contiguous() for k, v in private.items()}
    crc = state_checksum(tensors)
    context.state[PRIVATE] = to_array_record(tensors)
    context.state[PRIVATE_ROUND] = ConfigRecord({"round": int(server_round)})
    state_dir = state_dir_of(role, cfg)
    if state_dir:
        folder, _ = state_paths(state_dir, cfg.resolved_run_name, role.key)
        payload = {"format": STATE_FORMAT, "site": role.key, "run_id": int(context.run_id),
                   "run_name": cfg.resolved_run_name, "round": int(server_round), "crc": crc, "private": tensors}
        atomic_write(version_path(folder, server_round), lambda fh: torch.save(payload, fh))
        for old in sorted(folder.glob("round-*.pt"), reverse=True)[KEEP_VERSIONS:]:
            old.unlink(missing_ok=True)
    return crc  # type: ignore[return-value]


def load_private_state(role: NodeRole, cfg: ExperimentConfig, context: Context, before_round: int
                       ) -> tuple[dict[str, torch.Tensor], dict[str, Any]] | None:
    """The newest private parts this site saved in this run (or in the run being resumed)
    for a round before ``before_round``: a round the server never aggregated is skipped."""
    state_dir = state_dir_of(role, cfg)
    if not state_dir:
        return None
    folder, _ = state_paths(state_dir, cfg.resolved_run_name, role.key)
    for path in sorted(folder.glob("round-*.pt"), reverse=True):
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            private = dict(payload["private"])
        except Exception as err:  # unreadable: try the previous version, loudly
            log.warning("private state file '%s' is unreadable (%s); trying an older one", path, err)
            continue
        if int(payload.get("round", -1)) >= before_round:
            continue
        same_run = int(payload.get("run_id", -1)) == int(context.run_id)
        if not same_run and not (cfg.resume or cfg.resume_from):
            log.warning("private state '%s' belongs to run %s, not this run %s; ignored (set resume to continue "
                        "an earlier run)", path, payload.get("run_id"), context.run_id)
            return None
        if state_checksum(private) != payload.get("crc"):
            log.warning("private state '%s' fails its checksum; trying an older one", path)
            continue
        return private, payload
    return None


def private_parts(context: Context, role: NodeRole, cfg: ExperimentConfig, before_round: int
                  ) -> tuple[dict[str, torch.Tensor] | None, str]:
    """(private parts as of the newest round before ``before_round``, where they came from:
    'context' | 'state-dir' | 'none'). Training in round r asks for rounds before r, an
    evaluation after round r for rounds up to r."""
    record = context.state.array_records.get(PRIVATE)
    held = context.state.config_records.get(PRIVATE_ROUND)
    if record is not None and (held is None or int(held["round"]) < before_round):
        return from_array_record(record), "context"
    loaded = load_private_state(role, cfg, context, before_round)
    if loaded is not None:
        private, payload = loaded
        context.state[PRIVATE] = to_array_record(private)  # the SuperNode keeps it from now on
        context.state[PRIVATE_ROUND] = ConfigRecord({"round": int(payload["round"])})
        log.info("site %s: private state of round %s reloaded from disk", role.key, payload.get("round"))
        return private, "state-dir"
    if record is not None:
        log.warning("site %s: private state of round %s is newer than round %d allows and no older version is "
                    "on disk; using it", role.key, held["round"], before_round - 1)
        return from_array_record(record), "context"
    return None, "none"
