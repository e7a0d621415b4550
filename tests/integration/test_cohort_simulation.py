"""The same short simulation with each round's clients trained as one vectorised cohort
(the cohort backend) and one by one in Ray actors: the same metrics and final state, up
to float noise. FedPer: a method with private parts, which stay in each node's Context."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from fedcoe_flwr.simulate import simulate

ROOT = Path(__file__).resolve().parents[2]


def run(tmp_path: Path, mode: str) -> Path:
    simulate({"config": str(ROOT / "configs" / "smoke.yaml"), "results_dir": str(tmp_path),
              "cache_dir": str(tmp_path / "cache"), "run_name": mode, "algorithm": "fedper", "model": "cnn",
              "simulation_training": mode})
    return tmp_path / mode


def test_cohort_and_per_client_simulations_agree(tmp_path):
    cohort, per_client = run(tmp_path, "cohort"), run(tmp_path, "per_client")
    a, b = (torch.load(p / "final_state.pt", weights_only=False)["arrays"] for p in (cohort, per_client))
    assert a.keys() == b.keys()
    assert max(float((a[k].double() - b[k].double()).abs().max()) for k in a) <= 1e-5
    ma, mb = ([json.loads(line) for line in (p / "metrics.jsonl").read_text().splitlines()] for p in (cohort, per_client))
    assert [m["round"] for m in ma] == [m["round"] for m in mb] == [1, 2]
    for x, y in zip(ma, mb):
        for key in ("global_accuracy", "personalized_accuracy", "coldstart_accuracy"):
            assert abs(x[key] - y[key]) <= 1e-6, key
        assert abs(x["train_loss"] - y["train_loss"]) <= 1e-5
