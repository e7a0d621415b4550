"""Flower's view of a deployment, read through the `flwr` CLI's JSON output (`--format json`):
registered SuperNodes and their status, runs and their status. The CLI is Flower's stable
interface to the SuperLink's Control API; its JSON needs no log parsing."""

from __future__ import annotations

import atexit
import json
import os
import shutil
import subprocess
import sys
import tempfile
import tomllib
import zipfile
from pathlib import Path
from typing import Any, Mapping

_APP_FOLDERS: dict[Path, Path] = {}


def flower_env(env: Mapping[str, str]) -> dict[str, str]:
    """``env`` with this interpreter's scripts folder first on PATH, so that every Flower
    executable (``flwr``, ``flower-superlink``, ``flower-supernode`` and the
    ``flower-superexec`` that the SuperLink and SuperNodes start themselves) is the one of the
    installation running this code, in a virtual environment that was not activated too."""
    scripts = str(Path(sys.executable).parent)
    path = [d for d in env.get("PATH", "").split(os.pathsep) if d and d != scripts]
    return {**env, "PATH": os.pathsep.join([scripts, *path])}


class FlowerCliError(RuntimeError):
    """A `flwr` command failed; the message holds the command and what it said."""


class FlowerCli:
    """`flwr <command> ... <connection> --format json` with one FLWR_HOME (where the
    connection is configured) and working directory."""

    def __init__(self, connection: str, env: Mapping[str, str], cwd: Path):
        self.connection, self.env, self.cwd = connection, flower_env(env), cwd

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
        """`flwr run` without streaming; returns the run id. The app is sent from
        ``app_folder(app)``: the same FAB, built in a fraction of the time."""
        out = self.json(["run", str(self.app_folder(app)), self.connection, "--run-config", str(run_config)],
                        timeout=300.0)
        return int(out["run-id"])

    def build(self, app: Path, out: Path) -> Path:
        """`flwr build`: the FAB that `flwr run <app>` sends (its file name holds its hash)."""
        out.mkdir(parents=True, exist_ok=True)
        res = subprocess.run(["flwr", "build", "--app", str(app)], env=self.env, cwd=out, capture_output=True,
                             text=True, timeout=300, start_new_session=True)
        fabs = list(out.glob("*.fab"))
        if res.returncode != 0 or len(fabs) != 1:
            raise FlowerCliError(f"`flwr build --app {app}` failed (exit {res.returncode}):\n"
                                 f"{(res.stdout + res.stderr)[-2000:]}")
        return fabs[0]

    def app_folder(self, app: Path) -> Path:
        """A folder holding only the files of ``app``'s FAB, unpacked once per process. Flower
        walks every file under the app folder before it filters them, and a virtual
        environment inside the checkout makes that about 50,000 files (7 s per `flwr run` on
        a 2-core machine). Each ``fab-exclude`` pattern gets an empty file to match, since
        Flower 1.39 refuses a pattern that matches nothing; the FAB built from the folder is
        checked to be the same FAB (same hash) as the one built from ``app``, else ``app``
        itself is used."""
        app = app.resolve()
        if app not in _APP_FOLDERS:
            work = Path(tempfile.mkdtemp(prefix="fedcoe-app-"))
            atexit.register(shutil.rmtree, work, True)
            fab = self.build(app, work / "fab")
            folder = work / "app"
            with zipfile.ZipFile(fab) as z:
                z.extractall(folder, [n for n in z.namelist() if not n.startswith(".info/")])
            shutil.copyfile(app / "pyproject.toml", folder / "pyproject.toml")  # the FAB's own is re-serialised
            patterns = tomllib.loads((folder / "pyproject.toml").read_text())["tool"]["flwr"]["app"].get("fab-exclude", [])
            names = [p.lstrip("/")[:-3] + "/placeholder.py" if p.endswith("/**") else p.lstrip("/") for p in patterns]
            if any("*" in name for name in names):  # a pattern no single file name stands for
                _APP_FOLDERS[app] = app
                return app
            for name in names:
                (folder / name).parent.mkdir(parents=True, exist_ok=True)
                (folder / name).touch()
            same = self.build(folder, work / "check").name == fab.name
            _APP_FOLDERS[app] = folder if same else app
        return _APP_FOLDERS[app]

    def run(self, run_id: int) -> dict[str, Any]:
        """One run as the SuperLink sees it: `status` (e.g. `running`, `finished:completed`,
        `finished:failed`), `status-details`, timestamps, traffic."""
        out = self.json(["ls", self.connection, "--run-id", str(run_id)])
        return dict(out["runs"][0])

    def log_command(self, run_id: int) -> list[str]:
        """The command that prints a run's log (all of it, once the run has ended)."""
        return ["flwr", "log", str(run_id), self.connection]
