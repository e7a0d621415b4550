"""tools/coldstart_temperatures.py: cold-start EM at each temperature from a run's checkpoints."""

from __future__ import annotations

import pytest

from tools.coldstart_temperatures import main, scan


def test_the_scan_at_the_federations_temperature_is_what_the_run_recorded(finished_run, capsys):
    loop, run_dir = finished_run("fedavg")
    record = loop.history[-1]
    rows = scan(run_dir, 1, [1.0, 2.0, record["coldstart_temperature"]])
    assert rows[0]["coldstart_em"] == pytest.approx(record["coldstart_accuracy_em"], abs=1e-6)
    chosen = [r for r in rows if r["chosen"]]
    assert chosen and chosen[0]["coldstart_em"] == pytest.approx(record["coldstart_accuracy_em_calibrated"], abs=1e-6)
    assert rows[1]["mean_top_prob"] < rows[0]["mean_top_prob"]
    assert main([str(run_dir), "1"]) == 0 and "| yes |" in capsys.readouterr().out


def test_a_missing_round_is_a_short_error(finished_run, capsys):
    _, run_dir = finished_run("fedavg")
    assert main([str(run_dir), "7"]) == 2
    assert "round-00007.pt" in capsys.readouterr().err
