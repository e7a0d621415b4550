"""A site's private parts on disk: versioned by round, reloaded after a restart, a corrupt
file or a round the server never aggregated skipped."""

from __future__ import annotations

import json
import torch
from harness import context, message

from fedcoe_flwr.client import handlers as client
from fedcoe_flwr.client import private_state
from fedcoe_flwr.algorithms import get_algorithm
from fedcoe_flwr.client.node import node_role
from fedcoe_flwr.client.private_state import state_checksum, state_paths
from fedcoe_flwr.records import METRICS, from_array_record


def test_private_state_survives_a_restart_through_the_state_dir(sites, tmp_path):
    """Train in one Context; a 'restarted SuperNode' (new, empty Context) evaluates with the
    private parts reloaded from state-dir -- checked by checksum and by value."""
    cfg, folders = sites
    algo = get_algorithm(cfg.algorithm)
    state = algo.init_state(cfg, len(folders.class_names))
    node_config = {"data-dir": str(folders.training[1]), "site-id": 1, "state-dir": str(tmp_path / "state")}
    payload, pconfig = algo.train_payload(state, cfg, 1, 1)
    first = context(node_config)
    reply = client.handle_train(message(cfg, "train", payload, {**pconfig, "server_round": 1}), first)
    assert dict(reply.content.metric_records[METRICS])["num_samples"] > 0
    kept = from_array_record(first.state.array_records[private_state.PRIVATE])
    folder, journal = state_paths(tmp_path / "state", cfg.resolved_run_name, "site-1")
    path = private_state.version_path(folder, 1)
    saved = torch.load(path, weights_only=True)
    assert saved["round"] == 1 and saved["crc"] == state_checksum(kept)
    assert not [p for p in path.parent.iterdir() if ".tmp" in p.name]  # written atomically

    restarted = context(node_config)  # same run, empty state
    payload, pconfig = algo.eval_payload(state, cfg, 1)
    client.handle_evaluate(message(cfg, "evaluate", payload, {**pconfig, "server_round": 1}), restarted)
    reloaded = from_array_record(restarted.state.array_records[private_state.PRIVATE])
    assert reloaded.keys() == kept.keys() and all(torch.equal(reloaded[k], kept[k]) for k in kept)
    events = json.loads(journal.read_text())
    assert [(e["phase"], e["source"]) for e in events] == [("train", "none"), ("evaluate", "state-dir")]
    assert events[1]["crc_in"] == events[0]["crc_out"] == saved["crc"]

    # another run with the same name does not pick up this run's private parts ...
    other = context(node_config, run_id=8)
    assert private_state.load_private_state(node_role(other), cfg, other, before_round=2) is None
    # ... unless it resumes it
    assert private_state.load_private_state(node_role(other), cfg.replace(resume=True), other, 2) is not None


def test_corrupt_state_file_is_ignored_not_loaded(sites, tmp_path):
    cfg, folders = sites
    node_config = {"data-dir": str(folders.training[0]), "site-id": 0, "state-dir": str(tmp_path / "s")}
    ctx = context(node_config)
    role = node_role(ctx)
    private_state.save_private_state(role, cfg, ctx, {"w": torch.ones(3)}, 1)
    folder, _ = state_paths(tmp_path / "s", cfg.resolved_run_name, "site-0")
    path = private_state.version_path(folder, 1)
    assert private_state.load_private_state(role, cfg, ctx, 2)[0]["w"].tolist() == [1.0, 1.0, 1.0]
    path.write_bytes(path.read_bytes()[:20])
    assert private_state.load_private_state(role, cfg, ctx, 2) is None


def test_private_state_of_a_round_never_aggregated_is_skipped(sites, tmp_path):
    """A crash after clients trained round 3 but before the server aggregated it: the resumed
    round 3 starts from the round-2 parts, as the uninterrupted run did."""
    cfg, folders = sites
    ctx = context({"data-dir": str(folders.training[0]), "site-id": 0, "state-dir": str(tmp_path / "s")})
    role = node_role(ctx)
    for r in (1, 2, 3, 4):
        private_state.save_private_state(role, cfg, ctx, {"w": torch.full((2,), float(r))}, r)
    folder, _ = state_paths(tmp_path / "s", cfg.resolved_run_name, "site-0")
    assert sorted(p.name for p in folder.glob("round-*.pt")) == [f"round-0000{r}.pt" for r in (2, 3, 4)]
    private, payload = private_state.load_private_state(role, cfg, ctx, before_round=4)
    assert payload["round"] == 3 and private["w"].tolist() == [3.0, 3.0]
    fresh = context({"data-dir": str(folders.training[0]), "site-id": 0, "state-dir": str(tmp_path / "s")})
    private, source = private_state.private_parts(fresh, role, cfg, before_round=3)
    assert source == "state-dir" and private["w"].tolist() == [2.0, 2.0]
    # the held parts are newer than the round allows: the older version on disk wins
    private, source = private_state.private_parts(ctx, role, cfg, before_round=3)
    assert source == "state-dir" and private["w"].tolist() == [2.0, 2.0]
