"""A run that dies mid-round and is resumed from its checkpoint ends with exactly the
server state and the private parts of the same run never interrupted: the resumed round
starts from the private parts of the last aggregated round, not from those the clients
trained in the round that was lost."""

from __future__ import annotations

import json

import pytest
import torch
from harness import InProcessGrid

from fedcoe_flwr.client.node import node_role
from fedcoe_flwr.client.private_state import load_private_state
from fedcoe_flwr.server.loop import RoundLoop


def run(cfg, run_name, run_id=7, fail_on=None, resume=False):
    cfg = cfg.replace(run_name=run_name, resume=resume)
    nodes = {100 + p: {"partition-id": p, "num-partitions": cfg.num_partitions} for p in range(cfg.num_partitions)}
    grid = InProcessGrid(nodes, run_id=run_id, fail_on=fail_on)  # fresh contexts: restarted nodes
    loop = RoundLoop(cfg)
    loop.start(grid)
    return loop, grid


@pytest.mark.parametrize("algorithm,phase", [("fedcoe", "train"), ("fedper", "train"), ("fedcoe", "evaluate")])
def test_resumed_run_equals_the_uninterrupted_run(make_cfg, tmp_path, fresh_caches, algorithm, phase):
    cfg = make_cfg(algorithm=algorithm, model="cnn", num_rounds=4, eval_every=2, num_clients=3, num_coldstart_clients=1,
                   results_dir=str(tmp_path / "results"), state_dir=str(tmp_path / "state"), fraction_train=0.67)
    whole, whole_grid = run(cfg, "whole")
    with pytest.raises(ConnectionError):
        run(cfg, "cut", fail_on=(phase, 4 if phase == "evaluate" else 3))
    cut = json.loads((tmp_path / "results" / "cut" / "summary.json").read_text())
    assert cut["status"] == "interrupted" and "died during" in cut["failure"]["error"]
    assert cut["failure"]["last_finished_round"] == (3 if phase == "evaluate" else 2)
    resumed, resumed_grid = run(cfg, "cut", run_id=8, resume=True)
    summary = json.loads((tmp_path / "results" / "cut" / "summary.json").read_text())
    assert summary["status"] == "finished" and len(summary["segments"]) == 2
    assert summary["wall_time_s"] >= sum(s["wall_time_s"] for s in summary["segments"][:1])
    assert resumed.round == whole.round == 4
    assert whole.state.arrays.keys() == resumed.state.arrays.keys()
    for key, value in whole.state.arrays.items():
        assert torch.equal(value, resumed.state.arrays[key]), key
    assert [h["global_accuracy"] for h in whole.history] == [h["global_accuracy"] for h in resumed.history]
    for node in whole_grid.contexts:
        role = node_role(whole_grid.contexts[node])
        a = load_private_state(role, cfg.replace(run_name="whole"), whole_grid.contexts[node], 99)
        b = load_private_state(role, cfg.replace(run_name="cut", resume=True), resumed_grid.contexts[node], 99)
        assert (a is None) == (b is None)
        if a is not None:
            assert a[1]["round"] == b[1]["round"]
            assert all(torch.equal(a[0][k], b[0][k]) for k in a[0])
    lines = (tmp_path / "results" / "cut" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == len(whole.history)  # every evaluated round exactly once
