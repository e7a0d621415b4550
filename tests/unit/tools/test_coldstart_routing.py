"""tools/coldstart_routing.py: FedCoE's cold-start routed by the gate or the label, per shared-expert weight."""

from __future__ import annotations

import pytest

from tools.coldstart_routing import main, scan


def test_the_gate_routed_scan_at_the_configured_weight_is_what_the_run_recorded(finished_run, capsys):
    loop, run_dir = finished_run("fedcoe")
    record = loop.history[-1]
    weight = loop.cfg.shared_expert_weight
    rows = scan(run_dir, 1, [0.0, weight])
    assert rows[1]["temperature"] == record["coldstart_temperature"]
    assert rows[1]["coldstart_gate"] == pytest.approx(record["coldstart_accuracy"], abs=1e-6)
    assert rows[1]["global_raw"] == pytest.approx(record["global_accuracy"], abs=1e-6)
    assert all(0.0 <= r["coldstart_oracle"] <= 1.0 for r in rows)
    assert main([str(run_dir), "1", "--weights", str(weight)]) == 0 and "routed by the label" in capsys.readouterr().out


def test_a_run_without_a_class_map_is_refused(finished_run):
    _, run_dir = finished_run("fedavg")
    with pytest.raises(SystemExit, match="class map"):
        scan(run_dir, 1, [0.5])


def test_a_run_without_a_shared_expert_is_refused(finished_run):
    _, run_dir = finished_run("fedcoe", shared_expert_weight=0.0)
    with pytest.raises(SystemExit, match="no shared expert"):
        scan(run_dir, 1, [0.5])


def test_a_weight_outside_zero_to_one_is_a_short_error(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["no-run", "1", "--weights", "1.5"])
    assert stop.value.code == 2 and "1.5 is not a shared-expert weight" in capsys.readouterr().err
