"""Smoke runs of the benchmark scripts at tiny sizes, as subprocesses, so that they cannot
rot. They check that each script finishes and prints its figures; they assert nothing
about timings (the figures themselves are in README "Speed and scale")."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
BENCH = ROOT / "benchmarks"
NUMBER = r"[0-9]+(?:\.[0-9]+)?"


def run_script(name: str, *args: str, timeout: float = 300) -> str:
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(BENCH / name), *args], capture_output=True, text=True,
                          timeout=timeout, cwd=ROOT, env=env)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{name} failed (exit {proc.returncode}):\n{out[-4000:]}"
    return proc.stdout


def test_comm_prints_bytes_and_ratios():
    out = run_script("comm.py", "--data-root", "synthetic", "--clients", "2", "--width", "0.25",
                     "--experts", "4", "--top-m", "2", "--sweep", "")
    row = re.search(rf"^\s*4\s+2\s+\|\s*({NUMBER})\s*\|.*\|\s*({NUMBER})\s+({NUMBER})\s*\|\s*({NUMBER})\s*$", out, re.M)
    assert row, out
    dense, down_ratio, expected = float(row[1]), float(row[2]), float(row[3])
    assert dense > 0 and 0 < down_ratio < 1 and 0 < expected < 1
    assert "experts sent 4 in round 1" in out and "2 in round 2" in out


def test_transport_prints_objects_and_ratios():
    out = run_script("transport.py", "--config", "configs/smoke.yaml", "--repeat", "1")
    rows = re.findall(rf"^\s+(one Array per tensor|packed \(to_array_record\))\s+(\d+) objects", out, re.M)
    assert [name for name, _ in rows] == ["one Array per tensor", "packed (to_array_record)"], out
    assert int(rows[1][1]) < int(rows[0][1]), out  # packing sends fewer Flower objects
    assert re.search(rf"ratio per tensor / packed: objects {NUMBER}x, bytes {NUMBER}x, time {NUMBER}x", out), out


def test_overhead_prints_ratios(tmp_path):
    out = run_script("overhead.py", "--data-root", "synthetic", "--num-clients", "4", "--clients", "2",
                     "--rounds", "2", "--repeats", "1", "--algorithms", "fedavg", "--timeout", "240", timeout=600)
    assert re.search(rf"^fedavg\s+simulation\s+{NUMBER} s\s+plain loop\s+{NUMBER} s\s+ratio\s+{NUMBER}", out, re.M), out
    for runtime in ("Flower's own runtime", "our runtime"):  # the quickstart-style reference on both
        assert re.search(rf"quickstart-style reference.*{runtime}.*ratio\s+{NUMBER}", out), out
    assert "max|dw| 0" in out, out  # the simulation and the plain loop did exactly the same work


def test_scale_prints_rounds_per_minute_and_memory():
    out = run_script("scale.py", "--data-root", "synthetic", "--num-clients", "6", "--clients", "3",
                     "--rounds", "2", "--width", "0.25", "--timeout", "240", timeout=400)
    assert re.search(rf"rounds per minute: {NUMBER}", out), out
    rows = re.findall(rf"^\s+[12]\s+{NUMBER}\s+\d+\s+(\d+)\s+", out, re.M)
    assert len(rows) == 2 and all(int(r) > 0 for r in rows), out
    assert "memory after round 1" in out


def test_cohort_prints_speedup_and_same_work():
    out = run_script("cohort.py", "--num-clients", "6", "--clients", "3", "--rounds", "1", "--algorithms", "fedavg",
                     "--threads", "1", timeout=400)
    assert re.search(rf"fedavg cohort vs plain loop: {NUMBER}x client updates/s", out), out
    dw = re.search(r"max\|dw\| loop vs cohort ([0-9.e+-]+)", out)
    assert dw and float(dw[1]) < 1e-4, out  # the same clients, batches and steps
    for path in ("plain loop, 1 thread", "cohort, 1 thread"):
        assert re.search(rf"{path}\s+{NUMBER} s\s+{NUMBER} client updates/s\s+{NUMBER} rounds/min\s+peak", out), out
