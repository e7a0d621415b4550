"""The processes of a local deployment: start each in its own session with its output in a
log file, find every process it left behind (by an environment marker, by parentage), and
stop them by PID, never by name, so nothing else on a shared host is touched."""

from __future__ import annotations

import os
import random
import signal
import socket
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Mapping

MARK_ENV = "FEDCOE_DEPLOY_ID"


def _ephemeral_ports() -> range:
    try:
        low, high = (int(v) for v in Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split())
    except (OSError, ValueError):
        low, high = 32768, 60999  # Linux's default
    return range(low, high + 1)


def free_port(host: str = "127.0.0.1") -> int:
    """A port free now, chosen below the kernel's ephemeral range where there is room: the port
    is closed again before the server binds it, and a port that bind(0) gives is one any
    outgoing connection (gRPC's, the CLI's) may take in between ("address already in use")."""
    ephemeral = _ephemeral_ports()
    candidates = list(range(max(10000, ephemeral.start - 12000), ephemeral.start))
    random.SystemRandom().shuffle(candidates)  # not the global generator a caller may have seeded
    for port in candidates[:200] if len(candidates) >= 1000 else []:
        with socket.socket() as s:
            try:
                s.bind((host, port))
            except OSError:
                continue
            return port
    with socket.socket() as s:
        s.bind((host, 0))
        return int(s.getsockname()[1])


def port_open(port: int, host: str = "127.0.0.1") -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex((host, port)) == 0


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def _proc_entries() -> list[Path]:
    return [entry for entry in Path("/proc").iterdir() if entry.name.isdigit()]


def marked_processes(mark: str) -> list[int]:
    """PIDs of processes whose environment carries MARK_ENV=mark (everything one deployment
    started, including detached SuperExecs and orphaned ClientApps)."""
    needle = f"{MARK_ENV}={mark}".encode()
    pids = []
    for entry in _proc_entries():
        if int(entry.name) == os.getpid():
            continue
        try:
            if needle in (entry / "environ").read_bytes().split(b"\0"):
                pids.append(int(entry.name))
        except OSError:
            continue
    return pids


def descendants(root: int) -> list[int]:
    """Every process below ``root`` in the parent tree (children first started in a new
    session, like the SuperExec a SuperLink starts, included)."""
    children: dict[int, list[int]] = {}
    for entry in _proc_entries():
        try:
            ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        children.setdefault(ppid, []).append(int(entry.name))
    out, stack = [], [root]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child)
    return out


@dataclass
class Proc:
    """One started process: its Popen, name and log file."""

    name: str
    popen: subprocess.Popen
    log: Path
    started: float = field(default_factory=time.time)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None


def spawn(name: str, cmd: list[str], env: Mapping[str, str], cwd: Path, log: Path) -> Proc:
    """Start ``cmd`` in a new session (its own process group), appending its output to ``log``."""
    log.parent.mkdir(parents=True, exist_ok=True)
    with open(log, "ab") as fh:
        fh.write(f"\n$ {' '.join(cmd)}\n".encode())
        fh.flush()
        popen = subprocess.Popen(cmd, env=dict(env), cwd=cwd, stdout=fh, stderr=subprocess.STDOUT,
                                 stdin=subprocess.DEVNULL, start_new_session=True)
    return Proc(name, popen, log)


def stop_group(proc: subprocess.Popen, grace: float = 5.0) -> int | None:
    """SIGTERM the process group (the process was started in a new session), then SIGKILL
    whatever of the group is left."""
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
                try:  # the leader is gone; its group may still hold children
                    os.killpg(pgid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass
            break
        except subprocess.TimeoutExpired:
            continue
    return proc.poll()


def kill_tree(proc: subprocess.Popen) -> list[int]:
    """SIGKILL a process and every process below it at once, as a crash of its host would:
    no handler runs, nothing is shut down cleanly. Returns the PIDs killed."""
    pids = [proc.pid, *descendants(proc.pid)]
    for pid in pids:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    proc.wait()
    return pids


def sweep(mark: str, rounds: int = 3) -> list[int]:
    """SIGKILL every process still carrying the marker; returns their PIDs."""
    swept = []
    for _ in range(rounds):
        left = marked_processes(mark)
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
