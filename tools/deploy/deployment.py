"""A real Flower deployment on this machine's loopback, as processes: a SuperLink with its
state in SQLite (``--database``), SuperNodes with their own data, state and FLWR_HOME, and
the `flwr` CLI that registers keys and starts runs. It observes the deployment through
structured output only: `flwr ... --format json` for Flower's view (node status, run
status) and the ServerApp's results folder (``rounds.jsonl``, ``metrics.jsonl``,
``summary.json``) for the run's progress.

Everything lives in a run folder: certs/, data/, superlink/ (FLWR_HOME with the CLI
connection, state.db, log), nodes/<site>/ (FLWR_HOME, state/, log), run-config.toml,
flwr-run.log and deployment.json (ports, timings, exit codes). Every process started is
stopped by PID or process group when the deployment is left (``with LocalDeployment(...)``)."""

from __future__ import annotations

import json
import os
import subprocess
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Callable, Mapping

from flwr.app import Context, RecordDict

from fedcoe_flwr.client.node import node_role
from fedcoe_flwr.client.onboarding import onboarded_model_path
from fedcoe_flwr.config import config_from_run_config

from .flower import FlowerCli, FlowerCliError, flower_env
from .processes import MARK_ENV, Proc, free_port, kill_tree, port_open, spawn, stop_group, sweep, tail
from .results import format_metrics, metrics_lines, round_lines, rounds_done, run_status
from .sites import SiteFolders, export_sites, format_node_config

ROOT = Path(__file__).resolve().parents[2]
FLWR_ENV = {"FLWR_TELEMETRY_ENABLED": "0", "FLWR_DISABLE_UPDATE_CHECK": "1",
            "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1"}
CONNECTION = "fedcoe-local"
# How long a SuperNode keeps retrying one call to an unreachable SuperLink before it exits
# with an error: long enough to ride out a SuperLink restart, short enough to fail visibly
# when the address or the certificate is wrong (a TLS handshake failure exits at once).
SUPERNODE_MAX_WAIT_S = 300
# The SuperNodes (and the ClientApps they start, which do the training) run at a lower CPU
# priority than the SuperLink and the ServerApp: on one host, a SuperLink starved of CPU holds
# its SQLite write lock longer, and past Flower's 5 s busy timeout a request fails with
# "database is locked" (docs/DEPLOYMENT.md, pitfalls).
SUPERNODE_NICENESS = 10
POLL_S = 2.0  # between two `flwr supernode list` calls (each is a Python start-up and a SuperLink query)
# between two `flwr ls` calls while the ServerApp still runs: they only catch a run that ended
# without writing summary.json (a crash), and each is ~2 s of CPU and a SuperLink database write
STATUS_POLL_S = 60.0
CLI_ATTEMPTS = 3  # a `flwr` query that fails this many times in a row ends the wait


class DeploymentError(RuntimeError):
    """A component did not start or the run failed; the message names the log to read."""


def toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        return repr(value)
    return json.dumps(str(value))  # a TOML basic string


class LocalDeployment:
    """SuperLink + SuperNodes as real processes on 127.0.0.1. Use as a context manager:
    leaving the block stops everything it started."""

    def __init__(self, workdir: str | os.PathLike, num_nodes: int = 3, tls: bool = True,
                 config: str = "configs/smoke.yaml", overrides: Mapping[str, Any] | None = None,
                 num_coldstart: int | None = None, mode: str = "sites", unregistered: int = 0,
                 torch_threads: int = 1, certs: str | os.PathLike | None = None,
                 echo: Callable[[str], None] = print):
        if num_nodes < 1:
            raise ValueError(f"--nodes must be >= 1, got {num_nodes}")
        if mode not in ("sites", "partitions"):
            raise ValueError(f"mode must be 'sites' or 'partitions', got {mode!r}")
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
        self.database = self.workdir / "superlink" / "state.db"
        self.flower = FlowerCli(CONNECTION, self.env(self.flwr_home), ROOT)
        self.fleet_port = self.http_port = 0
        self.superlink: Proc | None = None
        self.nodes: dict[int, Proc] = {}
        self.node_ids: dict[int, int] = {}  # node index -> SuperNode id given at registration
        self.exited: dict[str, int | None] = {}
        self.run_id: int | None = None
        self.run_lines: list[str] = []  # the ServerApp's log of the last run, once it has ended
        self._echoed = {"rounds.jsonl": 0, "metrics.jsonl": 0}  # result lines already echoed
        self.timings: dict[str, float] = {}
        self.sites: SiteFolders | None = None
        self.extra_sites: dict[int, tuple[str, str]] = {}  # node index -> (name, data dir): sites added later
        self._all: list[Proc] = []

    # ---------------------------------------------------------------- environment
    def env(self, flwr_home: Path, extra: Mapping[str, str] | None = None) -> dict[str, str]:
        env = {**os.environ, **FLWR_ENV, "FLWR_HOME": str(flwr_home), MARK_ENV: self.mark,
               "FEDCOE_PROJECT_DIR": str(ROOT), "PYTHONUNBUFFERED": "1"}
        env.update(extra or {})
        return flower_env(env)

    def _spawn(self, name: str, cmd: list[str], env: Mapping[str, str], cwd: Path, log: Path) -> Proc:
        proc = spawn(name, cmd, env, cwd, log)
        self._all.append(proc)
        return proc

    # ---------------------------------------------------------------- preparation
    def prepare_data(self) -> None:
        t0 = time.time()
        if self.mode == "sites":
            self.sites = export_sites(self.cfg, self.workdir / "data")
            self.overrides["class_names"] = ",".join(self.sites.class_names)
            self.overrides["global_test_dir"] = str(self.sites.global_test)
        self.timings["data_s"] = round(time.time() - t0, 2)

    def _run_make_certs(self, num_keys: int) -> None:
        proc = subprocess.run(["bash", str(ROOT / "scripts" / "make_certs.sh"), str(self.certs), str(num_keys)],
                              capture_output=True, text=True, timeout=300)
        if proc.returncode != 0:
            raise DeploymentError(f"scripts/make_certs.sh failed:\n{proc.stdout}{proc.stderr}")

    def make_certs(self) -> None:
        t0 = time.time()
        total = self.num_nodes + self.unregistered
        if not (all(self.key(i).is_file() for i in range(total)) and (self.certs / "server.pem").is_file()):
            self._run_make_certs(total)
        self.timings["certs_s"] = round(time.time() - t0, 2)

    def key(self, index: int) -> Path:
        return self.certs / "keys" / f"site-{index}"

    # ---------------------------------------------------------------- SuperLink
    def superlink_command(self) -> list[str]:
        cmd = ["flower-superlink", "--fleet-api-address", f"127.0.0.1:{self.fleet_port}",
               "--host", "127.0.0.1", "--port", str(self.http_port),
               "--database", str(self.database),  # registrations, runs and messages survive a restart
               "--disable-runtime-dependency-installation"]
        if self.tls:
            cmd += ["--ssl-ca-certfile", str(self.certs / "ca.crt"), "--ssl-certfile", str(self.certs / "server.pem"),
                    "--ssl-keyfile", str(self.certs / "server.key"), "--enable-supernode-auth"]
        else:
            cmd += ["--insecure"]
        return cmd

    def start_superlink(self, timeout: float = 90.0) -> float:
        """Start the SuperLink (on the ports it had, when it is started again) and wait until
        both its ports answer; returns the seconds that took."""
        if not self.fleet_port:
            self.fleet_port, self.http_port = free_port(), free_port()
            while self.http_port == self.fleet_port:
                self.http_port = free_port()
        self.flwr_home.mkdir(parents=True, exist_ok=True)
        t0 = time.time()
        self.superlink = self._spawn("superlink", self.superlink_command(), self.env(self.flwr_home), ROOT,
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
        took = round(time.time() - t0, 2)
        self.timings.setdefault("superlink_start_s", took)
        self.write_connection()
        self.echo(f"[deploy] SuperLink up: Fleet gRPC 127.0.0.1:{self.fleet_port}, Control HTTP{'S' if self.tls else ''} "
                  f"127.0.0.1:{self.http_port} ({'TLS + SuperNode auth' if self.tls else 'insecure'}), "
                  f"state {self.database}, log {self.superlink.log}")
        return took

    def kill_superlink(self) -> list[int]:
        """SIGKILL the SuperLink and everything below it (its SuperExec, the ServerApp) at
        once, as a crash of its host would. The SuperNodes are left running."""
        assert self.superlink is not None
        pids = kill_tree(self.superlink.popen)
        self.exited[f"superlink@{self.superlink.pid}"] = self.superlink.popen.returncode
        self.echo(f"[deploy] SuperLink killed (SIGKILL to PIDs {pids})")
        return pids

    def write_connection(self) -> None:
        lines = ["[superlink]", f'default = "{CONNECTION}"', "", f"[superlink.{CONNECTION}]",
                 f'address = "127.0.0.1:{self.http_port}"']
        lines.append(f'root-certificates = "{self.certs / "ca.crt"}"' if self.tls else "insecure = true")
        (self.flwr_home / "config.toml").write_text("\n".join(lines) + "\n")

    def register(self, index: int) -> int:
        """Register node ``index``'s public key; returns the SuperNode id."""
        try:
            node_id = self.flower.register(Path(f"{self.key(index)}.pub"), self.site_name(index))
        except FlowerCliError as err:
            raise DeploymentError(f"registering {self.site_name(index)} failed: {err}") from None
        self.node_ids[index] = node_id
        return node_id

    def register_all(self) -> None:
        """Register every node key (the `flwr` calls run side by side: each is a Python start-up)."""
        t0 = time.time()
        with ThreadPoolExecutor(max_workers=4) as pool:
            ids = list(pool.map(self.register, range(self.num_nodes)))
        for index, node_id in enumerate(ids):
            self.echo(f"[deploy] registered {self.key(index)}.pub as SuperNode {node_id} ({self.site_name(index)})")
        self.timings["register_s"] = round(time.time() - t0, 2)

    # ---------------------------------------------------------------- Flower's view of the nodes
    def node_status(self) -> dict[int, dict[str, Any]]:
        """`flwr supernode list --format json`, by node id."""
        try:
            return self.flower.nodes()
        except FlowerCliError as err:
            raise DeploymentError(f"cannot list the SuperNodes: {err}") from None

    def wait_online(self, count: int, since: Mapping[int, str] | None = None, timeout: float = 120.0,
                    watch: Mapping[int, Proc] | None = None) -> dict[int, dict[str, Any]]:
        """Wait until at least ``count`` nodes are online and every node named in ``since``
        (node id -> its `online-at` before) is online with another activation time: it came
        (back) online. Stops early when a process in ``watch`` exits. Returns the node list."""
        deadline = time.time() + timeout
        since = dict(since or {})
        refused = 0
        shown = None
        while True:
            try:
                nodes, refused = self.node_status(), 0
            except DeploymentError as err:  # e.g. "database is locked" on a loaded SuperLink
                refused += 1
                if refused >= CLI_ATTEMPTS or time.time() > deadline:
                    raise
                self.echo(f"[deploy] {err}; asking again")
                time.sleep(POLL_S)
                continue
            online = [i for i, n in nodes.items() if n["status"] == "online"]
            back = all(i in online and nodes[i]["online-at"] != before for i, before in since.items())
            status = (len(online), tuple(sorted(online)))
            if status != shown or len(online) < count:  # who is connected, and how long we still wait
                self.echo(f"[deploy] {len(online)}/{count} SuperNodes online {sorted(online)}"
                          + ("" if len(online) >= count and back else
                             f"; waiting up to {max(0, deadline - time.time()):.0f}s more"))
                shown = status
            if len(online) >= count and back:
                return nodes
            for proc in (watch or {}).values():
                if not proc.alive():
                    raise DeploymentError(f"SuperNode {proc.name} exited with code {proc.popen.returncode}:\n"
                                          f"{tail(proc.log)}")
            if time.time() > deadline:
                raise DeploymentError(f"{len(online)}/{count} SuperNodes online after {timeout:.0f}s: "
                                      f"{ {i: n['status'] for i, n in nodes.items()} } (logs in {self.workdir / 'nodes'})")
            time.sleep(POLL_S)

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

    def node_config_values(self, index: int) -> dict[str, Any]:
        common = {"state-dir": str(self.state_dir(index)), "torch-threads": self.torch_threads}
        if index in self.extra_sites:  # a new site: its own folder, no site-id, onboarded when it joins
            name, data_dir = self.extra_sites[index]
            return {"data-dir": data_dir, "cold-start": True, "site-name": name, **common}
        if index >= self.num_nodes:  # an unregistered node: any valid identity; it must never get in
            index = 0
        if self.mode == "sites":
            assert self.sites is not None, "prepare_data() first"
            return {**self.sites.node_config_values(index), **common}
        return {"partition-id": index, "num-partitions": self.cfg.num_partitions, **common}

    def supernode_command(self, index: int) -> list[str]:
        cmd = ["nice", "-n", str(SUPERNODE_NICENESS), "flower-supernode", "--superlink", f"127.0.0.1:{self.fleet_port}",
               "--host", "127.0.0.1", "--port", str(free_port()),
               "--node-config", format_node_config(self.node_config_values(index)),
               "--max-wait-time", str(SUPERNODE_MAX_WAIT_S)]
        if self.tls:
            cmd += ["--root-certificates", str(self.certs / "ca.crt"),
                    "--auth-supernode-private-key", str(self.key(index))]
        else:
            cmd += ["--insecure"]
        return cmd

    def start_supernode(self, index: int) -> Proc:
        home = self.node_dir(index) / "home"
        home.mkdir(parents=True, exist_ok=True)
        self.state_dir(index).mkdir(parents=True, exist_ok=True)
        proc = self._spawn(self.site_name(index), self.supernode_command(index), self.env(home), self.node_dir(index),
                           self.node_dir(index) / "supernode.log")
        self.nodes[index] = proc
        return proc

    def stop_supernode(self, index: int, grace: float = 10.0) -> int | None:
        proc = self.nodes[index]
        rc = stop_group(proc.popen, grace)
        self.exited[f"{proc.name}@{proc.pid}"] = rc
        return rc

    def stop_supernodes(self, indices: list[int], grace: float = 10.0) -> dict[int, int | None]:
        """Stop these nodes as ``stop_supernode`` does, side by side (each takes seconds to leave)."""
        with ThreadPoolExecutor(max_workers=max(1, len(indices))) as pool:
            return dict(zip(indices, pool.map(lambda i: self.stop_supernode(i, grace), indices)))

    def restart_supernode(self, index: int, timeout: float = 120.0) -> tuple[float, float]:
        """Stop node ``index`` gracefully (SIGTERM to its process group: it deactivates at the
        SuperLink), start it again with the same key, node config and state folder, and wait
        until Flower lists it online again. Returns (the seconds it was away, the time the old
        process group was gone)."""
        node_id = self.node_ids[index]
        before = self.node_status()[node_id]["online-at"]
        t0 = time.time()
        self.stop_supernode(index)
        stopped_at = time.time()
        self.start_supernode(index)
        self.wait_online(0, since={node_id: before}, timeout=timeout, watch={index: self.nodes[index]})
        return time.time() - t0, stopped_at

    def start_supernodes(self, timeout: float = 120.0) -> None:
        t0 = time.time()
        for index in range(self.num_nodes + self.unregistered):
            self.start_supernode(index)
        self.wait_online(self.num_nodes, timeout=timeout,
                         watch={i: p for i, p in self.nodes.items() if i < self.num_nodes})
        self.timings["supernodes_online_s"] = round(time.time() - t0, 2)
        self.echo(f"[deploy] {self.num_nodes} SuperNodes online after {self.timings['supernodes_online_s']:.1f}s "
                  f"(logs in {self.workdir / 'nodes'})")

    def add_site(self, data_dir: str | os.PathLike, name: str | None = None, timeout: float = 120.0) -> int:
        """Start one more SuperNode later, as a new site (``data-dir=... cold-start=true``, no
        site-id) with its own key (made and registered now with TLS), and wait until Flower
        lists it online. Returns its node index (``self.nodes``, ``self.node_ids``)."""
        index = max([self.num_nodes + self.unregistered - 1, *self.nodes, *self.extra_sites]) + 1
        self.extra_sites[index] = (name or f"new-site-{index}", str(Path(data_dir).resolve()))
        since: dict[int, str] = {}
        if self.tls:
            if not self.key(index).is_file():
                self._run_make_certs(index + 1)
            node_id = self.register(index)
            since[node_id] = "N/A"  # a key registered just now has never been online
            self.echo(f"[deploy] registered {self.key(index)}.pub as SuperNode {node_id} ({self.site_name(index)})")
        else:  # without node auth there is no id to wait for: one more node online
            online_before = sum(n["status"] == "online" for n in self.node_status().values())
        t0 = time.time()
        proc = self.start_supernode(index)
        self.wait_online(0 if since else online_before + 1, since=since, timeout=timeout, watch={index: proc})
        self.timings[f"{self.site_name(index)}_online_s"] = round(time.time() - t0, 2)
        self.echo(f"[deploy] new site {self.site_name(index)} online after {time.time() - t0:.1f}s "
                  f"(data {data_dir}, log {proc.log})")
        return index

    def onboarded_model(self, index: int) -> Path:
        """Where the ClientApp of an added site saves its routed model for this run."""
        context = Context(run_id=0, node_id=0, node_config=self.node_config_values(index), state=RecordDict(),
                          run_config={})
        return onboarded_model_path(node_role(context), self.run_name)

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

    def start_run(self, **extra: Any) -> int:
        """`flwr run` (the run id from the CLI's JSON); returns the run id. The run's log is
        not streamed while it runs: a log stream is a SuperLink database write twice a second,
        and SQLite contention is what breaks a loaded SuperLink (docs/DEPLOYMENT.md)."""
        path = self.write_run_config(self.run_config(**extra))
        self.timings["run_started"] = time.time()
        self._echoed = {"rounds.jsonl": len(round_lines(self.results_dir)),
                        "metrics.jsonl": len(metrics_lines(self.results_dir))}
        try:
            self.run_id = self.flower.start_run(ROOT, path)
        except FlowerCliError as err:
            raise DeploymentError(f"flwr run failed: {err}") from None
        self.run_lines = []
        self.echo(f"[deploy] run {self.run_id} started ({path}); follow its log with: FLWR_HOME={self.flwr_home} "
                  f"flwr log {self.run_id} {CONNECTION} --stream")
        return self.run_id

    def run_status(self) -> str:
        """The run's status as Flower reports it (`running`, `finished:completed`, ...)."""
        assert self.run_id is not None, "start_run() first"
        try:
            return str(self.flower.run(self.run_id)["status"])
        except FlowerCliError as err:
            raise DeploymentError(f"cannot read the status of run {self.run_id}: {err}") from None

    def _echo_progress(self) -> None:
        """Echo the rounds and evaluations the ServerApp has recorded since the last call."""
        for name, lines in (("rounds.jsonl", round_lines(self.results_dir)),
                            ("metrics.jsonl", metrics_lines(self.results_dir))):
            for line in lines[self._echoed[name]:]:
                if name == "rounds.jsonl":
                    self.echo(f"[round {line['round']}] train_loss={line['train_loss']:.4f} "
                              f"replies={line['replies']}/{line['clients']} ({line['time_s']:.1f}s)")
                else:
                    self.echo(f"[round {line['round']}] {format_metrics(line)}")
            self._echoed[name] = len(lines)

    def _follow(self, done: Callable[[], bool] | None, what: str, timeout: float) -> str:
        """Echo progress until ``done()`` (None: until the run ends). Flower is asked for the
        run's status (`flwr ls`, a Python start-up each time) every STATUS_POLL_S seconds, and
        every few seconds once summary.json says the ServerApp has stopped. Returns the last
        status seen; raises when the run ends (or ``timeout`` passes) first."""
        deadline, asked, status, refused = time.time() + timeout, 0.0, "unknown", 0
        while True:
            self._echo_progress()
            if done is not None and done():
                return status
            server_stopped = run_status(self.results_dir) not in ("running", "no summary")
            if time.time() - asked >= (3.0 if server_stopped else STATUS_POLL_S):
                asked = time.time()
                try:
                    status, refused = self.run_status(), 0
                except DeploymentError as err:  # e.g. "database is locked" on a loaded SuperLink
                    refused += 1
                    if refused >= CLI_ATTEMPTS:
                        raise
                    self.echo(f"[deploy] {err}; asking again")
                    continue
                if status.startswith("finished"):
                    self._echo_progress()
                    if done is None or done():
                        return status
                    raise DeploymentError(f"run {self.run_id} ended ({status}) before {what}; "
                                          f"summary.json says {run_status(self.results_dir)}")
            if time.time() > deadline:
                raise DeploymentError(f"no {what} within {timeout:.0f}s (run {self.run_id} is {status})")
            time.sleep(0.5)

    def wait_run(self, timeout: float) -> str:
        """Wait until the run ends, then save its ServerApp log (``fetch_log``). Returns its
        status as Flower reports it (`finished:completed`, `finished:failed`, ...)."""
        status = self._follow(None, "end of the run", timeout)
        self.timings["run_s"] = round(time.time() - self.timings["run_started"], 2)
        self.fetch_log()
        return status

    def wait_until(self, done: Callable[[], bool], what: str, timeout: float) -> None:
        """Wait, while the run goes on, until ``done()`` (e.g. a round in rounds.jsonl)."""
        self._follow(done, what, timeout)

    def wait_rounds(self, count: int, timeout: float) -> None:
        """Wait until the server has aggregated ``count`` training rounds (rounds.jsonl)."""
        self.wait_until(lambda: rounds_done(self.results_dir) >= count, f"round {count}", timeout)

    def fetch_log(self) -> list[str]:
        """The ServerApp's log of the run (``flwr log``, once the run has ended), appended to
        flwr-run.log; also kept in ``run_lines``."""
        assert self.run_id is not None, "start_run() first"
        res = subprocess.run(self.flower.log_command(self.run_id), env=self.env(self.flwr_home), cwd=ROOT,
                             capture_output=True, text=True, timeout=120, start_new_session=True)
        self.run_lines = (res.stdout + res.stderr).splitlines()
        with open(self.workdir / "flwr-run.log", "a") as fh:
            fh.write(f"# run {self.run_id}\n" + "\n".join(self.run_lines) + "\n")
        return self.run_lines

    @property
    def results_dir(self) -> Path:
        """Where the ServerApp writes this run (relative results_dir: under the project root,
        the FEDCOE_PROJECT_DIR the SuperLink runs with)."""
        base = Path(os.path.expanduser(self.cfg.results_dir))
        return (base if base.is_absolute() else ROOT / base) / self.run_name

    @property
    def run_name(self) -> str:
        return str(self.overrides.get("run_name") or self.cfg.resolved_run_name)

    # ---------------------------------------------------------------- teardown
    def stop_all(self) -> list[int]:
        """Stop everything this deployment started; returns PIDs that had to be swept
        (processes outside the process groups: detached SuperExecs, orphaned ClientApps)."""
        def stop(proc: Proc) -> None:  # a leader that exited may have left its group behind
            rc = stop_group(proc.popen, grace=3.0 if proc is not self.superlink else 5.0)
            self.exited.setdefault(f"{proc.name}@{proc.pid}", rc)

        links = [p for p in self._all if p.name == "superlink"]
        others = [p for p in self._all if p.name != "superlink"]
        for batch in (others, links):  # the SuperNodes side by side (seconds each), then the SuperLink
            if batch:
                with ThreadPoolExecutor(max_workers=len(batch)) as pool:
                    list(pool.map(stop, batch))
        return sweep(self.mark)

    def __enter__(self) -> "LocalDeployment":
        return self

    def __exit__(self, *exc: Any) -> None:
        swept = self.stop_all()
        if swept:
            self.echo(f"[deploy] swept {len(swept)} leftover process(es): {swept}")
        self.echo("[deploy] all processes stopped")

    def report(self, status: str | None = None, extra: Mapping[str, Any] | None = None) -> dict[str, Any]:
        report = {"run_name": self.run_name, "run_id": self.run_id, "results": str(self.results_dir),
                  "tls": self.tls, "mode": self.mode, "nodes": self.num_nodes, "unregistered": self.unregistered,
                  "flower_run_status": status, "database": str(self.database),
                  "fleet_port": self.fleet_port, "http_port": self.http_port, "node_ids": self.node_ids,
                  "timings": {k: v for k, v in self.timings.items() if k != "run_started"},
                  "train_phase_s": [round(r["time_s"], 2) for r in round_lines(self.results_dir)],
                  "exit_codes": self.exited, **dict(extra or {})}
        (self.workdir / "deployment.json").write_text(json.dumps(report, indent=1, default=str))
        return report
