"""Onboarding over real processes on loopback (TLS), in the shared trained federation
(conftest.federation): a late joiner gets the cold-start model with the offline accuracy;
serving mode onboards a new site from a finished run's checkpoint."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fedcoe_flwr.algorithms import get_algorithm
from fedcoe_flwr.algorithms.base import ServerState
from fedcoe_flwr.algorithms.fedcoe.coldstart import coldstart_evaluate
from fedcoe_flwr.data import federation_classes, load_site_data
from fedcoe_flwr.records import tensors_crc
from fedcoe_flwr.server import onboarding as onboard
from tools.deploy.results import metrics_lines, round_lines, run_status

CPU = torch.device("cpu")


def offline_coldstart(checkpoint: Path, folder: Path) -> dict:
    """What the package in ``checkpoint`` gives on ``folder``'s data, computed here."""
    from fedcoe_flwr.config import from_dict

    payload = torch.load(checkpoint, weights_only=False)
    cfg = from_dict(payload["config"])
    algo = get_algorithm(cfg.algorithm)
    package, _ = onboard.coldstart_package(algo, ServerState(payload["arrays"], payload["extra"]), cfg)
    data = load_site_data(folder, cfg, need_train=False)
    return {"crc": tensors_crc(package),
            **coldstart_evaluate(package, data, cfg, len(federation_classes(cfg)), CPU)}


@pytest.mark.timeout(900)
def test_onboard_late_joiner_gets_cold_start_model_with_the_offline_accuracy(federation):
    o = federation
    dep = o["dep"]
    log = "\n".join(o["train_lines"][-60:])
    assert o["status"] == "finished:completed" and run_status(dep.results_dir) == "finished", log
    late = [e for e in o["registry"] if e["mode"] == "training"]
    assert len(late) == 1, o["registry"]
    entry = late[0]
    assert entry["status"] == "onboarded" and entry["node_id"] == dep.node_ids[o["late"]], entry
    assert entry["package_round"] == 2, entry  # joined after 2 training rounds
    assert entry["profile"]["site"] == "new-site-a" and entry["profile"]["partition-id"] == -1
    # the same package, evaluated here on the node's data, gives the same number it reported
    offline = offline_coldstart(dep.results_dir / "checkpoints" / "round-00002.pt", o["site_a"])
    assert entry["package_crc"] == offline["crc"]
    assert entry["metrics"]["coldstart_accuracy"] == offline["coldstart_accuracy"], (entry, offline)
    assert entry["routing_row"] == pytest.approx(offline["routing_row"], abs=1e-6)
    # only the routing row and metrics came back over gRPC
    assert entry["reply_records"]["arrays"] == [] and entry["reply_records"]["configs"] == []
    assert {k for k in entry["reply_records"]["metrics"] if not k.startswith(onboard.ACCURACY_PREFIX)} <= onboard.ALLOWED_METRICS
    assert len(entry["routing_row"]) == 3 and entry["reply_payload_bytes"] < 2000
    # coldstart_join_training: it trained in round 3 as a 3rd client
    rounds = round_lines(dep.results_dir)
    assert [r["replies"] for r in rounds] == [2, 2, 3], rounds
    assert entry["joined_as_client"] == 3
    assert [l["round"] for l in metrics_lines(dep.results_dir)] == [3]
    assert dep.onboarded_model(o["late"]).is_file()
    dep.report(o["status"], {"onboard_entries": o["registry"], "onboard_timings": o["timings"]})


@pytest.mark.timeout(900)
def test_onboard_serving_mode_from_checkpoint_with_no_training_client(federation):
    o = federation
    dep = o["dep"]
    assert o["serve_rc"] == "finished:completed", "\n".join(dep.run_lines[-40:])
    served = [e for e in o["registry"] if e["mode"] == "serve"]
    assert len(served) == 1, o["registry"]
    entry = served[0]
    assert entry["status"] == "onboarded" and entry["node_id"] == dep.node_ids[o["served"]]
    assert entry["package_round"] == 3
    offline = offline_coldstart(dep.results_dir / "final_state.pt", o["site_b"])
    assert entry["package_crc"] == offline["crc"]
    assert entry["metrics"]["coldstart_accuracy"] == offline["coldstart_accuracy"], (entry, offline)
    # no training client was online: the serving run sent nothing but the onboarding message
    assert all(not dep.nodes[i].alive() for i in range(3))
    assert any("[serve] onboarding new sites" in line for line in dep.run_lines)
    # the node's saved model works without Flower: the prediction command on its images
    model = dep.onboarded_model(o["served"])
    proc = subprocess.run([sys.executable, "-m", "fedcoe_flwr.predict", "--model", str(model),
                           "--images", str(o["site_b"] / "test")], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    images = sorted((o["site_b"] / "test").rglob("*.png"))
    assert images and len(proc.stdout.splitlines()) == len(images)  # one prediction per image
    acc = float(proc.stderr.split("accuracy on images in class folders: ")[1].split()[0])
    assert acc == pytest.approx(entry["metrics"]["coldstart_accuracy"], abs=1e-4)
    assert o["leftovers"] == [], "every process the deployment started must be gone"
