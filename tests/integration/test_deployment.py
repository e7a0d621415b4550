"""Real SuperLink + SuperNode processes over gRPC on 127.0.0.1 (TLS + node auth, the
SuperLink's state in SQLite): rounds complete, an unregistered key is refused, a killed SuperNode
is left out while a restarted one gets its private state back, a killed SuperLink comes back
from its database and the run resumes. The first two read the shared trained federation
(conftest.federation)."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest
import torch
from loopback import diagnosis, node_log, start_deployment, wait_for_node_log

from fedcoe_flwr.client.private_state import state_checksum, state_paths, version_path
from tools.deploy.deployment import LocalDeployment
from tools.deploy.processes import marked_processes
from tools.deploy.results import metrics_lines, round_lines, run_status


@pytest.mark.timeout(900)
def test_three_tls_authenticated_supernodes_complete_three_fedcoe_rounds(federation):
    dep, status, nodes, why = federation["dep"], federation["status"], federation["nodes"], federation["why"]
    assert status == "finished:completed" and run_status(dep.results_dir) == "finished", why
    lines = metrics_lines(dep.results_dir)
    assert [l["round"] for l in lines] == [3], why
    for line in lines:
        for key in ("global_accuracy", "personalized_accuracy", "coldstart_accuracy"):
            assert isinstance(line[key], float) and 0.0 <= line[key] <= 1.0, (key, line)
    # both training sites every round, and the new site in the round after it was onboarded
    assert [r["replies"] for r in round_lines(dep.results_dir)] == [2, 2, 3]
    assert "Starting Fleet API (gRPC-rere) on 127.0.0.1:" in dep.superlink.log.read_text()  # loopback only, gRPC
    # Flower's view: exactly the registered keys (the new site's too), all online; the unregistered key never got in
    assert set(nodes) == federation["registered"] and len(nodes) == 4, nodes
    assert all(n["status"] == "online" for n in nodes.values()), nodes
    assert dep.database.is_file() and dep.database.stat().st_size > 0  # the SuperLink's state is on disk
    assert federation["leftovers"] == [], "every process the deployment started must be gone"


@pytest.mark.timeout(900)
def test_supernode_with_unregistered_key_is_refused_and_run_completes(federation):
    dep, status, refused, why = federation["dep"], federation["status"], federation["refused"], federation["why"]
    (index, code), = refused.items()
    log = node_log(dep, index)
    assert code not in (None, 0), "the unregistered SuperNode must exit with an error"
    assert "Exit Code: 305" in log and "Failed to activate SuperNode" in log
    assert "No SuperNode found with the given public key" in dep.superlink.log.read_text()
    assert status == "finished:completed" and run_status(dep.results_dir) == "finished", why
    assert "[fedcoe] 3 nodes" in "\n".join(federation["train_lines"])  # the run went on with the registered three


@pytest.mark.timeout(900)
def test_killed_supernode_is_left_out_and_restarted_supernode_gets_its_private_state_back(tmp_path, certs):
    """Two node faults in one run of three training sites (one deployment in place of two).
    Site 1's SuperNode (with its SuperExec and ClientApp: its whole process group) gets SIGKILL as
    soon as round 1's train message reaches it: the SuperLink reports it dead after missed
    heartbeats (about a minute), round 1 aggregates sites 0 and 2, logs site 1 as failed, and the
    run finishes its 2 rounds. Site 0 is stopped (SIGTERM) and started again as soon as round 2's
    train message reaches it, so the old process takes that message with it: the server must
    send it again to the restarted node (it comes back under the same id) rather than wait out
    ``round_timeout``, and round 2 aggregates sites 0 and 2. The restarted site's first use of
    its private parts must come from its state-dir with exactly the values it saved in round 1
    (CRC-32 over the tensors, computed here from the file before the restart)."""
    import signal

    # a round that waited for the lost message would outlast wait_run below
    dep = start_deployment(tmp_path, certs, "faults", num_nodes=4, min_reply_fraction=0.3, round_timeout=900.0)
    try:
        dep.start_run()
        wait_for_node_log(dep, 1, "Receiving: train message", 1, 300)
        os.killpg(os.getpgid(dep.nodes[1].pid), signal.SIGKILL)
        killed_at = time.time()
        folder, journal = state_paths(dep.state_dir(0), "faults", "site-0")
        state_file = version_path(folder, 1)
        # round 1 aggregated: every live site, site 0 included, has sent its train reply
        dep.wait_until(lambda: len(round_lines(dep.results_dir)) >= 1, "round 1's aggregation", 400)
        saved = torch.load(state_file, weights_only=True)
        before = state_checksum(saved["private"])
        assert saved["round"] == 1 and saved["crc"] == before
        old_pid, node_id = dep.nodes[0].pid, dep.node_ids[0]
        wait_for_node_log(dep, 0, "Receiving: train message", 2, 300)  # round 2's, now in site 0's hands
        away, stopped_at = dep.restart_supernode(0)  # returns once Flower lists node_id online again
        assert dep.nodes[0].pid != old_pid
        status = dep.wait_run(timeout=600)
        nodes = dep.node_status()
        why = diagnosis(dep)
    finally:
        dep.stop_all()
    assert status == "finished:completed" and run_status(dep.results_dir) == "finished", why
    assert [l["round"] for l in metrics_lines(dep.results_dir)] == [2]
    rounds = round_lines(dep.results_dir)
    assert rounds[0]["replies"] == 2 and rounds[0]["failed"] == [1], rounds[0]  # site 1 left out, logged
    # the dead node stays out; the restarted one is in: its lost message was sent again
    assert rounds[1]["failed"] == [1] and rounds[1]["replies"] == 2, (rounds[1], why)
    run_log = "\n".join(dep.run_lines)
    assert "client 1" in run_log and "failed or timed out: " in run_log and "; left out" in run_log, why
    assert "Node Unavailable" in run_log, why  # the cause, named
    assert f"node {node_id} came back" in run_log and "sent it again" in run_log, why
    # the restarted site: exactly the private parts it saved, read back from its state-dir
    events = json.loads(journal.read_text())
    after = [e for e in events if e["time"] > stopped_at]
    first = after[0]
    assert first["source"] == "state-dir", events  # the restarted SuperNode had an empty context.state
    assert first["crc_in"] == before, events  # ... and got exactly the saved private parts back
    assert all(e["source"] == "context" for e in after[1:]), events
    # node auth keeps the restarted node's id: the same four ids, no new one; the killed one offline
    assert set(nodes) == set(dep.node_ids.values()) and nodes[node_id]["status"] == "online", nodes
    assert nodes[dep.node_ids[1]]["status"] == "offline", nodes
    assert marked_processes(dep.mark) == [], "every process the deployment started must be gone"
    from datetime import datetime, timezone

    detected = rounds[0]["aggregated_at"] - killed_at
    offline = datetime.strptime(nodes[dep.node_ids[1]]["offline-at"], "%Y-%m-%d %H:%M:%SZ")
    listed = offline.replace(tzinfo=timezone.utc).timestamp() - killed_at
    print(f"measured: SuperNode SIGKILL to round 1 aggregated without it: {detected:.1f}s; "
          f"to `flwr supernode list` offline-at: {listed:.0f}s")
    dep.report(status, {"killed_after_run_start_s": round(killed_at - dep.timings["run_started"], 2),
                        "kill_to_detection_s": round(detected, 2), "kill_to_offline_listed_s": round(listed),
                        "restart_away_s": round(away, 2), "journal_site0": events})


@pytest.mark.timeout(900)
def test_superlink_killed_mid_round_comes_back_from_its_database_and_the_run_resumes(tmp_path, certs, federation):
    """The federation's sites (two training, one cold-start), 2 rounds. Once round 2's train message has reached site 0, the
    SuperLink and everything under it (its SuperExec, the ServerApp) get SIGKILL at once, as in
    a crash of its host. The SuperLink is started again with the same ``--database``, and
    ``flwr run ... resume=true`` continues from the round-1 checkpoint. The SuperNodes are
    never touched: they reconnect by themselves, under the node ids they were registered with.
    The sites, data and training config are the federation's, which was never interrupted: the
    resumed run's server weights and each site's private parts after round 2 must equal that
    run's (its new site joined training only in round 3)."""
    dep = start_deployment(tmp_path, certs, "relink")
    try:
        registered, pids = dict(dep.node_ids), {i: p.pid for i, p in dep.nodes.items()}
        dep.start_run()
        wait_for_node_log(dep, 0, "Receiving: train message", 2, 400)  # round 2 is under way
        dep.kill_superlink()
        assert [r["round"] for r in round_lines(dep.results_dir)] == [1]  # round 2 was never aggregated
        restarted_at = time.time()
        dep.start_superlink()
        dep.start_run(resume=True)
        status = dep.wait_run(timeout=600)
        nodes = dep.node_status()
        alive = {i: p.alive() for i, p in dep.nodes.items()}
        why = diagnosis(dep)
    finally:
        dep.stop_all()
    assert status == "finished:completed" and run_status(dep.results_dir) == "finished", why
    rounds = round_lines(dep.results_dir)
    assert [r["round"] for r in rounds] == [1, 2], rounds  # every round exactly once
    assert [m["round"] for m in metrics_lines(dep.results_dir)] == [2]  # the evaluation exactly once
    assert rounds[1]["replies"] == 2, rounds[1]  # both sites came back and trained the resumed round
    assert all(alive.values()) and {i: p.pid for i, p in dep.nodes.items()} == pids  # never restarted
    # no re-registration: Flower lists exactly the ids given at registration, online
    assert set(nodes) == set(registered.values()) and all(n["status"] == "online" for n in nodes.values()), nodes
    assert_same_state_after_round_2((dep, "relink", dep.results_dir / "final_state.pt"),
                                    (federation["dep"], "tls", federation["dep"].results_dir / "checkpoints" / "round-00002.pt"))
    recovered = rounds[1]["aggregated_at"] - restarted_at
    print(f"measured: SuperLink restart to the first round finished: {recovered:.1f}s")
    dep.report(status, {"restart_to_first_round_s": round(recovered, 2)})


def assert_same_state_after_round_2(*runs: tuple[LocalDeployment, str, Path]) -> None:
    """Server weights (each run's state file of round 2) and every training site's private parts
    of round 2 agree to 1e-6 between runs: the clients compute bit for bit alike; the server's
    weighted sums may add the replies in their order of arrival, which can move the last float bit."""
    final = [torch.load(state_file, weights_only=True) for _, _, state_file in runs]
    assert final[0]["round"] == final[1]["round"] == 2 and final[0]["arrays"].keys() == final[1]["arrays"].keys()
    for key, value in final[0]["arrays"].items():
        assert torch.allclose(value.float(), final[1]["arrays"][key].float(), atol=1e-6), key
    training_sites = [i for i in runs[0][0].nodes if runs[0][0].site_name(i).startswith("site-")]
    assert len(training_sites) == 2, training_sites
    for index in training_sites:
        parts = []
        for dep_run, run, _ in runs:
            folder, _ = state_paths(dep_run.state_dir(index), run, dep_run.site_name(index))
            parts.append(torch.load(version_path(folder, 2), weights_only=True)["private"])
        assert parts[0].keys() == parts[1].keys() and parts[0], (index, list(parts[0]))
        for key, value in parts[0].items():
            assert torch.allclose(value.float(), parts[1][key].float(), atol=1e-6), (index, key)
