"""Helpers shared by the benchmark scripts: workloads, child processes, load and memory.

Every measurement runs in a fresh child process (``python benchmarks/<script>.py
--child ...``) that prints one JSON line; the parent repeats, interleaves and takes
medians, and notes the 1-minute load average next to every figure (the machines
these run on are shared)."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Iterable

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # `python benchmarks/x.py` from anywhere, without installing
    sys.path.insert(0, str(ROOT))
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "cifar10-jpg.tar.gz"
RESULT_PREFIX = "BENCH-RESULT "

# Workload (a): pfl-research's cross-device CIFAR-10 shape (1000 users x 50 images, batch
# 10, 1 local epoch), framework overhead dominates. Workload (b): FedMoE-DA's shape
# (500 samples per client, 5 local epochs, batch 100). IID partitions of the 50,000
# training images; test_fraction is tiny so every image of a client is a training image
# (the benchmarks train only: eval_every = 0).
WORKLOADS: dict[str, dict[str, Any]] = {
    "default": dict(num_clients=1000, samples_per_client=50, local_epochs=1, batch_size=10),
    "paper": dict(num_clients=100, samples_per_client=500, local_epochs=5, batch_size=100),
}
CIFAR10_TRAIN_IMAGES = 50_000


def workload_run_config(workload: str, clients_per_round: int, algorithm: str, rounds: int, *,
                        data_root: str = "", num_clients: int | None = None, experts: int = 4,
                        top_m: int = 2, seed: int = 0, extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The run config (ExperimentConfig keys) of one benchmark workload. With another
    ``num_clients`` every client keeps the workload's number of images (``train_subset``)."""
    shape = dict(WORKLOADS[workload])
    per_client = shape.pop("samples_per_client")
    n = num_clients or shape["num_clients"]
    shape["num_clients"] = n
    if not 1 <= clients_per_round <= n:
        raise SystemExit(f"--clients must be in 1..{n} for workload '{workload}'")
    cfg: dict[str, Any] = dict(
        dataset="cifar10", data_root=data_root or str(DEFAULT_DATA), download=False,
        cache_dir=str(ROOT / ".cache" / "fedcoe_flwr"), partition="iid", num_coldstart_clients=0,
        train_subset=per_client * n if per_client * n < CIFAR10_TRAIN_IMAGES else 0,
        test_fraction=0.001, min_partition_size=1, model="cnn", width_multiplier=1.0,
        algorithm=algorithm, num_experts=experts, top_m=min(top_m, experts), num_rounds=rounds, eval_every=0,
        fraction_train=clients_per_round / n, lr=0.01, momentum=0.9, seed=seed, device="cpu",
        keep_checkpoints=1, **shape)
    if data_root == "synthetic":  # generated images of the same shape (smoke tests)
        cfg.update(dataset="synthetic", data_root="", train_subset=0, synthetic_train_size=per_client * n,
                   synthetic_test_size=100)
    cfg.update(extra or {})
    return cfg


def add_workload_args(parser) -> None:  # noqa: ANN001
    parser.add_argument("--workload", choices=sorted(WORKLOADS), default="default")
    parser.add_argument("--data-root", default="",
                        help=f"CIFAR-10 image folder/.tar.gz (default {DEFAULT_DATA}); 'synthetic' = generated "
                             "images of the same shape (tests)")
    parser.add_argument("--num-clients", type=int, default=0,
                        help="clients in the federation (default: the workload's 1000 / 100)")
    parser.add_argument("--experts", type=int, default=4, help="FedCoE: K experts")
    parser.add_argument("--top-m", type=int, default=2, help="FedCoE: m experts per client")
    parser.add_argument("--seed", type=int, default=0)


def sample_schedule(cfg) -> list[list[int]]:  # noqa: ANN001
    """The clients ``MoEStrategy.sample_clients`` picks in each round (same seeded
    generator, same draws). Re-stated here rather than called, so a plain loop needs no
    Strategy object; overhead.py's ``max|dw|`` between simulation and plain shows they agree."""
    import numpy as np

    rng = np.random.default_rng(cfg.seed)
    n = cfg.num_clients
    k = max(1, int(round(cfg.fraction_train * n)))
    return [sorted(int(c) for c in rng.choice(n, size=k, replace=False)) if k < n else list(range(n))
            for _ in range(cfg.num_rounds)]


# ------------------------------------------------------------------ processes
def run_child(script: str, args: Iterable[str], timeout: float, env: dict[str, str] | None = None
              ) -> dict[str, Any]:
    """Run ``benchmarks/<script> --child ...`` and return its JSON result line."""
    cmd = [sys.executable, str(Path(__file__).with_name(script)), *map(str, args)]
    full_env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "RAY_DEDUP_LOGS": "0", **(env or {})}
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=ROOT)
    except subprocess.TimeoutExpired as err:
        raise RuntimeError(f"{' '.join(cmd)} timed out after {timeout:.0f}s") from err
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_PREFIX):
            return json.loads(line[len(RESULT_PREFIX):])
    tail = "\n".join((proc.stdout + proc.stderr).splitlines()[-40:])
    raise RuntimeError(f"{' '.join(cmd)} failed (exit {proc.returncode}):\n{tail}")


def emit(result: dict[str, Any]) -> None:
    """What a child prints for its parent (last line of stdout)."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def load_average() -> float:
    return os.getloadavg()[0]


def median(values: Iterable[float]) -> float:
    vals = [v for v in values if v is not None]
    return statistics.median(vals) if vals else float("nan")


def fmt_load(values: Iterable[float]) -> str:
    vals = list(values)
    return f"load {min(vals):.1f}-{max(vals):.1f}" if vals else "load n/a"


# ------------------------------------------------------------------ memory (/proc, no psutil needed)
def _status(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/status") as fh:
            return dict(line.split(":", 1) for line in fh if ":" in line)
    except OSError:
        return {}


def pss_bytes(pid: int) -> int:
    """Proportional set size (shared pages split between the processes that map them),
    so that summing over Ray's processes does not count shared memory twice; falls back
    to RSS where smaps_rollup is unavailable."""
    try:
        with open(f"/proc/{pid}/smaps_rollup") as fh:
            for line in fh:
                if line.startswith("Pss:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return rss_bytes(pid)


def rss_bytes(pid: int) -> int:
    """Resident set size of a process now (0 when it is gone)."""
    value = _status(pid).get("VmRSS", "0 kB").split()[0]
    return int(value) * 1024


def hwm_bytes(pid: int) -> int:
    """Peak resident set size of a process since it started."""
    value = _status(pid).get("VmHWM", "0 kB").split()[0]
    return int(value) * 1024


def children_of(pid: int) -> list[int]:
    """Every descendant of ``pid`` (Ray's raylet, GCS and worker processes)."""
    parent: dict[int, int] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as fh:
                    stat = fh.read()
                parent[int(entry)] = int(stat[stat.rindex(")") + 2:].split()[1])
            except (OSError, ValueError, IndexError):
                continue
    out, frontier = [], [pid]
    while frontier:
        p = frontier.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        frontier += kids
    return out


def cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return ""


def ray_workers(root_pid: int) -> list[int]:
    """The Ray worker processes (actors running ClientApps) started under ``root_pid``."""
    return [p for p in children_of(root_pid) if cmdline(p).startswith("ray::")]


class Stopwatch:
    def __init__(self) -> None:
        self.t0 = time.perf_counter()

    def __call__(self) -> float:
        return time.perf_counter() - self.t0
