"""End to end as a user runs it: `flwr run .` with the smoke config on a managed local
SuperLink (Ray simulation). The test's SuperLink listens on ports of its own (Flower's
``FLWR_LOCAL_*_PORT``), so the one a user's `flwr run .` left running is neither reused nor
touched; the test stops its SuperLink and everything it started."""

import json
import os
import signal
import socket
import subprocess
import time
from pathlib import Path

from tools.deploy.processes import descendants, free_port

ROOT = Path(__file__).resolve().parents[2]


def port_in_use(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


def processes_mentioning(text: str) -> list[int]:
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if text in (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="ignore"):
                    pids.append(int(entry.name))
            except OSError:
                continue
    return pids


def running(pid: int) -> bool:
    """True while the process exists and is not a zombie (a zombie holds no sockets)."""
    try:
        return (Path("/proc") / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (OSError, IndexError):
        return False


def stop_tree(marker: str, port: int, wait: float = 30.0) -> None:
    """Kill the SuperLink whose command line holds ``marker`` and all it started, and wait
    until they are gone and its port is closed (SIGKILL takes effect asynchronously)."""
    killed = []
    for pid in processes_mentioning(marker):
        for p in [pid] + descendants(pid):
            try:
                os.kill(p, signal.SIGKILL)
                killed.append(p)
            except ProcessLookupError:
                pass
    deadline = time.time() + wait
    while time.time() < deadline and (any(running(p) for p in killed) or port_in_use(port)):
        time.sleep(0.2)


def test_flwr_run_smoke_end_to_end(tmp_path):
    flwr_home, port = tmp_path / "flwr-home", free_port()
    env = {**os.environ, "FLWR_HOME": str(flwr_home), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1", "FLWR_DISABLE_RUNTIME_DEPENDENCY_INSTALLATION": "1",
           "FEDCOE_PROJECT_DIR": str(ROOT), "FLWR_LOCAL_SUPERLINK_HTTP_API_PORT": str(port),
           "FLWR_LOCAL_CONTROL_API_PORT": str(free_port())}
    run_config = (f"config='configs/smoke.yaml' results_dir='{tmp_path / 'results'}' "
                  f"cache_dir='{tmp_path / 'cache'}' run_name='e2e'")
    cmd = ["flwr", "run", ".", "--run-config", run_config, "--federation-config", "num-supernodes=5", "--stream"]
    started = time.time()
    try:
        proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=420)
    finally:
        stop_tree(str(flwr_home), port)
    log = proc.stdout + proc.stderr
    assert proc.returncode == 0, log[-3000:]
    out = tmp_path / "results" / "e2e"
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["round"] for l in lines] == [1, 2], log[-3000:]
    for key in ("global_accuracy", "personalized_accuracy", "coldstart_accuracy"):
        assert all(isinstance(l[key], float) for l in lines), key
    assert json.loads((out / "summary.json").read_text())["status"] == "finished"
    assert "[ROUND 2/2]" in log and "personalised=" in log  # progress and metrics in Flower's log
    assert f"127.0.0.1:{port}" in log, "the SuperLink must be the test's own"
    assert not port_in_use(port), "the test must stop the SuperLink it started"
    print(f"flwr run smoke: {time.time() - started:.1f}s")
