"""Flower's view of a deployment, read through the `flwr` CLI's JSON output (`--format json`):
registered SuperNodes and their status, runs and their status. The CLI is Flower's stable
interface to the SuperLink's Control API; its JSON needs no log parsing."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path
from typing import Any, Mapping


class FlowerCliError(RuntimeError):
    """A `flwr` command failed; the message holds the command and what it said."""


class FlowerCli:
    """`flwr <command> ... <connection> --format json` with one FLWR_HOME (where the
    connection is configured) and working directory."""

    def __init__(self, connection: str, env: Mapping[str, str], cwd: Path):
        self.connection, self.env, self.cwd = connection, dict(env), cwd

    def json(self, args: list[str], timeout: float = 60.0) -> dict[str, Any]:
        cmd = ["flwr", *args, "--format", "json"]
        res = subprocess.run(cmd, env=self.env, cwd=self.cwd, capture_output=True, text=True,
                             timeout=timeout, start_new_session=True)
        try:
            out = json.loads(res.stdout)
        except ValueError:
            raise FlowerCliError(f"`{' '.join(cmd)}` (exit {res.returncode}) printed no JSON:\n"
                                 f"{(res.stdout + res.stderr)[-2000:]}") from None
        if res.returncode != 0 or not out.get("success", False):
            raise FlowerCliError(f"`{' '.join(cmd)}` failed (exit {res.returncode}): "
                                 f"{out.get('error-message', res.stderr[-2000:])}")
        return out

    def register(self, public_key: Path, name: str) -> int:
        """Register a SuperNode's public key; returns the node id the SuperLink gave it."""
        out = self.json(["supernode", "register", str(public_key), self.connection, "--name", name])
        return int(out["node-id"])

    def nodes(self) -> dict[int, dict[str, Any]]:
        """Every registered SuperNode by node id: `status` (registered | online | offline |
        unregistered), `online-at`, `offline-at`, ..."""
        out = self.json(["supernode", "list", self.connection])
        return {int(node["node-id"]): node for node in out["nodes"]}

    def start_run(self, app: Path, run_config: Path) -> int:
        """`flwr run` without streaming; returns the run id."""
        out = self.json(["run", str(app), self.connection, "--run-config", str(run_config)], timeout=300.0)
        return int(out["run-id"])

    def run(self, run_id: int) -> dict[str, Any]:
        """One run as the SuperLink sees it: `status` (e.g. `running`, `finished:completed`,
        `finished:failed`), `status-details`, timestamps, traffic."""
        out = self.json(["ls", self.connection, "--run-id", str(run_id)])
        return dict(out["runs"][0])

    def log_command(self, run_id: int) -> list[str]:
        """The command that prints a run's log (all of it, once the run has ended)."""
        return ["flwr", "log", str(run_id), self.connection]
