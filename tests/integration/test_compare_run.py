"""The comparison runner end to end: real simulations, skipped finished runs, the table,
the plots, the TensorBoard links and the progress lines."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def test_compare_runs_skips_and_writes_the_table(tmp_path):
    """``--set num_rounds=1`` is another comparison: its runs and report are named after it."""
    cmd = [sys.executable, "-m", "fedcoe_flwr.compare", "--config", "configs/smoke.yaml", "--seeds", "0",
           "--methods", "fedavg", "--set", "num_rounds=1", "--results-dir", str(tmp_path),
           "--docs-dir", str(tmp_path / "docs"), "--results-doc", str(tmp_path / "RESULTS.md")]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    summary = json.loads((tmp_path / "smoke-num_rounds_1-fedavg-s0" / "summary.json").read_text())
    assert summary["status"] == "finished"
    md = (tmp_path / "compare-smoke-num_rounds_1" / "comparison.md").read_text()
    acc = 100 * summary["final"]["global_accuracy"]
    assert f"| fedavg | {acc:.2f} ± 0.00 |" in md
    doc = json.loads((tmp_path / "docs" / "smoke-num_rounds_1.json").read_text())
    assert doc["methods"]["fedavg"]["global"]["mean"] == pytest.approx(acc, abs=1e-3)
    assert f"| fedavg | {acc:.2f} ± 0.00 |" in (tmp_path / "RESULTS.md").read_text()
    assert (tmp_path / "compare-smoke-num_rounds_1" / "curves.png").is_file()
    assert (tmp_path / "compare-smoke-num_rounds_1" / "per_client.png").is_file()
    assert "[compare] 1/1 done: smoke-num_rounds_1-fedavg-s0 took " in first.stdout
    assert list((tmp_path / "compare-smoke-num_rounds_1" / "tb" / "fedavg" / "s0").glob("events.out.tfevents.*"))
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "finished earlier, skipped" in again.stdout
    assert "[compare] 1/1 done: smoke-num_rounds_1-fedavg-s0 finished earlier; all runs done" in again.stdout
    # --report-only runs nothing: a method never run is left out of the table
    report = subprocess.run(cmd[:cmd.index("fedavg")] + ["fedavg", "fedprox"] + cmd[cmd.index("fedavg") + 1:]
                            + ["--report-only"], capture_output=True, text=True, timeout=600)
    assert report.returncode == 0 and "running" not in report.stdout
    md = (tmp_path / "compare-smoke-num_rounds_1" / "comparison.md").read_text()
    assert "| fedavg |" in md and "| fedprox |" not in md
    assert not (tmp_path / "smoke-num_rounds_1-fedprox-s0").exists()
    # --jobs 2: the finished run is skipped, the other runs in its own process with its own log
    both = cmd[:cmd.index("fedavg")] + ["fedavg", "fedprox"] + cmd[cmd.index("fedavg") + 1:]
    parallel = subprocess.run(both + ["--jobs", "2"], capture_output=True, text=True, timeout=600)
    assert parallel.returncode == 0, parallel.stdout[-2000:] + parallel.stderr[-2000:]
    assert "smoke-num_rounds_1-fedavg-s0: finished earlier, skipped" in parallel.stdout
    assert "[fedcoe] finished" in (tmp_path / "smoke-num_rounds_1-fedprox-s0.log").read_text()
    assert "| fedprox |" in (tmp_path / "compare-smoke-num_rounds_1" / "comparison.md").read_text()
