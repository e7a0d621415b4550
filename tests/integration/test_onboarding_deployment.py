"""Onboarding over real processes on loopback (TLS): a late joiner gets the cold-start model with
the offline accuracy; serving mode onboards a new site from a finished run's checkpoint."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path
import pytest
import torch
from harness import make_certs
from fedcoe_flwr.server import onboarding as onboard
from fedcoe_flwr.algorithms import get_algorithm
from fedcoe_flwr.algorithms.base import ServerState
from fedcoe_flwr.algorithms.fedcoe.coldstart import coldstart_evaluate
from fedcoe_flwr.data import federation_classes, load_site_data
from tools.deploy.deployment import LocalDeployment
from tools.deploy.processes import marked_processes
from tools.deploy.results import metrics_lines, round_lines, run_status
from fedcoe_flwr.records import tensors_crc
CPU = torch.device("cpu")


# ------------------------------------------------------------------ real processes on loopback (TLS + node auth)
def new_site_folder(global_test: Path, out: Path, start: int, n_train: int, n_test: int) -> Path:
    """A site the federation never saw: images of the global test set (never used for training),
    laid out as train/<class>/* (its unlabeled pool) and test/<class>/* (its labelled test split)."""
    files = sorted(global_test.rglob("*.png"))[start::3][:n_train + n_test]  # every class, disjoint per start
    for i, f in enumerate(files):
        split = "train" if i < n_train else "test"
        dst = out / split / f.parent.name / f.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(f.read_bytes())
    return out


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


@pytest.fixture(scope="module")
def onboard_certs(tmp_path_factory):
    return make_certs(tmp_path_factory.mktemp("certs") / "certs", 5)


@pytest.fixture(scope="module")
def onboard_deployment(tmp_path_factory, onboard_certs):
    """One deployment for every check: 3 SuperNodes (2 training + 1 cold-start site) train; when
    round 2 starts a 4th SuperNode (a new site) joins and is onboarded before round 3 (one
    evaluation, after the last round: an evaluation is three exchanges), then trains in round 3
    (coldstart_join_training). Then every SuperNode is stopped and a serving-mode run onboards
    a 5th new site from the finished run's checkpoint, with no training client present."""
    tmp = tmp_path_factory.mktemp("onboard")
    dep = LocalDeployment(tmp / "onb", num_nodes=3, tls=True, config="configs/smoke.yaml",
                          overrides={"num_rounds": 3, "eval_every": 3, "round_timeout": 300.0, "wait_for_nodes": 120.0,
                                     "min_reply_fraction": 0.5, "run_name": "onb", "coldstart_join_training": True,
                                     "results_dir": str(tmp / "results")},
                          certs=onboard_certs, echo=lambda line: None)
    out: dict = {"dep": dep, "timings": {}}
    try:
        dep.prepare_data()
        site_a = new_site_folder(dep.sites.global_test, tmp / "new-site-a", 0, 40, 30)
        site_b = new_site_folder(dep.sites.global_test, tmp / "new-site-b", 1, 40, 30)
        out.update(site_a=site_a, site_b=site_b)
        dep.make_certs()
        dep.start_superlink()
        dep.register_all()
        dep.start_supernodes()
        dep.start_run()
        # round 1 aggregated: round 2 (training, then its evaluation) is starting
        dep.wait_until(lambda: len(round_lines(dep.results_dir)) >= 1, "round 1's aggregation", 400)
        t0 = time.time()
        out["late"] = dep.add_site(site_a, name="new-site-a")
        out["timings"]["late_online_s"] = time.time() - t0
        out["train_rc"] = dep.wait_run(timeout=600)
        out["train_lines"] = list(dep.run_lines)
        # serving mode: no training client left
        dep.stop_supernodes([index for index, proc in dep.nodes.items() if proc.alive()])
        t0 = time.time()
        dep.start_run(serve_from=str(dep.results_dir), serve_max_nodes=1, serve_timeout=240.0)
        out["served"] = dep.add_site(site_b, name="new-site-b")
        out["serve_rc"] = dep.wait_run(timeout=300)
        out["timings"]["serve_s"] = time.time() - t0
    finally:
        dep.stop_all()
    out["leftovers"] = marked_processes(dep.mark)
    out["registry"] = onboard.read_registry(dep.results_dir)
    return out


@pytest.mark.timeout(900)
def test_onboard_late_joiner_gets_cold_start_model_with_the_offline_accuracy(onboard_deployment):
    o = onboard_deployment
    dep = o["dep"]
    log = "\n".join(o["train_lines"][-60:])
    assert o["train_rc"] == "finished:completed" and run_status(dep.results_dir) == "finished", log
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
    dep.report(o["train_rc"], {"onboard_entries": o["registry"], "onboard_timings": o["timings"]})


@pytest.mark.timeout(900)
def test_onboard_serving_mode_from_checkpoint_with_no_training_client(onboard_deployment):
    o = onboard_deployment
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
