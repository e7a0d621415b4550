"""Integration: a real Flower Ray simulation through the same ServerApp/ClientApp code
(a few clients, 2 rounds, small generated data); all three metrics must be written."""

import json
import math
from pathlib import Path

import pytest
from flwr.serverapp import ServerApp
from flwr.simulation import run_simulation

from client_app.app import app as client_app
from fedcoe_flwr.server.run import run_server
from fedcoe_flwr.server.nodes import FederationError

ROOT = Path(__file__).resolve().parents[2]


def simulate(tmp_path: Path, num_supernodes: int = 5, **overrides) -> Path:
    run_config = {"config": str(ROOT / "configs" / "smoke.yaml"), "results_dir": str(tmp_path),
                  "cache_dir": str(tmp_path / "cache"), "run_name": "sim", **overrides}
    server = ServerApp()

    @server.main()
    def main(grid, context):  # the same run_server the real ServerApp calls
        run_server(grid, run_config)

    run_simulation(server, client_app, num_supernodes=num_supernodes,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    return tmp_path / "sim"


@pytest.mark.parametrize("algorithm", ["fedcoe", "fedavg"])
def test_simulation_writes_all_three_metrics(tmp_path, algorithm):
    out = simulate(tmp_path, algorithm=algorithm)
    lines = [json.loads(l) for l in (out / "metrics.jsonl").read_text().splitlines()]
    assert [l["round"] for l in lines] == [1, 2]
    for line in lines:
        for key in ("global_accuracy", "personalized_accuracy", "coldstart_accuracy",
                    "personalized_accuracy_mean", "personalized_accuracy_p10"):
            assert isinstance(line[key], float) and 0.0 <= line[key] <= 1.0, (key, line[key])
        # a sum of several cross-entropies (FedCoE's: the client's, the pool's, the local part's, the gate's)
        assert isinstance(line["train_loss"], float) and 0.0 <= line["train_loss"] < math.inf, line["train_loss"]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "finished" and summary["rounds_completed"] == 2
    assert summary["config"]["algorithm"] == algorithm and summary["seed"] == 0
    assert summary["versions"]["flwr"].startswith("1.39")
    assert (out / "accuracy.png").stat().st_size > 1000
    assert (out / "final_state.pt").is_file()
    assert len(list((out / "checkpoints").glob("round-*.pt"))) == 2
    rounds = [json.loads(l) for l in (out / "rounds.jsonl").read_text().splitlines()]
    assert [r["replies"] for r in rounds] == [4, 4]  # the cold-start client never trains
    if algorithm == "fedcoe":
        # top_m=2 of 3 experts: from round 2 on each client downloads only its expert set
        assert rounds[1]["train_bytes_down"] < rounds[0]["train_bytes_down"]


def test_node_count_mismatch_is_reported(tmp_path):
    # Flower 1.39's run_simulation re-raises the ServerApp's error; the summary keeps it too
    with pytest.raises(FederationError, match="num-supernodes=5"):
        simulate(tmp_path, num_supernodes=3)
    out = tmp_path / "sim"
    summary = json.loads((out / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["rounds_completed"] == 0
    assert "num-supernodes=5" in summary["failure"]["error"]
