"""tools/coldstart_temperatures.py: cold-start EM at each temperature from a run's checkpoints."""

from __future__ import annotations

import pytest

from fedcoe_flwr.config import from_dict
from fedcoe_flwr.server.loop import RoundLoop
from harness import InProcessGrid
from tools.coldstart_temperatures import main, scan


def finished_run(tmp_path, algorithm: str):
    cfg = from_dict(dict(dataset="synthetic", synthetic_train_size=240, synthetic_test_size=60, image_size=16,
                         num_clients=3, num_coldstart_clients=2, partition="dirichlet", dirichlet_alpha=0.3,
                         min_partition_size=5, model="cnn", width_multiplier=0.25, num_experts=2, gate_width=4,
                         local_epochs=1, batch_size=16, num_rounds=1, eval_every=1, results_dir=str(tmp_path),
                         cache_dir=str(tmp_path / "cache"), run_name="scan", algorithm=algorithm))
    loop = RoundLoop(cfg)
    loop.start(InProcessGrid({100 + i: {"partition-id": i, "num-partitions": cfg.num_partitions}
                              for i in range(cfg.num_partitions)}))
    return loop, tmp_path / "scan"


def test_the_scan_at_the_federations_temperature_is_what_the_run_recorded(tmp_path, capsys):
    loop, run_dir = finished_run(tmp_path, "fedavg")
    record = loop.history[-1]
    rows = scan(run_dir, 1, [1.0, 2.0, record["coldstart_temperature"]])
    assert rows[0]["coldstart_em"] == pytest.approx(record["coldstart_accuracy_em"], abs=1e-6)
    chosen = [r for r in rows if r["chosen"]]
    assert chosen and chosen[0]["coldstart_em"] == pytest.approx(record["coldstart_accuracy_em_calibrated"], abs=1e-6)
    assert rows[1]["mean_top_prob"] < rows[0]["mean_top_prob"]
    assert main([str(run_dir), "1"]) == 0 and "| yes |" in capsys.readouterr().out


def test_a_missing_round_is_a_short_error(tmp_path, capsys):
    _, run_dir = finished_run(tmp_path, "fedavg")
    assert main([str(run_dir), "7"]) == 2
    assert "round-00007.pt" in capsys.readouterr().err
