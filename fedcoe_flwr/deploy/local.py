"""A real Flower deployment on this machine's loopback, for trials and tests:

    python -m fedcoe_flwr.deploy.local --nodes 3 --tls --rounds 2 [--config configs/smoke.yaml]

1. cuts the configured data set into one image folder per site (``fedcoe_flwr.deploy.sites``),
2. with ``--tls`` makes a CA, the SuperLink certificate and one OpenSSH ECDSA key pair per
   SuperNode with ``scripts/make_certs.sh``,
3. starts ``flower-superlink`` (Fleet gRPC and Control/Runtime HTTP bound to 127.0.0.1 on free
   ports, its own FLWR_HOME, ``--enable-supernode-auth`` with TLS),
4. registers every node key (``flwr supernode register``),
5. starts N ``flower-supernode`` processes, each with its own data folder, state folder and
   FLWR_HOME (``--node-config 'data-dir=... site-id=... state-dir=...'``),
6. runs ``flwr run . <connection> --run-config <file> --stream`` and streams its progress,
7. reports where the results are (``results/<run>/``) and stops every process it started,
   children included (process groups, plus a sweep for processes carrying this deployment's
   marker in their environment: SuperExecs and ClientApps that left the group), also on
   Ctrl-C, SIGTERM or an error.

Everything lives in a run folder (default ``.deploy/<run-name>/``, git-ignored, so it never
ends up in the FAB): certs/, data/, superlink/ (FLWR_HOME, log), nodes/<site>/ (FLWR_HOME,
state/, log) and deployment.json (ports, timings, exit codes).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

ROOT = Path(__file__).resolve().parents[2]
MARK_ENV = "FEDCOE_DEPLOY_ID"
FLWR_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
CONNECTION = "fedcoe-local"


class DeploymentError(RuntimeError):
    """A component did not start or the run failed; the message names the log to read."""


# ------------------------------------------------------------------ helpers
def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def marked_processes(mark: str) -> list[int]:
    """PIDs of processes whose environment carries MARK_ENV=mark (everything this
    deployment started, including detached SuperExecs and orphaned ClientApps)."""
    needle = f"{MARK_ENV}={mark}".encode()
    pids = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


@dataclass
class Proc:
    name: str
    popen: subprocess.Popen
    log: Path
    started: float = field(default_factory=time.time)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None


def stop_group(proc: subprocess.Popen, grace: float = 5.0) -> int | None:
    """SIGTERM the process group (the process was started in a new session), then SIGKILL."""
    try:
        pgid = os.getpgid(proc.pid)
    except ProcessLookupError:
        pgid = proc.pid
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(pgid, sig)
        except (ProcessLookupError, PermissionError):
            pass
        try:
            proc.wait(timeout=wait)
            if sig == signal.SIGTERM:
                # the leader is gone; its group may still hold children
                try:
                    os.killpg(pgid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            break
        except subprocess.TimeoutExpired:
            continue
    return proc.poll()


# ------------------------------------------------------------------ the deployment
class LocalDeployment:
    """SuperLink + SuperNodes as real processes on 127.0.0.1. Use as a context manager:
    leaving the block stops everything it started."""

    def __init__(self, workdir: str | os.PathLike, num_nodes: int = 3, tls: bool = True,
                 config: str = "configs/smoke.yaml", overrides: Mapping[str, Any] | None = None,
                 num_coldstart: int | None = None, mode: str = "sites", unregistered: int = 0,
                 torch_threads: int = 1, certs: str | os.PathLike | None = None,
                 echo: Callable[[str], None] = print):
        from ..config import config_from_run_config

        if num_nodes < 1:
            raise ValueError("--nodes must be >= 1")
        if mode not in ("sites", "partitions"):
            raise ValueError("mode must be 'sites' or 'partitions'")
        self.workdir = Path(workdir).resolve()
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.tls, self.mode, self.echo = tls, mode, echo
        self.num_nodes, self.unregistered, self.torch_threads = num_nodes, unregistered, torch_threads
        coldstart = num_coldstart if num_coldstart is not None else (1 if num_nodes >= 2 else 0)
        # a relative --config: from the working directory if it is there, else from the project root
        self.config_path = str(Path(config).resolve() if Path(config).is_file() else (ROOT / config).resolve())
        self.overrides = {**dict(overrides or {}), "num_clients": num_nodes - coldstart,
                          "num_coldstart_clients": coldstart}
        self.cfg = config_from_run_config({"config": self.config_path, **self.overrides}, str(ROOT))
        self.mark = uuid.uuid4().hex
        self.certs = Path(certs).resolve() if certs else self.workdir / "certs"
        self.flwr_home = self.workdir / "superlink" / "home"
        self.fleet_port = self.http_port = 0
        self.superlink: Proc | None = None
        self.nodes: dict[int, Proc] = {}
        self.node_ids: dict[int, int] = {}  # node index -> registered SuperNode id
        self.exited: dict[str, int | None] = {}
        self.run_proc: Proc | None = None
        self.run_lines: list[str] = []
        self.timings: dict[str, float] = {}
        self.sites = None
        self.extra_sites: dict[int, tuple[str, str]] = {}  # node index -> (name, data dir): sites added later
        self._all: list[Proc] = []

    # ---------------------------------------------------------------- environment
    def env(self, flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = {**os.environ, **FLWR_ENV, "FLWR_HOME": str(flwr_home), MARK_ENV: self.mark,
               "FEDCOE_PROJECT_DIR": str(ROOT), "PYTHONUNBUFFERED": "1"}
        env.update(extra or {})
        return env

    def _spawn(self, name: str, cmd: list[str], env: Mapping[str, str], cwd: Path, log: Path) -> Proc:
        log.parent.mkdir(parents=True, exist_ok=True)
        fh = open(log, "ab")
        fh.write(f"\n$ {' '.join(cmd)}\n".encode())
        fh.flush()
        popen = subprocess.Popen(cmd, env=dict(env), cwd=cwd, stdout=fh, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
        fh.close()
        proc = Proc(name, popen, log)
        self._all.append(proc)
        return proc

    def _cli(self, args: list[str], timeout: float = 60.0) -> subprocess.CompletedProcess:
        return subprocess.run(["flwr", *args], env=self.env(self.flwr_home), cwd=ROOT, capture_output=True,
                              text=True, timeout=timeout, start_new_session=True)

    # ---------------------------------------------------------------- preparation
    def prepare_data(self) -> None:
        from .sites import export_sites

        t0 = time.time()
        if self.mode == "sites":
            self.sites = export_sites(self.cfg, self.workdir / "data")
            self.overrides["class_names"] = ",".join(self.sites.class_names)
            self.overrides["global_test_dir"] = str(self.sites.global_test)
        self.timings["data_s"] = round(time.time() - t0, 2)

    def make_certs(self) -> None:
        t0 = time.time()
        total = self.num_nodes + self.unregistered
        have = all((self.certs / "keys" / f"site-{i}").is_file() for i in range(total)) and \
            (self.certs / "server.pem").is_file()
        if not have:
            proc = subprocess.run(["bash", str(ROOT / "scripts" / "make_certs.sh"), str(self.certs), str(total)],
                                  capture_output=True, text=True, timeout=300)
            if proc.returncode != 0:
                raise DeploymentError(f"scripts/make_certs.sh failed:\n{proc.stdout}{proc.stderr}")
        self.timings["certs_s"] = round(time.time() - t0, 2)

    def key(self, index: int) -> Path:
        return self.certs / "keys" / f"site-{index}"

    # ---------------------------------------------------------------- SuperLink
    def start_superlink(self, timeout: float = 90.0) -> None:
        self.fleet_port, self.http_port = free_port(), free_port()
        while self.http_port == self.fleet_port:
            self.http_port = free_port()
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        cmd = ["flower-superlink", "--fleet-api-address", f"127.0.0.1:{self.fleet_port}",
               "--host", "127.0.0.1", "--port", str(self.http_port),
               "--disable-runtime-dependency-installation"]
        # state in memory (the default): with --database state.db, SQLite answered "database is
        # locked" under load here and the ServerApp's pull failed with HTTP 500
        if self.tls:
            cmd += ["--ssl-ca-certfile", str(self.certs / "ca.crt"), "--ssl-certfile", str(self.certs / "server.pem"),
                    "--ssl-keyfile", str(self.certs / "server.key"), "--enable-supernode-auth"]
        else:
            cmd += ["--insecure"]
        t0 = time.time()
        self.superlink = self._spawn("superlink", cmd, self.env(self.flwr_home), ROOT,
                                     self.workdir / "superlink" / "superlink.log")
        deadline = time.time() + timeout
        while not (port_open(self.http_port) and port_open(self.fleet_port)):
            if not self.superlink.alive():
                raise DeploymentError(f"the SuperLink exited with code {self.superlink.popen.returncode}:\n"
                                      f"{tail(self.superlink.log)}")
            if time.time() > deadline:
                raise DeploymentError(f"the SuperLink did not open its ports within {timeout:.0f}s:\n"
                                      f"{tail(self.superlink.log)}")
            time.sleep(0.3)
        self.timings["superlink_start_s"] = round(time.time() - t0, 2)
        self.write_connection()
        self.echo(f"[deploy] SuperLink up: Fleet gRPC 127.0.0.1:{self.fleet_port}, Control HTTP{'S' if self.tls else ''} "
                  f"127.0.0.1:{self.http_port} ({'TLS + SuperNode auth' if self.tls else 'insecure'}), "
                  f"log {self.superlink.log}")

    def write_connection(self) -> None:
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
                 f'address = "127.0.0.1:{self.http_port}"']
        lines.append(f'root-certificates = "{self.certs / "ca.crt"}"' if self.tls else "insecure = true")
        (self.flwr_home / "config.toml").write_text("\n".join(lines) + "\n")

    def register(self, index: int) -> int:
        """Register node ``index``'s public key; returns the SuperNode id."""
        res = self._cli(["supernode", "register", str(self.key(index)) + ".pub", CONNECTION,
                         "--name", self.site_name(index), "--format", "json"])
        out = res.stdout + res.stderr
        if res.returncode != 0:
            raise DeploymentError(f"flwr supernode register failed for {self.site_name(index)}:\n{out[-2000:]}")
        match = re.search(r'"node-id"\s*:\s*"?(\d+)', out) or re.search(r"(\d{6,})", out)
        node_id = int(match.group(1)) if match else -1
        self.node_ids[index] = node_id
        return node_id

    def register_all(self) -> None:
        """Register every node key (the `flwr` calls run side by side: each is a Python start-up)."""
        from concurrent.futures import ThreadPoolExecutor

        t0 = time.time()
        with ThreadPoolExecutor(max_workers=4) as pool:
            ids = list(pool.map(self.register, range(self.num_nodes)))
        for index, node_id in enumerate(ids):
            self.echo(f"[deploy] registered {self.key(index)}.pub as SuperNode {node_id} ({self.site_name(index)})")
        self.timings["register_s"] = round(time.time() - t0, 2)

    # ---------------------------------------------------------------- SuperNodes
    def site_name(self, index: int) -> str:
        n = self.cfg.num_clients
        if index in self.extra_sites:
            return self.extra_sites[index][0]
        if index >= self.num_nodes:
            return f"unregistered-{index - self.num_nodes}"
        return f"site-{index}" if index < n else f"coldstart-{index - n}"

    def node_dir(self, index: int) -> Path:
        return self.workdir / "nodes" / self.site_name(index)

    def state_dir(self, index: int) -> Path:
        return self.node_dir(index) / "state"

    def node_config(self, index: int) -> str:
        state = self.state_dir(index)
        parts: list[str]
        if index in self.extra_sites:  # a new site: its own folder, no site-id, onboarded when it joins
            name, data_dir = self.extra_sites[index]
            return (f'data-dir="{data_dir}" cold-start=true site-name="{name}" state-dir="{state}" '
                    f"torch-threads={self.torch_threads}")
        if index >= self.num_nodes:  # an unregistered node: any valid identity; it must never get in
            index = 0
        if self.mode == "sites":
            assert self.sites is not None, "prepare_data() first"
            parts = [self.sites.node_config(index)]
        else:
            parts = [f"partition-id={index} num-partitions={self.cfg.num_partitions}"]
        parts += [f'state-dir="{state}"', f"torch-threads={self.torch_threads}"]
        return " ".join(parts)

    def start_supernode(self, index: int) -> Proc:
        home = self.node_dir(index) / "home"
        home.mkdir(parents=True, exist_ok=True)
        self.state_dir(index).mkdir(parents=True, exist_ok=True)
        cmd = ["flower-supernode", "--superlink", f"127.0.0.1:{self.fleet_port}",
               "--host", "127.0.0.1", "--port", str(free_port()),
               "--node-config", self.node_config(index),
               "--max-retries", "10", "--max-wait-time", "120"]  # fail visibly instead of retrying forever (G6)
        if self.tls:
            cmd += ["--root-certificates", str(self.certs / "ca.crt"),
                    "--auth-supernode-private-key", str(self.key(index))]
        else:
            cmd += ["--insecure"]
        proc = self._spawn(self.site_name(index), cmd, self.env(home), self.node_dir(index),
                           self.node_dir(index) / "supernode.log")
        self.nodes[index] = proc
        return proc

    def stop_supernode(self, index: int, grace: float = 10.0) -> int | None:
        proc = self.nodes[index]
        rc = stop_group(proc.popen, grace)
        self.exited[f"{proc.name}@{proc.pid}"] = rc
        return rc

    def restart_supernode(self, index: int, timeout: float = 120.0) -> float:
        """Stop node ``index`` gracefully (SIGTERM to its process group: it deactivates at the
        SuperLink), start it again with the same key, node config and state folder, and wait
        until the SuperLink has activated it again. Returns the seconds it was away."""
        t0 = time.time()
        before = self.activated()
        self.stop_supernode(index)
        self.start_supernode(index)
        deadline = time.time() + timeout
        while self.activated() <= before:
            if not self.nodes[index].alive():
                raise DeploymentError(f"restarted SuperNode {self.site_name(index)} exited with code "
                                      f"{self.nodes[index].popen.returncode}:\n{tail(self.nodes[index].log)}")
            if time.time() > deadline:
                raise DeploymentError(f"restarted SuperNode {self.site_name(index)} was not activated within "
                                      f"{timeout:.0f}s")
            time.sleep(0.2)
        return time.time() - t0

    def activated(self) -> int:
        """How many SuperNode activations the SuperLink has logged so far."""
        if self.superlink is None:
            return 0
        try:
            return self.superlink.log.read_text(errors="replace").count("[Fleet.ActivateNode] Activated")
        except OSError:
            return 0

    def start_supernodes(self, timeout: float = 120.0) -> None:
        t0 = time.time()
        before = self.activated()
        for index in range(self.num_nodes + self.unregistered):
            self.start_supernode(index)
        deadline = time.time() + timeout
        while self.activated() - before < self.num_nodes and time.time() < deadline:
            dead = [p for i, p in self.nodes.items() if i < self.num_nodes and not p.alive()]
            if dead:
                raise DeploymentError(f"SuperNode {dead[0].name} exited with code {dead[0].popen.returncode}:\n"
                                      f"{tail(dead[0].log)}")
            time.sleep(0.5)
        self.timings["supernodes_online_s"] = round(time.time() - t0, 2)
        self.echo(f"[deploy] {self.activated() - before}/{self.num_nodes} SuperNodes online after "
                  f"{self.timings['supernodes_online_s']:.1f}s (logs in {self.workdir / 'nodes'})")

    def add_site(self, data_dir: str | os.PathLike, name: str | None = None, timeout: float = 120.0) -> int:
        """Start one more SuperNode later, as a new site (``data-dir=... cold-start=true``, no
        site-id) with its own key (made and registered now with TLS), and wait until the
        SuperLink has activated it. Returns its node index (``self.nodes``, ``self.node_ids``)."""
        index = max([self.num_nodes + self.unregistered - 1, *self.nodes, *self.extra_sites]) + 1
        self.extra_sites[index] = (name or f"new-site-{index}", str(Path(data_dir).resolve()))
        before = self.activated()
        if self.tls:
            if not self.key(index).is_file():
                proc = subprocess.run(["bash", str(ROOT / "scripts" / "make_certs.sh"), str(self.certs),
                                       str(index + 1)], capture_output=True, text=True, timeout=300)
                if proc.returncode != 0:
                    raise DeploymentError(f"scripts/make_certs.sh failed:\n{proc.stdout}{proc.stderr}")
            node_id = self.register(index)
            self.echo(f"[deploy] registered {self.key(index)}.pub as SuperNode {node_id} ({self.site_name(index)})")
        t0 = time.time()
        proc = self.start_supernode(index)
        while self.activated() <= before:
            if not proc.alive():
                raise DeploymentError(f"SuperNode {proc.name} exited with code {proc.popen.returncode}:\n"
                                      f"{tail(proc.log)}")
            if time.time() - t0 > timeout:
                raise DeploymentError(f"SuperNode {proc.name} was not activated within {timeout:.0f}s")
            time.sleep(0.2)
        self.timings[f"{self.site_name(index)}_online_s"] = round(time.time() - t0, 2)
        self.echo(f"[deploy] new site {self.site_name(index)} online after {time.time() - t0:.1f}s "
                  f"(data {data_dir}, log {proc.log})")
        return index

    def onboarded_model(self, index: int) -> Path:
        """Where the ClientApp of an added site saves its routed model for this run."""
        from ..client import _safe

        name = self.site_name(index)
        return self.state_dir(index) / _safe(self.run_name) / f"{_safe(name)}.onboarded.pt"

    def wait_refused(self, timeout: float = 90.0) -> dict[int, int | None]:
        """Exit codes of the unregistered nodes (None: still running at the deadline)."""
        deadline = time.time() + timeout
        idx = list(range(self.num_nodes, self.num_nodes + self.unregistered))
        while time.time() < deadline and any(self.nodes[i].alive() for i in idx):
            time.sleep(0.5)
        return {i: self.nodes[i].popen.poll() for i in idx}

    # ---------------------------------------------------------------- the run
    def run_config(self, **extra: Any) -> dict[str, Any]:
        return {"config": self.config_path, **self.overrides, **extra}

    def write_run_config(self, values: Mapping[str, Any]) -> Path:
        path = self.workdir / "run-config.toml"
        path.write_text("".join(f"{k} = {toml_value(v)}\n" for k, v in values.items()))
        return path

    def start_run(self, **extra: Any) -> Proc:
        values = self.run_config(**extra)
        path = self.write_run_config(values)
        cmd = ["flwr", "run", str(ROOT), CONNECTION, "--run-config", str(path), "--stream"]
        self.timings["run_started"] = time.time()
        popen = subprocess.Popen(cmd, env=self.env(self.flwr_home), cwd=ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, text=True, bufsize=1,
                                 start_new_session=True)
        log = self.workdir / "flwr-run.log"
        self.run_proc = Proc("flwr-run", popen, log)
        self._all.append(self.run_proc)

        def pump() -> None:
            with open(log, "a") as fh:
                for line in popen.stdout:  # type: ignore[union-attr]
                    line = line.rstrip("\n")
                    self.run_lines.append(line)
                    fh.write(line + "\n")
                    fh.flush()
                    self.echo(f"[run] {line}")

        threading.Thread(target=pump, daemon=True).start()
        return self.run_proc

    def wait_run(self, timeout: float) -> int:
        assert self.run_proc is not None
        try:
            rc = self.run_proc.popen.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise DeploymentError(f"flwr run did not finish within {timeout:.0f}s; log {self.run_proc.log}") from None
        time.sleep(0.2)  # let the pump thread drain the pipe
        self.timings["run_s"] = round(time.time() - self.timings["run_started"], 2)
        return rc

    def round_times(self) -> list[float]:
        """Train-phase seconds per round as the strategy logs them ('[round N] ... (X.Xs)')."""
        out = []
        for line in self.run_lines:
            m = re.search(r"\[round (\d+)\] train_loss=\S+ replies=\S+ \(([\d.]+)s\)", line)
            if m:
                out.append(float(m.group(2)))
        return out

    @property
    def results_dir(self) -> Path:
        from ..server import absolute_paths

        return Path(absolute_paths(self.cfg, ROOT).results_dir) / self.run_name

    @property
    def run_name(self) -> str:
        return str(self.overrides.get("run_name") or self.cfg.resolved_run_name)

    # ---------------------------------------------------------------- teardown
    def stop_all(self) -> list[int]:
        """Stop everything this deployment started; returns PIDs that had to be swept
        (processes outside the process groups: detached SuperExecs, orphaned ClientApps)."""
        for proc in reversed(self._all):
            if proc.alive() or proc.name != "flwr-run":
                rc = stop_group(proc.popen, grace=3.0 if proc is not self.superlink else 5.0)
                self.exited.setdefault(f"{proc.name}@{proc.pid}", rc)
        swept = []
        for _ in range(3):
            left = marked_processes(self.mark)
            if not left:
                break
            for pid in left:
                try:
                    os.kill(pid, signal.SIGKILL)
                    swept.append(pid)
                except ProcessLookupError:
                    pass
            time.sleep(0.3)
        return sorted(set(swept))

    def __enter__(self) -> "LocalDeployment":
        return self

    def __exit__(self, *exc: Any) -> None:
        swept = self.stop_all()
        if swept:
            self.echo(f"[deploy] swept {len(swept)} leftover process(es): {swept}")
        self.echo("[deploy] all processes stopped")

    def report(self, rc: int | None = None, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        report = {"run_name": self.run_name, "results": str(self.results_dir), "tls": self.tls, "mode": self.mode,
                  "nodes": self.num_nodes, "unregistered": self.unregistered, "flwr_run_rc": rc,
                  "fleet_port": self.fleet_port, "http_port": self.http_port, "node_ids": self.node_ids,
                  "timings": {k: v for k, v in self.timings.items() if k != "run_started"},
                  "train_phase_s": self.round_times(), "exit_codes": self.exited, **dict(extra or {})}
        (self.workdir / "deployment.json").write_text(json.dumps(report, indent=1, default=str))
        return report


def metrics_lines(results: Path) -> list[dict[str, Any]]:
    path = results / "metrics.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines()] if path.is_file() else []


def run_status(results: Path) -> str:
    """'finished', 'failed: ...', 'running' (from summary.json) or 'no summary'."""
    try:
        return str(json.loads((results / "summary.json").read_text())["status"])
    except (OSError, ValueError, KeyError):
        return "no summary"


# ------------------------------------------------------------------ command line
def _raise_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    from ..simulate import parse_overrides

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=3, help="SuperNodes (training + cold-start sites)")
    parser.add_argument("--coldstart", type=int, default=None, help="cold-start sites among them (default 1)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--config", default="configs/smoke.yaml")
    parser.add_argument("--algorithm", default=None)
    parser.add_argument("--tls", action="store_true", help="TLS + SuperNode authentication (else --insecure)")
    parser.add_argument("--certs", default=None, help="use this certs folder (made by scripts/make_certs.sh)")
    parser.add_argument("--mode", choices=("sites", "partitions"), default="sites",
                        help="sites: each node gets its own image folder (data-dir); partitions: "
                             "partition-id/num-partitions over the shared data set (research mode)")
    parser.add_argument("--unregistered", type=int, default=0,
                        help="also start this many SuperNodes with keys that are NOT registered (needs --tls)")
    parser.add_argument("--run-name", default=None)
    parser.add_argument("--workdir", default=None, help="run folder (default .deploy/<run-name>)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds for the whole flwr run")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch threads per ClientApp")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more run-config overrides")
    parser.add_argument("--serve-from", default=None, metavar="RUN_DIR",
                        help="serving mode: no training; onboard new sites from this finished run "
                             "(results/<run> or a checkpoint file)")
    parser.add_argument("--onboard-dir", action="append", default=[], metavar="DIR",
                        help="serving mode: start one new-site SuperNode per image folder (repeatable)")
    parser.add_argument("--serve-timeout", type=float, default=600.0, help="serving mode: seconds to serve")
    args = parser.parse_args(argv)
    if args.unregistered and not args.tls:
        parser.error("--unregistered needs --tls (node authentication only exists with TLS)")
    if args.onboard_dir and not args.serve_from:
        parser.error("--onboard-dir needs --serve-from")
    if args.serve_from:
        signal.signal(signal.SIGTERM, _raise_on_sigterm)
        return serve_main(args)

    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    run_name = args.run_name or f"deploy-{time.strftime('%Y%m%d-%H%M%S')}"
    overrides: dict[str, Any] = {"num_rounds": args.rounds, "run_name": run_name, "wait_for_nodes": 120.0,
                                 **parse_overrides(args.set)}
    if args.algorithm:
        overrides["algorithm"] = args.algorithm
    workdir = Path(args.workdir or ROOT / ".deploy" / run_name)
    started = time.time()
    rc: int | None = None
    dep = LocalDeployment(workdir, args.nodes, args.tls, args.config, overrides, args.coldstart, args.mode,
                          args.unregistered, args.torch_threads, args.certs)
    try:
        with dep:
            print(f"[deploy] run folder {dep.workdir}; {dep.cfg.num_clients} training + "
                  f"{dep.cfg.num_coldstart_clients} cold-start SuperNodes, {args.rounds} rounds, mode {args.mode}")
            dep.prepare_data()
            if args.tls:
                dep.make_certs()
            dep.start_superlink()
            if args.tls:
                dep.register_all()
            dep.start_supernodes()
            if args.unregistered:
                for i, code in dep.wait_refused().items():
                    print(f"[deploy] unregistered SuperNode {dep.site_name(i)} exited with code {code}: "
                          f"{tail(dep.nodes[i].log, 3)}")
            dep.start_run()
            rc = dep.wait_run(args.timeout)
    except KeyboardInterrupt:
        print("[deploy] interrupted: stopped every process")
        rc = 130
    except DeploymentError as err:
        print(f"[deploy] failed: {err}", file=sys.stderr)
        rc = 1
    finally:
        report = dep.report(rc, {"total_s": round(time.time() - started, 2)})
    lines = metrics_lines(dep.results_dir)
    status = run_status(dep.results_dir)
    print(f"[deploy] run status: {status}")
    if lines:
        last = lines[-1]
        print(f"[deploy] results in {dep.results_dir}: round {last['round']} global={last.get('global_accuracy')} "
              f"personalised={last.get('personalized_accuracy')} cold-start={last.get('coldstart_accuracy')}")
    print(f"[deploy] train phases {report['train_phase_s']} s; flwr run {report['timings'].get('run_s')} s; "
          f"total {report['total_s']} s; report {dep.workdir / 'deployment.json'}")
    # `flwr run --stream` exits 0 even when the ServerApp failed: judge by the run's summary
    return 0 if rc == 0 and status == "finished" else (rc or 1)


def serve_main(args: argparse.Namespace) -> int:
    """SuperLink + the serving-mode run from a finished run's checkpoint + one new-site SuperNode
    per --onboard-dir; prints the registry lines and the local prediction command."""
    from ..onboard import load_checkpoint, read_registry

    payload, ckpt, run_dir = load_checkpoint(Path(args.serve_from).resolve())
    run_name = str(payload["config"].get("run_name") or run_dir.name)
    dirs = [Path(d).resolve() for d in args.onboard_dir]
    overrides = {"run_name": run_name, "serve_from": str(ckpt), "serve_timeout": args.serve_timeout,
                 "serve_max_nodes": len(dirs)}
    workdir = Path(args.workdir or ROOT / ".deploy" / f"serve-{run_name}-{time.strftime('%Y%m%d-%H%M%S')}")
    dep = LocalDeployment(workdir, max(1, len(dirs)), args.tls, args.config, overrides, 0, "sites", 0,
                          args.torch_threads, args.certs)
    started, rc = time.time(), None
    before = len(read_registry(run_dir))
    added: list[int] = []
    try:
        with dep:
            print(f"[deploy] serving mode: onboarding new sites from {ckpt} (run {run_name}); run folder {dep.workdir}")
            if args.tls:
                dep.make_certs()
            dep.start_superlink()
            dep.start_run()
            for d in dirs:
                added.append(dep.add_site(d, name=d.name))
            if not dirs:
                print(f"[deploy] serving for {args.serve_timeout:.0f}s; start new sites with flower-supernode "
                      f"--superlink 127.0.0.1:{dep.fleet_port} ... --node-config 'data-dir=\"/path\" cold-start=true'")
            rc = dep.wait_run(args.serve_timeout + 120)
    except KeyboardInterrupt:
        print("[deploy] interrupted: stopped every process")
        rc = 130
    except DeploymentError as err:
        print(f"[deploy] failed: {err}", file=sys.stderr)
        rc = 1
    finally:
        dep.report(rc, {"total_s": round(time.time() - started, 2), "serve_from": str(ckpt)})
    entries = read_registry(run_dir)[before:]
    for entry in entries:
        acc = entry.get("metrics", {}).get("coldstart_accuracy")
        print(f"[deploy] onboarded node {entry['node_id']}: status {entry['status']}, routing row "
              f"{entry.get('routing_row')}, cold-start accuracy {acc}, round trip {entry.get('round_trip_s')} s")
    print(f"[deploy] registry {run_dir / 'onboarding.jsonl'}")
    for index in added:
        model = dep.onboarded_model(index)
        print(f"[deploy] {dep.site_name(index)}: model {model} ({'saved' if model.is_file() else 'MISSING'}); "
              f"python -m fedcoe_flwr.predict --model {model} --images {dep.extra_sites[index][1]}")
    ok = rc == 0 and len([e for e in entries if e["status"] == "onboarded"]) >= len(dirs)
    return 0 if ok else (rc or 1)


if __name__ == "__main__":
    sys.exit(main())
