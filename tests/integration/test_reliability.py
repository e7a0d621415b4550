"""Real simulations that lose a client or the server: a killed run resumed from its checkpoint
matches the uninterrupted run; a failing or NaN client is left out and the round completes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from flwr.clientapp import ClientApp
from harness import REPO_ROOT as ROOT

from fedcoe_flwr.client import handlers as client
from fedcoe_flwr.records import ARRAYS, from_array_record, to_array_record


# ------------------------------------------------------------------ real simulations
def simulate(tmp_path: Path, client_app=None, **overrides) -> Path:
    from flwr.serverapp import ServerApp
    from flwr.simulation import run_simulation

    from client_app.app import app as default_client_app
    from fedcoe_flwr.server.run import run_server

    run_config = {"config": str(ROOT / "configs" / "smoke.yaml"), "results_dir": str(tmp_path),
                  "cache_dir": str(tmp_path / "cache"), "run_name": "sim", **overrides}
    server = ServerApp()

    @server.main()
    def main(grid, context):
        run_server(grid, run_config)

    run_simulation(server, client_app or default_client_app, num_supernodes=5,
                   backend_config={"client_resources": {"num_cpus": 1, "num_gpus": 0.0}})
    return tmp_path / "sim"


def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    """FedAvg has no client-private state, so a run killed after round 1 and resumed
    must end with exactly the state of a run that was never interrupted."""
    common = dict(algorithm="fedavg", num_rounds=2, eval_every=2)
    full = simulate(tmp_path / "full", **common)
    # "killed" after round 1: a run that stopped there, then the same run resumed
    simulate(tmp_path / "resumed", **{**common, "num_rounds": 1})
    resumed = simulate(tmp_path / "resumed", **{**common, "resume": True})
    a = torch.load(full / "final_state.pt", weights_only=False)
    b = torch.load(resumed / "final_state.pt", weights_only=False)
    assert a["round"] == b["round"] == 2
    for key, value in a["arrays"].items():
        assert torch.allclose(value.float(), b["arrays"][key].float(), atol=1e-6), key
    rounds = [json.loads(l)["round"] for l in (resumed / "rounds.jsonl").read_text().splitlines()]
    assert rounds == [1, 2]  # no round repeated or skipped


def failing_client_app() -> ClientApp:
    """The real ClientApp, except that in round 2 partition 1 raises and partition 2 replies with
    a NaN in its update."""
    app = ClientApp()

    @app.query("profile")
    def profile(msg, context):
        return client.handle_profile(msg, context)

    @app.train()
    def train(msg, context):
        reply = client.handle_train(msg, context)
        partition = int(context.node_config["partition-id"])
        if msg.content["config"]["server_round"] == 2 and partition == 1:
            raise RuntimeError("injected failure")
        if msg.content["config"]["server_round"] == 2 and partition == 2:
            arrays = from_array_record(reply.content.array_records[ARRAYS])
            key = next(k for k, v in arrays.items() if v.is_floating_point())
            arrays[key].view(-1)[0] = float("nan")
            reply.content.array_records[ARRAYS] = to_array_record(arrays)
        return reply

    @app.evaluate()
    def evaluate(msg, context):
        return client.handle_evaluate(msg, context)

    @app.evaluate("coldstart")
    def coldstart(msg, context):
        return client.handle_coldstart(msg, context)

    @app.evaluate("prior")
    def prior(msg, context):
        return client.handle_prior(msg, context)

    return app


def test_failing_and_nan_clients_are_left_out_and_the_round_completes(tmp_path):
    """One run for both faults (a simulation's start-up is most of its time)."""
    out = simulate(tmp_path, client_app=failing_client_app())
    rounds = [json.loads(l) for l in (out / "rounds.jsonl").read_text().splitlines()]
    assert rounds[0]["replies"] == 4 and rounds[0]["failed"] == [] and rounds[0]["rejected"] == []
    assert rounds[1]["failed"] == [1] and rounds[1]["rejected"] == [2]
    assert rounds[1]["replies"] == 2
    assert json.loads((out / "summary.json").read_text())["status"] == "finished"
    state = torch.load(out / "final_state.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["arrays"].values() if v.is_floating_point())
