"""Onboarding cold-start sites: the ClientApp's onboarding handler, the package and
the saved model, the privacy check on replies, the Strategy's detection of nodes that join a
running federation, the serving mode, and real SuperLink/SuperNode processes over TLS.
Select with ``pytest -k onboard``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from flwr.app import Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from harness import InProcessGrid, context

from fedcoe_flwr.bundle import load_bundle
from fedcoe_flwr.client.onboarding import handle_onboard
from fedcoe_flwr.server import onboarding as onboard
from fedcoe_flwr.algorithms import get_algorithm
from fedcoe_flwr.algorithms.base import ServerState
from fedcoe_flwr.algorithms.fedcoe.coldstart import coldstart_evaluate
from fedcoe_flwr.data import federation_classes, load_site_data
from tools.deploy.deployment import LocalDeployment
from tools.deploy.processes import marked_processes
from tools.deploy.results import metrics_lines, round_lines, run_status
from tools.deploy.sites import export_sites
from fedcoe_flwr.predict import predict_folder
from fedcoe_flwr.records import (ARRAYS, CONFIG, EXPERIMENT, METRICS, config_record, experiment_record, tensors_crc,
                                 to_array_record)
from fedcoe_flwr.server.callbacks.checkpoint import to_payload
from fedcoe_flwr.server.loop import RoundLoop

ROOT = Path(__file__).resolve().parents[1]
CPU = torch.device("cpu")


@pytest.fixture(autouse=True)
def _task_identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    yield


@pytest.fixture
def sites(make_cfg, tmp_path, fresh_caches):
    """Site folders cut from the tiny generated data set (3 training + 1 cold-start)."""
    cfg = make_cfg()
    folders = export_sites(cfg, tmp_path / "sites")
    return make_cfg(class_names=",".join(folders.class_names), run_name="onb"), folders


def onboard_message(cfg, state, package_round=0) -> tuple[Message, dict]:
    algo = get_algorithm(cfg.algorithm)
    package, pconfig = onboard.coldstart_package(algo, state, cfg)
    config = {**pconfig, "package_round": package_round, "package_crc": tensors_crc(package),
              "run_name": cfg.resolved_run_name}
    content = RecordDict({ARRAYS: to_array_record(package), CONFIG: config_record(config),
                          EXPERIMENT: experiment_record(cfg)})
    return Message(content=content, dst_node_id=11, message_type="query.onboard"), package


# ------------------------------------------------------------------ the node's side
@pytest.mark.parametrize("top_m", [False, True])
def test_onboard_handler_sends_only_row_and_metrics_and_saves_a_working_model(sites, tmp_path, top_m):
    cfg, folders = sites
    cfg = cfg.replace(coldstart_top_m=top_m, top_m=2)
    state = get_algorithm("fedcoe").init_state(cfg, len(folders.class_names))
    msg, package = onboard_message(cfg, state)
    ctx = context({"data-dir": str(folders.coldstart[0]), "cold-start": True, "state-dir": str(tmp_path / "st")})
    reply = handle_onboard(msg, ctx)
    # nothing private moves: no arrays, no config, only the allowed numbers; the row is K floats
    assert len(reply.content.array_records) == 0 and len(reply.content.config_records) == 0
    metrics = dict(reply.content.metric_records[METRICS])
    assert {k for k in metrics if not k.startswith(onboard.ACCURACY_PREFIX)} <= onboard.ALLOWED_METRICS
    row = list(metrics["routing_row"])
    assert len(row) == cfg.num_experts and abs(sum(row) - 1) < 1e-5
    assert onboard.check_reply(metrics, row, cfg.num_experts, 0, 0) is None
    n_test = int(metrics["num_test"])
    assert n_test > 0
    # the reported accuracy is exactly what the package gives offline on the node's data
    data = load_site_data(folders.coldstart[0], cfg, need_train=False)
    offline = coldstart_evaluate(package, data, cfg, len(folders.class_names), CPU)
    assert metrics["coldstart_accuracy"] == offline["coldstart_accuracy"]
    assert metrics["model_accuracy"] == metrics["coldstart_accuracy"]  # the saved model is that model
    # the node kept its routed model in one file, loadable without Flower
    path = tmp_path / "st" / "onb" / "new-site.onboarded.pt"
    assert path.is_file()
    bundle = load_bundle(path)
    assert len(bundle["expert_ids"]) == (2 if top_m else cfg.num_experts)
    rows, acc, _ = predict_folder(path, folders.coldstart[0] / "test")
    assert len(rows) == n_test and acc == pytest.approx(metrics["coldstart_accuracy"], abs=1e-6)  # float32 mean vs exact
    assert json.loads(path.with_name(path.name + ".json").read_text())["routing_row"] == pytest.approx(row)


def test_onboard_unlabeled_folder_reports_row_but_no_accuracy(sites, tmp_path):
    cfg, folders = sites
    flat = tmp_path / "flat"
    flat.mkdir()
    for i, p in enumerate(sorted((folders.coldstart[0]).rglob("*.png"))):
        (flat / f"img{i:03d}.png").write_bytes(p.read_bytes())
    state = get_algorithm("fedcoe").init_state(cfg, len(folders.class_names))
    msg, _ = onboard_message(cfg, state)
    ctx = context({"data-dir": str(flat), "cold-start": True, "model-path": str(tmp_path / "m.pt")})
    metrics = dict(handle_onboard(msg, ctx).content.metric_records[METRICS])
    assert "coldstart_accuracy" not in metrics and metrics["num_test"] == 0 and len(metrics["routing_row"]) == 3
    out = tmp_path / "pred.csv"
    proc = subprocess.run([sys.executable, "-m", "fedcoe_flwr.predict", "--model", str(tmp_path / "m.pt"),
                           "--images", str(flat), "--out", str(out)], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert len(proc.stdout.splitlines()) == len(list(flat.iterdir()))  # one line per image
    assert out.read_text().splitlines()[0] == "path,class,probability"


def test_onboard_fedavg_package_is_the_global_model(sites, tmp_path):
    cfg, folders = sites
    cfg = cfg.replace(algorithm="fedavg")
    state = get_algorithm("fedavg").init_state(cfg, len(folders.class_names))
    msg, _ = onboard_message(cfg, state)
    ctx = context({"data-dir": str(folders.coldstart[0]), "cold-start": True, "model-path": str(tmp_path / "m.pt")})
    metrics = dict(handle_onboard(msg, ctx).content.metric_records[METRICS])
    assert "routing_row" not in metrics and metrics["model_accuracy"] == metrics["coldstart_accuracy"]
    assert onboard.check_reply(metrics, None, None, 0, 0) is None


@pytest.mark.parametrize("metrics, row, arrays, configs, match", [
    ({"routing_row": [0.5, 0.5, 0.0]}, [0.5, 0.5, 0.0], 1, 0, "array"),
    ({"routing_row": [0.5, 0.5, 0.0], "labels": [1.0]}, [0.5, 0.5, 0.0], 0, 0, "labels"),
    ({"routing_row": [0.5, 0.5]}, [0.5, 0.5], 0, 0, "3 floats"),
    ({"routing_row": [0.9, 0.5, 0.0]}, [0.9, 0.5, 0.0], 0, 0, "probability"),
])
def test_onboard_reply_with_more_than_row_and_metrics_is_refused(metrics, row, arrays, configs, match):
    assert match in onboard.check_reply(metrics, row, 3, arrays, configs)


# ------------------------------------------------------------------ the server's side, in process
def test_onboard_strategy_detects_a_joining_node_and_lets_it_train(sites, tmp_path):
    """3 training + 1 cold-start site train one round; a new site appears; it is onboarded with
    the package of the current state (registry line), then trains the next round as a new client."""
    cfg, folders = sites
    cfg = cfg.replace(results_dir=str(tmp_path / "results"), num_rounds=2, eval_every=1, coldstart_join_training=True)
    nodes = {100 + i: {"data-dir": str(folders.training[i]), "site-id": i} for i in range(3)}
    nodes[103] = {"data-dir": str(folders.coldstart[0]), "site-id": 0, "cold-start": True}
    grid = InProcessGrid(nodes)
    strategy = RoundLoop(cfg)
    strategy.nodes.discover(grid)
    replies = grid.send_and_receive(list(strategy.configure_train(1)))
    strategy.aggregate_train(1, replies)
    strategy.round = 1
    # a new site joins: the folder of training site 0 (it has train/ images), no site-id
    grid.contexts[200] = context({"data-dir": str(folders.training[0]), "cold-start": True,
                                  "site-name": "hospital-x", "state-dir": str(tmp_path / "x")}, node_id=200)
    entries = strategy.check_new_nodes(grid, strategy.round, "before round 2")
    (entry,) = entries
    assert entry["status"] == "onboarded" and entry["node_id"] == 200 and entry["joined_as_client"] == 4
    assert entry["package_crc"] == tensors_crc(onboard.coldstart_package(strategy.algorithm, strategy.state,
                                                                               cfg)[0])
    # what came back: no array or config record, only the routing row and the metrics
    assert entry["reply_records"] == {"arrays": [], "configs": [],
                                      "metrics": sorted([*entry["metrics"], "routing_row"])}
    assert entry["profile"]["partition-id"] == -1 and entry["profile"]["site"] == "hospital-x"
    assert onboard.read_registry(strategy.run_dir.path) == [entry]
    assert strategy.check_new_nodes(grid, 1, "again") == []  # known now
    msgs = list(strategy.configure_train(2))
    assert sorted(m.metadata.dst_node_id for m in msgs) == [100, 101, 102, 200]
    strategy.aggregate_train(2, grid.send_and_receive(msgs))
    assert strategy.round_log[-1]["replies"] == 4 and strategy.state.extra["correlation_known"][4]
    evals = list(strategy.evaluator.personalised_messages(strategy.state, 2, strategy.has_trained))
    assert 200 in [m.metadata.dst_node_id for m in evals]


def test_onboard_serving_mode_from_a_checkpoint_needs_no_training_client(sites, tmp_path):
    from fedcoe_flwr.server.onboarding import serve

    cfg, folders = sites
    run_dir = tmp_path / "results" / "onb"
    (run_dir / "checkpoints").mkdir(parents=True)
    state = get_algorithm("fedcoe").init_state(cfg, len(folders.class_names))
    torch.save(to_payload({"round": 3, "arrays": state.arrays, "extra": state.extra, "config": cfg.to_dict()}),
               run_dir / "final_state.pt")
    grid = InProcessGrid({300: {"data-dir": str(folders.coldstart[0]), "cold-start": True,
                                "model-path": str(tmp_path / "node" / "model.pt")}})
    serving = cfg.replace(serve_from=str(run_dir), serve_max_nodes=1, serve_timeout=60.0, model="cnn",
                          dataset="cifar10", class_names="")  # model keys come from the checkpoint
    (entry,) = serve(grid, serving)
    assert entry["mode"] == "serve" and entry["package_round"] == 3
    assert [m.metadata.message_type for m in grid.sent] == ["query.onboard"]
    data = load_site_data(folders.coldstart[0], cfg, need_train=False)
    offline = coldstart_evaluate(state.arrays, data, cfg, len(folders.class_names), CPU)
    assert entry["metrics"]["coldstart_accuracy"] == offline["coldstart_accuracy"]
    assert onboard.read_registry(run_dir)[0]["node_id"] == 300
    assert (tmp_path / "node" / "model.pt").is_file()


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
    out = tmp_path_factory.mktemp("certs") / "certs"
    subprocess.run(["bash", str(ROOT / "scripts" / "make_certs.sh"), str(out), "5"], check=True,
                   env={**os.environ, "CERT_RSA_BITS": "2048"}, capture_output=True, timeout=120)
    return out


@pytest.fixture(scope="module")
def onboard_deployment(tmp_path_factory, onboard_certs):
    """One deployment for every check: 3 SuperNodes (2 training + 1 cold-start site) train; when
    round 2 starts a 4th SuperNode (a new site) joins and is onboarded, then trains in round 3
    (coldstart_join_training). Then every SuperNode is stopped and a serving-mode run onboards
    a 5th new site from the finished run's checkpoint, with no training client present."""
    tmp = tmp_path_factory.mktemp("onboard")
    dep = LocalDeployment(tmp / "onb", num_nodes=3, tls=True, config="configs/smoke.yaml",
                          overrides={"num_rounds": 3, "round_timeout": 300.0, "wait_for_nodes": 120.0,
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
        # round 1 evaluated: round 2 is starting
        dep.wait_until(lambda: len(metrics_lines(dep.results_dir)) >= 1, "round 1's evaluation", 400)
        t0 = time.time()
        out["late"] = dep.add_site(site_a, name="new-site-a")
        out["timings"]["late_online_s"] = time.time() - t0
        out["train_rc"] = dep.wait_run(timeout=600)
        out["train_lines"] = list(dep.run_lines)
        # serving mode: no training client left
        for index in list(dep.nodes):
            if dep.nodes[index].alive():
                dep.stop_supernode(index)
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


@pytest.mark.slow
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
    assert [l["round"] for l in metrics_lines(dep.results_dir)] == [1, 2, 3]
    assert dep.onboarded_model(o["late"]).is_file()
    dep.report(o["train_rc"], {"onboard_entries": o["registry"], "onboard_timings": o["timings"]})


@pytest.mark.slow
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
