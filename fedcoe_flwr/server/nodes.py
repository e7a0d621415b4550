"""Which SuperNode is which client. SuperNode ids change when a node restarts, so sites
are identified by what they say of themselves (node config ``partition-id`` or
``site-id``) in answer to a profile query, before round 1 and whenever new nodes appear."""

from __future__ import annotations

import time
from logging import INFO, WARNING
from typing import Any

from flwr.common.logger import log
from flwr.serverapp import Grid

from ..algorithms.base import Algorithm, ServerState
from ..config import ExperimentConfig
from ..records import CONFIG
from .exchange import exchange
from .messages import Messenger
from .onboarding import Onboarder


WAIT_REPORT_S = 5.0  # how often a wait for SuperNodes says where it stands


class FederationError(RuntimeError):
    """The federation cannot go on (wrong node count, too few replies); says how to fix it."""


class NodeDirectory:
    def __init__(self, cfg: ExperimentConfig, algorithm: Algorithm, messenger: Messenger, onboarder: Onboarder):
        self.cfg, self.algorithm, self.messenger, self.onboarder = cfg, algorithm, messenger, onboarder
        self.node_of: dict[int, int] = {}  # client index -> node id
        self.known: set[int] = set()  # every node id seen (answered discovery or onboarded)
        self.pending: dict[int, dict[str, Any]] = {}  # found at discovery, onboarded before round 1
        self.joined: dict[int, int] = {}  # client index -> node id of onboarded nodes that train

    def client_of(self, node_id: int) -> int | None:
        return next((c for c, n in self.node_of.items() if n == node_id), None)

    def profiles(self, grid: Grid, node_ids: list[int]) -> tuple[dict[int, dict[str, Any]], list[str]]:
        """node id -> its profile, and one line per node that did not answer (with why)."""
        msgs = [self.messenger.query(n, "query.profile") for n in node_ids]
        found, failed = {}, []
        for reply in exchange(grid, msgs, self.cfg):
            if reply.has_error():
                failed.append(str(reply.error.reason) if reply.error.reason else str(reply.error))
                continue
            found[int(reply.metadata.src_node_id)] = dict(reply.content.config_records[CONFIG])
        return found, failed

    def discover(self, grid: Grid) -> None:
        """Ask every node for its partition and check the federation matches the config."""
        want = self.cfg.num_partitions
        deadline = time.time() + self.cfg.wait_for_nodes
        node_ids = [int(n) for n in grid.get_node_ids()]
        last_said = 0.0
        while len(node_ids) < want and time.time() < deadline:
            if time.time() - last_said >= WAIT_REPORT_S:  # a visible countdown, not a silent wait
                log(INFO, "[nodes] %d of %d SuperNodes connected; waiting up to %.0fs more", len(node_ids), want,
                    deadline - time.time())
                last_said = time.time()
            time.sleep(1.0)
            node_ids = [int(n) for n in grid.get_node_ids()]
        found, failed = self.profiles(grid, node_ids)
        sizes = {int(info["num-partitions"]) for info in found.values()}
        if found and not failed and len(sizes) == 1 and sizes != {want} and len(found) == min(sizes):
            # every node agrees on another federation size: a simulation started with another count
            raise FederationError(
                f"the federation has {len(found)} nodes (num-partitions={min(sizes)}) but the config needs {want} "
                f"({self.cfg.num_clients} training + {self.cfg.num_coldstart_clients} cold-start). In simulation "
                f"run flwr run . --federation-config \"num-supernodes={want}\", or set num_clients and "
                "num_coldstart_clients to match the nodes you have.")
        seen: dict[int, int] = {}
        extra: dict[int, dict[str, Any]] = {}  # new sites / surplus cold-start nodes: onboarded, not counted
        problems = [f"a node refused the profile query: {reason}" for reason in failed]
        for node, info in sorted(found.items()):
            pid, num = int(info["partition-id"]), int(info["num-partitions"])
            if num != want:
                problems.append(f"node {node} ({info.get('site', '?')}) says num-partitions={num}, the config "
                                f"needs {want} (num_clients + num_coldstart_clients)")
                continue
            if self.cfg.onboard_new_nodes and (pid < 0 or (pid >= self.cfg.num_clients and pid in seen)):
                extra[node] = info
                continue
            if pid in seen:
                problems.append(f"nodes {seen[pid]} and {node} both claim client {pid} "
                                f"({info.get('site', '?')}): two SuperNodes have the same site-id/partition-id")
                continue
            seen[pid] = node
        missing = sorted(set(range(want)) - set(seen))
        if problems or missing:
            lines = problems + ([f"no node for client(s) {missing[:10]}"] if missing else [])
            hint = (f"In simulation run flwr run . --federation-config \"num-supernodes={want}\"; in a deployment "
                    "start one SuperNode per site with its own site-id (docs/DEPLOYMENT.md)."
                    if not problems else "Fix the nodes named above (their logs say more).")
            raise FederationError(f"the federation does not match the config ({len(node_ids)} node(s) connected, "
                                  f"{want} needed: {self.cfg.num_clients} training + "
                                  f"{self.cfg.num_coldstart_clients} cold-start):\n  - " + "\n  - ".join(lines)
                                  + f"\n{hint}")
        self.known = set(node_ids)
        self.pending = extra
        self.node_of = seen
        log(INFO, "[nodes] connected before round 1: %s", ", ".join(
            f"client {pid} = {found[node].get('site', '?')} (node {node})" for pid, node in sorted(seen.items())))
        log(INFO, "[fedcoe] %d nodes: partitions 0..%d train, %d..%d cold start", want,
            self.cfg.num_clients - 1, self.cfg.num_clients, want - 1)

    def check_new_nodes(self, grid: Grid, state: ServerState, package_round: int, phase: str
                        ) -> tuple[list[dict[str, Any]], ServerState]:
        """Onboard SuperNodes that joined since discovery (or were set aside by it): a node
        never seen answers the profile query; a training site back under a new node id is
        addressed under that id from now on; anything else gets the cold-start package built
        from ``state`` (= checkpoint ``package_round``) and, with ``coldstart_join_training``,
        trains from the next round on. Returns the registry entries and the state (grown
        when a node joins training)."""
        if not self.cfg.onboard_new_nodes:
            return [], state
        new = sorted(int(n) for n in grid.get_node_ids() if int(n) not in self.known)
        candidates = dict(self.pending)
        self.pending = {}
        if new:
            self.known.update(new)
            found, failed = self.profiles(grid, new)
            for reason in failed:
                log(WARNING, "[onboard] a new node did not answer the profile query: %s", reason)
            for node, info in found.items():
                pid = int(info["partition-id"])
                if 0 <= pid < self.cfg.num_clients and not info.get("cold-start"):
                    log(INFO, "[onboard] training client %d is back as node %d (was %s)", pid, node,
                        self.node_of.get(pid))
                    self.node_of[pid] = node
                    continue
                candidates[node] = info
        if not candidates:
            return [], state
        log(INFO, "[onboard] %s: %d node(s) joined the running federation: %s", phase, len(candidates),
            sorted(candidates))
        joining: list[int] = []
        entries = self.onboarder.onboard(grid, candidates, state, package_round, phase,
                                         decide=lambda entry: self.join_training(entry, joining))
        for index in joining:
            state = self.algorithm.add_client(state, index, self.cfg)
        return entries, state

    def join_training(self, entry: dict[str, Any], joining: list[int]) -> None:
        """An onboarded node with labelled training images becomes a training client (a new
        client index after the configured ones) when ``coldstart_join_training`` is set."""
        if not self.cfg.coldstart_join_training or entry.get("status") != "onboarded":
            return
        if not entry.get("metrics", {}).get("can_train"):
            log(INFO, "[onboard] node %d has no labelled training images: it stays a cold-start node",
                entry["node_id"])
            return
        if not self.algorithm.can_join_training:
            log(WARNING, "[onboard] %s cannot add a training client during a run: node %d does not train",
                self.cfg.algorithm, entry["node_id"])
            return
        index = max([self.cfg.num_partitions - 1, *self.joined]) + 1
        self.joined[index] = entry["node_id"]
        self.node_of[index] = entry["node_id"]
        joining.append(index)
        entry["joined_as_client"] = index
        log(INFO, "[onboard] node %d joins training as client %d from the next round on", entry["node_id"], index)
