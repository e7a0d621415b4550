"""Onboarding new sites in process: the node's handler sends only its routing row and numbers
and saves a working model, the server refuses a reply that carries more, a node that joins
during training is onboarded and trains, serving mode onboards from a checkpoint."""

from __future__ import annotations

import json
import subprocess
import sys
import pytest
import torch
from flwr.app import Message, RecordDict
from harness import InProcessGrid, context
from fedcoe_flwr.bundle import load_bundle
from fedcoe_flwr.client.onboarding import handle_onboard
from fedcoe_flwr.server import onboarding as onboard
from fedcoe_flwr.algorithms import get_algorithm
from fedcoe_flwr.algorithms.adaptation import TRAIN_PRIOR_KEY, Calibration, calibration_of
from fedcoe_flwr.algorithms.fedcoe.coldstart import coldstart_evaluate
from fedcoe_flwr.data import load_site_data
from tools.deploy.sites import export_sites
from fedcoe_flwr.predict import predict_folder
from fedcoe_flwr.records import (ARRAYS, CONFIG, EXPERIMENT, METRICS, config_record, experiment_record, tensors_crc,
                                 to_array_record)
from fedcoe_flwr.server.callbacks.checkpoint import to_payload
from fedcoe_flwr.server.loop import RoundLoop
CPU = torch.device("cpu")


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
    strategy.evaluate(grid, 1)  # its predicted training prior goes with the package to a new site
    predicted = strategy.history[-1]["predicted_train_prior"]
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
    (package_msg,) = [m for m in grid.sent if m.metadata.message_type == "query.onboard"]
    assert list(package_msg.content.config_records[CONFIG][TRAIN_PRIOR_KEY]) == pytest.approx(predicted)
    # ... with the evaluation's temperature and the prior at it: the new site's em_calibrated
    record, sent = strategy.history[-1], calibration_of(package_msg.content.config_records[CONFIG])
    assert sent.temperature == record["coldstart_temperature"]
    assert sent.prior.tolist() == pytest.approx(record["coldstart_calibrated_prior"], abs=1e-4)
    assert 0.0 <= entry["metrics"]["coldstart_accuracy_em_calibrated"] <= 1.0
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
    # the newest evaluation's predicted training prior (not the package's own): the new node's EM starts there
    skewed = [0.7] + [0.3 / (len(folders.class_names) - 1)] * (len(folders.class_names) - 1)
    flat = [1 / len(folders.class_names)] * len(folders.class_names)
    history = [{"round": 2, "predicted_train_prior": [0.25] * 4, "coldstart_temperature": 2.0,
                "coldstart_calibrated_prior": flat},
               {"round": 3, "predicted_train_prior": skewed, "coldstart_temperature": 1.5,
                "coldstart_calibrated_prior": skewed}]
    torch.save(to_payload({"round": 3, "arrays": state.arrays, "extra": state.extra, "config": cfg.to_dict(),
                           "history": history}), run_dir / "final_state.pt")
    grid = InProcessGrid({300: {"data-dir": str(folders.coldstart[0]), "cold-start": True,
                                "model-path": str(tmp_path / "node" / "model.pt")}})
    serving = cfg.replace(serve_from=str(run_dir), serve_max_nodes=1, serve_timeout=60.0, model="cnn",
                          dataset="cifar10", class_names="")  # model keys come from the checkpoint
    (entry,) = serve(grid, serving)
    assert entry["mode"] == "serve" and entry["package_round"] == 3
    assert [m.metadata.message_type for m in grid.sent] == ["query.onboard"]
    assert list(grid.sent[0].content.config_records[CONFIG][TRAIN_PRIOR_KEY]) == pytest.approx(skewed)
    data = load_site_data(folders.coldstart[0], cfg, need_train=False)
    calibration = Calibration(1.5, torch.tensor(skewed))
    assert calibration_of(grid.sent[0].content.config_records[CONFIG]).temperature == 1.5  # the newest
    offline = coldstart_evaluate(state.arrays, data, cfg, len(folders.class_names), CPU, torch.tensor(skewed),
                                 calibration)
    assert entry["metrics"]["coldstart_accuracy"] == offline["coldstart_accuracy"]
    assert entry["metrics"]["coldstart_accuracy_em_calibrated"] == offline["coldstart_accuracy_em_calibrated"]
    assert entry["metrics"]["coldstart_accuracy"] == entry["metrics"]["coldstart_accuracy_em"]
    assert onboard.read_registry(run_dir)[0]["node_id"] == 300
    assert (tmp_path / "node" / "model.pt").is_file()
