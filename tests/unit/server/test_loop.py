"""The round loop: poisoned or malformed replies rejected before aggregation, too few valid
replies stop the run with the cause, checkpoints restore the state exactly and refuse
another model or partition, run names stay plain names, messages share array records."""

from __future__ import annotations

import math
from pathlib import Path
import numpy as np
import pytest
import torch
from flwr.app import Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity
from fedcoe_flwr.config import ConfigError, ExperimentConfig, from_dict
from fedcoe_flwr.records import ARRAYS, METRICS, metric_record, to_array_record
from fedcoe_flwr.server.callbacks.checkpoint import CheckpointError, load_checkpoint
from fedcoe_flwr.server.loop import RoundLoop
from fedcoe_flwr.server.nodes import FederationError


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
            if key not in arrays:  # FedCoE's correlation row, class marginal and class co-occurrence: distributions
                arrays[key] = torch.full(shape, 1.0 / math.prod(shape), dtype=dtype)
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
    strategy.run_dir.release()  # its process has ended
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
    strategy.run_dir.release()  # its process has ended
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
    strategy.run_dir.release()  # its process has ended
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
