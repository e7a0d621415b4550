"""Reliability: poisoned updates rejected, failing clients left out, kill-and-resume
identical to an uninterrupted run, robust aggregation, invalid configs named.
Select with -k reject / nan / resume / invalid."""

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.supercore.task_identity import TaskIdentity
from hypothesis import given, settings
from hypothesis import strategies as st

from fedcoe_flwr.client import handlers as client
from fedcoe_flwr.algorithms.training import weighted_average
from fedcoe_flwr.config import ConfigError, ExperimentConfig, from_dict, load_config
from fedcoe_flwr.records import ARRAYS, METRICS, metric_record, to_array_record
from fedcoe_flwr.server.callbacks.checkpoint import CheckpointError, load_checkpoint
from fedcoe_flwr.server.loop import RoundLoop
from fedcoe_flwr.server.nodes import FederationError

ROOT = Path(__file__).resolve().parents[1]


def tiny_cfg(tmp_path: Path, **kw) -> ExperimentConfig:
    base = dict(dataset="synthetic", synthetic_train_size=300, synthetic_test_size=60, image_size=16,
                num_clients=4, num_coldstart_clients=1, partition="iid", model="cnn", width_multiplier=0.25,
                num_experts=3, gate_width=4, local_epochs=1, batch_size=16, results_dir=str(tmp_path),
                cache_dir=str(tmp_path / "cache"), run_name="rel")
    base.update(kw)
    return from_dict(base)


def make_strategy(cfg: ExperimentConfig) -> RoundLoop:
    strategy = RoundLoop(cfg)
    strategy.nodes.node_of = {c: 100 + c for c in range(cfg.num_partitions)}
    return strategy


def fake_replies(strategy: RoundLoop, server_round: int, poison: dict[int, str] | None = None) -> list[Message]:
    """Messages as the ClientApp would send them, from the real client update."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    msgs = list(strategy.configure_train(server_round))
    replies = []
    for msg in msgs:
        c = msg.metadata.dst_node_id - 100
        node, payload, pconfig = strategy._sent[c]
        expected = strategy.algorithm.expected_upload(payload, pconfig, strategy.cfg)
        arrays = {k: v.clone() for k, v in payload.items() if k in expected}  # read-only keys are not sent back
        for key, (shape, dtype) in expected.items():
            if key not in arrays:  # FedCoE's correlation row and class marginal: probability vectors
                arrays[key] = torch.full(shape, 1.0 / shape[0], dtype=dtype)
        first = next(k for k, v in arrays.items() if v.is_floating_point() and v.numel() > 1)
        arrays[first] = arrays[first] + 0.01 * (c + 1)  # a genuine, client-specific update
        metrics = {"num_samples": 10 + c, "train_loss": 1.0}
        kind = (poison or {}).get(c)
        if kind == "nan":
            arrays[first][0] = float("nan")
        elif kind == "inf":
            arrays[first][0] = float("inf")
        elif kind == "shape":
            arrays[first] = arrays[first][:1]
        elif kind == "norm":
            arrays[first] = arrays[first] * 1e6
        elif kind == "samples":
            metrics["num_samples"] = 0
        TaskIdentity.node_id = node
        replies.append(Message(content=RecordDict({ARRAYS: to_array_record(arrays), METRICS: metric_record(metrics)}),
                               reply_to=msg))
    return replies


@pytest.mark.parametrize("algorithm", ["fedcoe", "fedavg"])
@pytest.mark.parametrize("kind", ["nan", "inf", "shape", "norm", "samples"])
def test_reject_poisoned_update_nan_inf_shape_norm(tmp_path, algorithm, kind):
    """A bad reply is rejected and logged; the aggregate equals the one without it."""
    cfg = tiny_cfg(tmp_path, algorithm=algorithm)
    clean, poisoned = make_strategy(cfg), make_strategy(cfg.replace(run_name="rel2"))
    clean_replies = fake_replies(clean, 1)
    poisoned_replies = fake_replies(poisoned, 1, poison={2: kind})
    # the clean run simply never hears from client 2
    clean.aggregate_train(1, [r for r in clean_replies if r.metadata.src_node_id != 102])
    poisoned.aggregate_train(1, poisoned_replies)
    assert poisoned.round_log[-1]["rejected"] == [2]
    assert poisoned.round_log[-1]["replies"] == cfg.num_clients - 1
    for key, value in clean.state.arrays.items():
        assert torch.equal(value, poisoned.state.arrays[key]), key


def test_reject_too_many_bad_replies_stops_with_clear_error(tmp_path):
    cfg = tiny_cfg(tmp_path, algorithm="fedavg", min_reply_fraction=0.75)
    strategy = make_strategy(cfg)
    before = {k: v.clone() for k, v in strategy.state.arrays.items()}
    with pytest.raises(FederationError, match="min_reply_fraction"):
        strategy.aggregate_train(1, fake_replies(strategy, 1, poison={0: "nan", 1: "shape"}))
    assert all(torch.equal(before[k], v) for k, v in strategy.state.arrays.items())  # nothing half-applied


def test_resume_restores_state_tensors_exactly(tmp_path):
    cfg = tiny_cfg(tmp_path, algorithm="fedcoe")
    strategy = make_strategy(cfg)
    strategy.aggregate_train(1, fake_replies(strategy, 1))
    strategy.round = 1
    path = strategy.checkpoints.save(strategy.checkpoint_payload(), 1)
    resumed = make_strategy(cfg.replace(resume=True))
    resumed.restore(load_checkpoint(path))
    assert resumed.round == 1
    assert set(resumed.state.arrays) == set(strategy.state.arrays)
    for key, value in strategy.state.arrays.items():
        assert torch.equal(value, resumed.state.arrays[key]), key
    np.testing.assert_array_equal(resumed.state.extra["correlation"], strategy.state.extra["correlation"])
    assert resumed.rng.random() == strategy.rng.random()  # client sampling continues identically
    assert resumed.comm == strategy.comm


def test_resume_refuses_a_checkpoint_of_another_model(tmp_path):
    cfg = tiny_cfg(tmp_path, algorithm="fedcoe")
    strategy = make_strategy(cfg)
    payload = strategy.checkpoint_payload()
    with pytest.raises(FederationError, match="num_experts"):
        make_strategy(cfg.replace(num_experts=4, resume=True)).restore(payload)


@pytest.mark.parametrize("key,value", [("train_subset", 120), ("test_fraction", 0.3), ("min_partition_size", 2),
                                       ("classes_per_client", 3), ("aux_weight", 1.0)])
def test_resume_refuses_other_partitions_or_method_parameters(tmp_path, key, value):
    """The data section and the method's parameters are compared whole: another partition
    would silently train other clients' data."""
    cfg = tiny_cfg(tmp_path, algorithm="fedcoe")
    payload = make_strategy(cfg).checkpoint_payload()
    with pytest.raises(FederationError, match=f"{key}="):
        make_strategy(cfg.replace(resume=True, **{key: value})).restore(payload)


def test_resume_with_no_checkpoint_names_the_runs_that_have_one(tmp_path):
    cfg = tiny_cfg(tmp_path, algorithm="fedavg")
    strategy = make_strategy(cfg)
    strategy.checkpoints.save(strategy.checkpoint_payload(), 1)
    other = make_strategy(cfg.replace(run_name="typo", resume=True))
    with pytest.raises(CheckpointError, match="typo.*has no checkpoint.*rel"):
        other.resume_point()


def test_resume_skips_a_corrupt_checkpoint_and_names_it(tmp_path):
    cfg = tiny_cfg(tmp_path, algorithm="fedavg")
    strategy = make_strategy(cfg)
    strategy.round = 1
    strategy.checkpoints.save(strategy.checkpoint_payload(), 1)
    strategy.round = 2
    bad = strategy.checkpoints.save(strategy.checkpoint_payload(), 2)
    bad.write_bytes(bad.read_bytes()[:100])  # truncated
    resumed = make_strategy(cfg.replace(resume=True))
    resumed.resume_point()
    assert resumed.round == 1
    with pytest.raises(CheckpointError, match="round-00002.pt"):
        load_checkpoint(bad)


@pytest.mark.parametrize("name", [".", "..", "../x", "/abs/path", "a/b"])
def test_run_name_must_be_a_plain_name(tmp_path, name):
    with pytest.raises(ConfigError, match="run_name"):
        tiny_cfg(tmp_path, run_name=name)



def test_resume_takes_a_key_newer_than_the_checkpoint_at_its_default(tmp_path):
    cfg = tiny_cfg(tmp_path, algorithm="fedcoe")
    payload = make_strategy(cfg).checkpoint_payload()
    del payload["config"]["cnn_hidden"]  # a checkpoint written before the key existed
    make_strategy(cfg.replace(resume=True)).restore(payload)  # saved at the default (0): resumes
    with pytest.raises(FederationError, match="checkpoint has cnn_hidden=0, this run has cnn_hidden=64"):
        make_strategy(cfg.replace(cnn_hidden=64, resume=True)).restore(payload)


def test_resume_takes_a_key_that_changed_behaviour_as_the_checkpoint_ran(tmp_path):
    """A checkpoint from before gate_input existed ran a gate over the image, not today's default."""
    cfg = tiny_cfg(tmp_path, algorithm="fedcoe", gate_input="image")
    payload = make_strategy(cfg).checkpoint_payload()
    del payload["config"]["gate_input"]
    make_strategy(cfg.replace(resume=True)).restore(payload)
    with pytest.raises(FederationError, match="checkpoint has gate_input='image', this run has gate_input='trunk'"):
        make_strategy(cfg.replace(gate_input="trunk", resume=True)).restore(payload)


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


@pytest.mark.slow
def test_resume_after_kill_matches_uninterrupted_run(tmp_path):
    """FedAvg has no client-private state, so a run killed after round 2 and resumed
    must end with exactly the state of a run that was never interrupted."""
    common = dict(algorithm="fedavg", num_rounds=3, eval_every=3)
    full = simulate(tmp_path / "full", **common)
    # "killed" after round 2: a run that stopped there, then the same run resumed
    simulate(tmp_path / "resumed", **{**common, "num_rounds": 2})
    resumed = simulate(tmp_path / "resumed", **{**common, "resume": True})
    a = torch.load(full / "final_state.pt", weights_only=False)
    b = torch.load(resumed / "final_state.pt", weights_only=False)
    assert a["round"] == b["round"] == 3
    for key, value in a["arrays"].items():
        assert torch.allclose(value.float(), b["arrays"][key].float(), atol=1e-6), key
    rounds = [json.loads(l)["round"] for l in (resumed / "rounds.jsonl").read_text().splitlines()]
    assert rounds == [1, 2, 3]  # no round repeated or skipped


def failing_client_app(kind: str) -> ClientApp:
    """The real ClientApp, except that partition 1 misbehaves in round 2."""
    app = ClientApp()

    @app.query("profile")
    def profile(msg, context):
        return client.handle_profile(msg, context)

    @app.train()
    def train(msg, context):
        reply = client.handle_train(msg, context)
        if int(context.node_config["partition-id"]) == 1 and msg.content["config"]["server_round"] == 2:
            if kind == "raise":
                raise RuntimeError("injected failure")
            arrays = reply.content.array_records[ARRAYS]
            key = next(iter(arrays))
            t = arrays[key].numpy().copy()
            t.flat[0] = np.nan
            from flwr.app import Array
            arrays[key] = Array(t)
        return reply

    @app.evaluate()
    def evaluate(msg, context):
        return client.handle_evaluate(msg, context)

    @app.evaluate("coldstart")
    def coldstart(msg, context):
        return client.handle_coldstart(msg, context)

    return app


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["raise", "nan"])
def test_reject_failing_or_nan_client_round_still_completes(tmp_path, kind):
    out = simulate(tmp_path, client_app=failing_client_app(kind))
    rounds = [json.loads(l) for l in (out / "rounds.jsonl").read_text().splitlines()]
    assert rounds[0]["replies"] == 4 and rounds[0]["failed"] == [] and rounds[0]["rejected"] == []
    if kind == "raise":
        assert rounds[1]["failed"] == [1]
    else:
        assert rounds[1]["rejected"] == [1]
    assert rounds[1]["replies"] == 3
    assert json.loads((out / "summary.json").read_text())["status"] == "finished"
    state = torch.load(out / "final_state.pt", weights_only=False)
    assert all(torch.isfinite(v).all() for v in state["arrays"].values() if v.is_floating_point())


# ------------------------------------------------------------------ robust aggregation
def test_robust_median_and_trimmed_mean_ignore_an_outlier():
    states = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([1.2, 2.2])},
              {"w": torch.tensor([0.8, 1.8])}, {"w": torch.tensor([1e6, -1e6])}, {"w": torch.tensor([1.0, 2.0])}]
    median = weighted_average(states, [1] * 5, "median")["w"]
    trimmed = weighted_average(states, [1] * 5, "trimmed_mean", 0.2)["w"]
    assert torch.allclose(median, torch.tensor([1.0, 2.0]))
    assert torch.allclose(trimmed, torch.tensor([(1.0 + 1.2 + 1.0) / 3, (2.0 + 2.0 + 1.8) / 3]))
    assert weighted_average(states, [1] * 5)["w"][0] > 1e5  # the plain mean is not robust


@settings(max_examples=40, deadline=None)
@given(weights=st.lists(st.floats(0.1, 100), min_size=1, max_size=6), seed=st.integers(0, 1000))
def test_aggregation_properties_identical_updates_and_permutation(weights, seed):
    gen = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(4, generator=gen), "n": torch.tensor(3)}
    # identical updates leave the model unchanged, whatever the weights
    same = weighted_average([base] * len(weights), weights)
    assert torch.allclose(same["w"], base["w"], atol=1e-6) and same["n"] == 3
    states = [{"w": torch.randn(4, generator=gen), "n": torch.tensor(i)} for i in range(len(weights))]
    order = np.random.default_rng(seed).permutation(len(weights))
    a = weighted_average(states, weights)
    b = weighted_average([states[i] for i in order], [weights[i] for i in order])
    assert torch.allclose(a["w"], b["w"], atol=1e-6)
    for method in ("median", "trimmed_mean"):
        m1 = weighted_average(states, weights, method, 0.2)["w"]
        m2 = weighted_average([states[i] for i in order], [weights[i] for i in order], method, 0.2)["w"]
        assert torch.allclose(m1, m2, atol=1e-6)


# ------------------------------------------------------------------ invalid input
def test_invalid_yaml_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_rounds: [1, 2\nalgorithm: fedcoe\n")
    with pytest.raises(ConfigError, match="bad.yaml.*not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize("text, match", [
    ("num_roundz: 3\n", "unknown config key.*num_roundz"),
    ("num_rounds: three\n", "'num_rounds' must be a int.*three"),
    ("algorithm: fedsgd\n", "'algorithm' = 'fedsgd'"),
    ("robust_aggregation: mode\n", "'robust_aggregation' = 'mode'"),
    ("num_experts: 0\n", "'num_experts' = 0"),
    ("- a\n- b\n", "mapping"),
])
def test_invalid_config_values_are_named(tmp_path, text, match):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(path)


# ------------------------------------------------------------------ properties: partitioner and correlation shares
@settings(max_examples=15, deadline=None)
@given(partition=st.sampled_from(["dirichlet", "iid", "pathological"]), alpha=st.floats(0.05, 5.0),
       num_clients=st.integers(2, 6), num_coldstart=st.integers(1, 3), seed=st.integers(0, 10_000))
def test_partitioner_properties_disjoint_deterministic_split(partition, alpha, num_clients, num_coldstart, seed):
    """Whatever the partition, skew, client count and seed: clients never share an index, the
    same seed gives the same partition, and every client's local split is disjoint and non-empty."""
    from fedcoe_flwr import data as data_mod
    from fedcoe_flwr.config import from_dict

    num_coldstart = min(num_coldstart, num_clients)  # more cold-start clients than clients is a config error
    cfg = from_dict({"dataset": "synthetic", "synthetic_train_size": 400, "synthetic_test_size": 40,
                     "synthetic_num_classes": 4, "image_size": 8, "num_clients": num_clients,
                     "num_coldstart_clients": num_coldstart, "partition": partition, "dirichlet_alpha": alpha,
                     "classes_per_client": 2, "min_partition_size": 10, "seed": seed, "model": "cnn"})
    try:
        splits = data_mod.client_splits(cfg)
    except data_mod.DataError as err:  # an impossible draw must be refused by name, never hang or overlap
        assert "min_partition_size" in str(err) or "client" in str(err), err
        return
    everything = np.concatenate([np.concatenate([tr, te]) for tr, te in splits])
    assert len(splits) == num_clients + num_coldstart
    assert len(np.unique(everything)) == len(everything) and everything.max() < 400
    for tr, te in splits:
        assert len(tr) > 0 and not set(tr.tolist()) & set(te.tolist())
    data_mod._client_splits_cached.cache_clear()
    again = data_mod.client_splits(cfg)
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(splits, again))


@settings(max_examples=60, deadline=None)
@given(num_samples=st.lists(st.integers(1, 500), min_size=1, max_size=8), seed=st.integers(0, 10_000),
       smoothing=st.floats(0.0, 1.0), cap=st.floats(0.05, 1.0), weighting=st.booleans())
def test_correlation_shares_sum_to_one_respect_the_cap_and_ignore_order(num_samples, seed, smoothing, cap,
                                                                        weighting):
    from fedcoe_flwr.algorithms.fedcoe.aggregation import expert_weights
    from fedcoe_flwr.config import from_dict

    cfg = from_dict({"correlation_weighting": weighting, "correlation_smoothing": smoothing,
                     "correlation_cap": cap, "num_experts": 3})
    rng = np.random.default_rng(seed)
    corr = rng.dirichlet(np.ones(3), size=len(num_samples))
    n = np.array(num_samples)
    for k in range(3):
        shares = expert_weights(n, corr, k, cfg)
        assert np.all(shares >= 0) and abs(shares.sum() - 1.0) < 1e-9
        if weighting:
            assert shares.max() <= max(cap, 1.0 / len(n)) + 1e-9  # no client owns an expert
        order = rng.permutation(len(n))
        np.testing.assert_allclose(expert_weights(n[order], corr[order], k, cfg), shares[order], atol=1e-9)


def test_invalid_partition_is_refused_before_training_with_the_keys_to_change(tmp_path):
    """flwr-datasets gives up on an impossible Dirichlet draw; the server finds that out
    before round 1 (check_partitions) and names the keys, instead of every client failing."""
    from fedcoe_flwr.config import from_dict
    from fedcoe_flwr.data import DataError
    from fedcoe_flwr.server.run import check_partitions

    cfg = from_dict({"dataset": "synthetic", "synthetic_train_size": 300, "synthetic_num_classes": 4,
                     "image_size": 8, "num_clients": 8, "num_coldstart_clients": 2, "partition": "dirichlet",
                     "dirichlet_alpha": 0.05, "min_partition_size": 25, "cache_dir": str(tmp_path)})
    with pytest.raises(DataError, match=r"min_partition_size \(25\).*dirichlet_alpha \(0.05\)"):
        check_partitions(cfg)
    check_partitions(cfg.replace(min_partition_size=5, dirichlet_alpha=1.0))  # a possible one passes


def test_reject_checks_norms_only_of_what_comes_back():
    """A payload may carry parts the client only reads (FedMoE-DA's relayed experts): the norm
    check compares the uploaded keys with their payload values and ignores the rest."""
    from fedcoe_flwr.server.validation import validate_reply

    payload = {"w": torch.ones(3), "relay.0.w": torch.ones(3)}
    expected = {"w": ((3,), torch.float32)}
    assert validate_reply({"w": torch.ones(3) * 1.1}, {"num_samples": 4}, expected, payload, 10.0) is None
    reason = validate_reply({"w": torch.ones(3) * 1e6}, {"num_samples": 4}, expected, payload, 10.0)
    assert reason is not None and "norm" in reason


@pytest.mark.parametrize("algorithm,top_m", [("fedavg", 0), ("fedcoe", 2)])
def test_train_messages_share_one_array_record_per_distinct_payload(make_cfg, tmp_path, algorithm, top_m):
    """Clients sent the same tensors share one ArrayRecord (one conversion per round for
    FedAvg); each message still carries exactly its own payload."""
    from fedcoe_flwr.records import ARRAYS, from_array_record
    cfg = make_cfg(algorithm=algorithm, num_experts=3, top_m=top_m, results_dir=str(tmp_path / "r"))
    strategy = make_strategy(cfg)
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    if algorithm == "fedcoe":  # rows known for clients 0 and 1 only: two different expert sets, two full
        strategy.state.extra["correlation"][0] = [0.6, 0.3, 0.1]
        strategy.state.extra["correlation"][1] = [0.1, 0.3, 0.6]
        strategy.state.extra["correlation_known"][:2] = True
    msgs = list(strategy.configure_train(1))
    records = {id(m.content.array_records[ARRAYS]) for m in msgs}
    assert len(records) == (1 if algorithm == "fedavg" else 3)
    for msg in msgs:
        _, payload, _ = strategy._sent[msg.metadata.dst_node_id - 100]
        got = from_array_record(msg.content.array_records[ARRAYS])
        assert got.keys() == payload.keys() and all(torch.equal(got[k], payload[k]) for k in got)
