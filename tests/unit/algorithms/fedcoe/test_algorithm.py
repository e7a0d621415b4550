"""FedCoE's hooks: the server state and per-client payloads, aggregation of rows, gate and
experts, the client update and its private parts, and each design lever end to end."""

from __future__ import annotations

import math
import numpy as np
import pytest
import torch
from harness import TINY, assert_same, clone

from fedcoe_flwr.algorithms.base import ClientStep
from fedcoe_flwr.algorithms.base import Reply
from fedcoe_flwr.algorithms.training import unprefixed
from fedcoe_flwr.algorithms.fedcoe import FedCoE
from fedcoe_flwr.algorithms.fedcoe.model import (CLASS_MARGINAL, CORRELATION, GATE, LOCAL_PRIOR, TRAIN_PRIOR,
                                                 FedCoEModel, expert_prefix)
from fedcoe_flwr.algorithms.adaptation import prior_correct
from fedcoe_flwr.data import load_client_data, normalize
from fedcoe_flwr.server.validation import validate_reply


def test_init_state_has_independent_experts_and_uniform_rows(fedcoe_cfg):
    state = FedCoE().init_state(fedcoe_cfg, num_classes=4)
    keys = state.arrays.keys()
    assert any(k.startswith(GATE) for k in keys)
    for k in range(3):
        assert any(key.startswith(expert_prefix(k)) for key in keys)
    assert not any(key.startswith(expert_prefix(3)) for key in keys)
    w0 = unprefixed(expert_prefix(0), state.arrays)["classifier.weight"]
    w1 = unprefixed(expert_prefix(1), state.arrays)["classifier.weight"]
    assert not torch.equal(w0, w1)
    np.testing.assert_allclose(state.extra["correlation"], np.full((3, 3), 1 / 3))
    assert not state.extra["correlation_known"].any()
    again = FedCoE().init_state(fedcoe_cfg, num_classes=4)  # seeded: identical
    for k in keys:
        assert torch.equal(state.arrays[k], again.arrays[k])


def _expert_ids_in(payload):
    return sorted({int(k.split(".")[1]) for k in payload if k.startswith("expert.")})


def test_train_payload_sends_only_the_expert_set_once_the_row_is_known(fedcoe_cfg):
    algo = FedCoE()
    state = algo.init_state(fedcoe_cfg, num_classes=4)
    payload, config = algo.train_payload(state, fedcoe_cfg, 1, 1)
    assert config["expert_ids"] == [0, 1, 2] and _expert_ids_in(payload) == [0, 1, 2]
    state.extra["correlation"][1] = [0.1, 0.3, 0.6]
    state.extra["correlation_known"][1] = True
    payload, config = algo.train_payload(state, fedcoe_cfg, 1, 2)
    assert config["expert_ids"] == [1, 2] and _expert_ids_in(payload) == [1, 2]
    assert any(k.startswith(GATE) for k in payload)
    for k, v in payload.items():
        assert v is state.arrays[k] or torch.equal(v, state.arrays[k])
    # another client's row is still unknown: everything
    assert algo.train_payload(state, fedcoe_cfg, 0, 2)[1]["expert_ids"] == [0, 1, 2]
    # a new (cold-start) client gets the whole pool
    cold, cold_cfg = algo.coldstart_payload(state, fedcoe_cfg)
    assert _expert_ids_in(cold) == [0, 1, 2] and cold_cfg["expert_ids"] == [0, 1, 2]
    assert TRAIN_PRIOR in cold and TRAIN_PRIOR not in payload  # EM's training prior: new clients only
    expected = algo.expected_upload(payload, config, fedcoe_cfg)
    assert expected[CORRELATION] == ((3,), torch.float32)
    assert expected[CLASS_MARGINAL] == ((4,), torch.float32)
    assert set(expected) == set(payload) | {CORRELATION, CLASS_MARGINAL}


def test_aggregate_updates_rows_gate_and_experts(fedcoe_cfg):
    algo = FedCoE()
    cfg = fedcoe_cfg
    state = algo.init_state(cfg, num_classes=4)
    state.extra["correlation"][1] = [0.2, 0.3, 0.5]
    state.extra["correlation_known"][1] = True
    old = clone(state.arrays)

    def reply(client, delta, n, row, experts, marginal):
        arrays = {}
        for key, value in old.items():
            if key.startswith(GATE) or any(key.startswith(expert_prefix(k)) for k in experts):
                arrays[key] = value + delta if value.is_floating_point() else value + int(delta)
        arrays[CORRELATION] = torch.tensor(row, dtype=torch.float32)
        arrays[CLASS_MARGINAL] = torch.tensor(marginal, dtype=torch.float32)
        return Reply(client, n, arrays)

    rows = {0: [0.6, 0.3, 0.1], 2: [0.25, 0.25, 0.5]}
    replies = [reply(0, 1.0, 100, rows[0], [0, 1], [1.0, 0, 0, 0]),
               reply(2, 3.0, 300, rows[2], [0, 1], [0, 0.5, 0.5, 0])]
    new, diagnostics = algo.aggregate(state, replies, cfg, server_round=1)
    # EM's training prior: the sample-weighted mean of the clients' mean predictions
    np.testing.assert_allclose(new.extra["train_prior"], [0.25, 0.375, 0.375, 0.0], rtol=1e-6)

    # correlation rows: stored for repliers, kept for the others; input state untouched
    np.testing.assert_allclose(new.extra["correlation"][0], rows[0], rtol=1e-6)
    np.testing.assert_allclose(new.extra["correlation"][2], rows[2], rtol=1e-6)
    np.testing.assert_allclose(new.extra["correlation"][1], [0.2, 0.3, 0.5])
    assert new.extra["correlation_known"].tolist() == [True, True, True]
    assert state.extra["correlation_known"].tolist() == [False, True, False]
    np.testing.assert_allclose(diagnostics["expert_usage"], np.mean([rows[0], [0.2, 0.3, 0.5], rows[2]], 0),
                               rtol=1e-6)

    # gate: sample-weighted (1:3), whatever the correlation rows
    for key in (k for k in old if k.startswith(GATE)):
        torch.testing.assert_close(new.arrays[key], old[key] + 2.5)
    # expert 2: nobody trained it
    for key in (k for k in old if k.startswith(expert_prefix(2))):
        assert torch.equal(new.arrays[key], old[key]), key
    assert diagnostics["expert_max_client_share"][2] == -1.0
    # experts 0 and 1: smoothed correlation weights (cap 1.0); BN statistics by samples
    for k in (0, 1):
        wa, wb = 100 * (0.5 * rows[0][k] + 0.5 / 3), 300 * (0.5 * rows[2][k] + 0.5 / 3)
        delta = (wa * 1.0 + wb * 3.0) / (wa + wb)
        assert diagnostics["expert_max_client_share"][k] == pytest.approx(max(wa, wb) / (wa + wb), rel=1e-6)
        for key in (key for key in old if key.startswith(expert_prefix(k))):
            if key.endswith(("running_mean", "running_var")):
                torch.testing.assert_close(new.arrays[key], old[key] + 2.5, msg=key)
            elif key.endswith("num_batches_tracked"):
                assert int(new.arrays[key]) == int(old[key]) + 2 or int(new.arrays[key]) == int(old[key]) + 3
            else:
                torch.testing.assert_close(new.arrays[key], old[key] + delta, rtol=1e-5, atol=1e-5, msg=key)
    assert set(new.arrays) == set(old)


def test_client_train_uploads_shared_parts_and_a_correlation_row(trained, fedcoe_cfg):
    payload, upload = trained["payload"], trained["upload"]
    assert trained["config"]["expert_ids"] == [0, 2]
    assert set(upload) == set(payload) | {CORRELATION, CLASS_MARGINAL}
    assert _expert_ids_in(upload) == [0, 2]
    marginal = upload[CLASS_MARGINAL]
    assert marginal.shape == (4,) and marginal.sum().item() == pytest.approx(1.0, abs=1e-5)
    row = upload[CORRELATION]
    assert row.shape == (3,) and row.dtype == torch.float32
    assert (row >= 0).all() and row.sum().item() == pytest.approx(1.0, abs=1e-5)
    for key, value in payload.items():
        assert upload[key].shape == value.shape and upload[key].dtype == value.dtype
    changed = [k for k in payload if payload[k].is_floating_point() and not torch.equal(upload[k], payload[k])]
    assert any(k.startswith(GATE) for k in changed) and any(k.startswith(expert_prefix(0)) for k in changed)
    metrics = trained["metrics"]
    assert metrics["num_samples"] == trained["data"].num_train and math.isfinite(metrics["train_loss"])
    expected = trained["algo"].expected_upload(payload, trained["config"], fedcoe_cfg)
    assert validate_reply(upload, metrics, expected, payload, fedcoe_cfg.max_update_norm_ratio) is None


def test_client_train_keeps_private_parts_local(trained):
    private = trained["private"]
    assert private, "the default local part (a head and a local gate) must come back as private state"
    assert all(k.startswith(("local.", "local_gate.")) for k in private)
    assert any(k.startswith("local_gate.") for k in private)
    assert not any(k.startswith(("local", "local_gate")) for k in trained["upload"])


def test_client_train_is_deterministic_given_the_seed(trained, fedcoe_cfg, cpu):
    algo = trained["algo"]
    again, private, _ = algo.client_train(ClientStep(arrays=trained["payload"], config=trained["config"], private=None, data=trained["data"], cfg=fedcoe_cfg, num_classes=4, device=cpu, seed=7))
    assert_same(again, trained["upload"])
    assert_same(private, trained["private"])


def test_client_train_without_local_part_has_no_private_state(make_cfg, cpu):
    cfg = make_cfg(local_part="none", num_experts=2)
    algo = FedCoE()
    payload, config = algo.train_payload(algo.init_state(cfg, 4), cfg, 1, 1)
    upload, private, _ = algo.client_train(ClientStep(arrays=payload, config=config, private=None, data=load_client_data(cfg, 1), cfg=cfg, num_classes=4, device=cpu, seed=0))
    assert private is None
    assert set(upload) == set(payload) | {CORRELATION, CLASS_MARGINAL}


def test_client_predict_gives_probabilities(trained, fedcoe_cfg, cpu):
    algo, data = trained["algo"], trained["data"]
    x = normalize(data.test_x[:5])
    trained_arrays = {k: v for k, v in trained["upload"].items() if k != CORRELATION}
    for private in (None, trained["private"]):
        predict = algo.client_predict(ClientStep(arrays=trained_arrays, config=trained["config"], private=private, cfg=fedcoe_cfg, num_classes=4, device=cpu, data=None))
        with torch.no_grad():
            p = predict(x)
        assert p.shape == (5, 4) and (p >= 0).all()
        torch.testing.assert_close(p.sum(1), torch.ones(5))
    predict = algo.global_predict(trained["state"], fedcoe_cfg, 4, cpu)
    with torch.no_grad():
        p = predict(x)
    torch.testing.assert_close(p.sum(1), torch.ones(5))


# ============================================================== shared trunk, diagnostics, EM prior
def client_model(algo, payload, config, private, cfg, cpu):
    """The client's prediction function and the same model rebuilt by hand (experts 0, 1)."""
    predict = algo.client_predict(ClientStep(arrays=payload, config=config, private=private, cfg=cfg, num_classes=4, device=cpu, data=None))
    model = FedCoEModel(cfg, 4, [0, 1])
    model.load_shared(payload)
    model.load_private(private)
    model.eval()
    return predict, model


@pytest.mark.parametrize("trunk_convs", [2, 1])
def test_shared_trunk_payload_holds_one_trunk_and_expert_heads(make_cfg, cpu, trunk_convs):
    cfg = make_cfg(model="cnn", shared_trunk=True, num_experts=3, norm="none", trunk_convs=trunk_convs)
    algo = FedCoE()
    state = algo.init_state(cfg, 4)
    convs = [f"conv{i}" for i in (1, 2)]
    trunk_keys = {k for k in state.arrays if k.startswith("trunk.")}
    assert trunk_keys == {f"trunk.{c}.{p}" for c in convs[:trunk_convs] for p in ("weight", "bias")}
    for k in range(3):  # heads: fc1, the classifier and the convolutions after the trunk's
        keys = {key[len(expert_prefix(k)):] for key in state.arrays if key.startswith(expert_prefix(k))}
        assert keys == {f"{layer}.{p}" for layer in convs[trunk_convs:] + ["fc1", "classifier"]
                        for p in ("weight", "bias")}
    payload, config = algo.train_payload(state, cfg, 0, 1)
    data = load_client_data(cfg, 0)
    upload, _, metrics = algo.client_train(ClientStep(arrays=payload, config=config, private=None, data=data, cfg=cfg, num_classes=4, device=cpu, seed=3))
    assert validate_reply(upload, metrics, algo.expected_upload(payload, config, cfg), payload,
                          cfg.max_update_norm_ratio) is None
    assert not torch.equal(upload["trunk.conv1.weight"], payload["trunk.conv1.weight"])  # the trunk trains
    # the mixture runs every expert head on the one trunk
    model = FedCoEModel(cfg, 4, [0, 1, 2], with_private=False)
    model.load_shared(state.arrays)
    model.eval()
    x = normalize(data.test_x[:5])
    with torch.no_grad():
        h = model.trunk.trunk(x)
        g = model.gate_probs(x)
        manual = sum(g[:, k:k + 1] * torch.softmax(model.expert[str(k)].classifier(
            model.expert[str(k)].head_features(h)), 1) for k in range(3))
        torch.testing.assert_close(model.mixture(x)[0], manual)


def test_shared_trunk_is_averaged_by_samples(make_cfg):
    cfg = make_cfg(model="cnn", shared_trunk=True, num_experts=2, norm="none")
    algo = FedCoE()
    state = algo.init_state(cfg, 4)
    old = clone(state.arrays)

    def reply(client, delta, n, row):
        arrays = {k: v + delta for k, v in old.items()}
        arrays[CORRELATION] = torch.tensor(row)
        arrays[CLASS_MARGINAL] = torch.full((4,), 0.25)
        return Reply(client, n, arrays)

    new, _ = algo.aggregate(state, [reply(0, 1.0, 100, [0.9, 0.1]), reply(1, 5.0, 300, [0.1, 0.9])], cfg, 1)
    for key in (k for k in old if k.startswith("trunk.")):  # (100 * 1 + 300 * 5) / 400, rows ignored
        torch.testing.assert_close(new.arrays[key], old[key] + 4.0)


def test_global_diagnostics_score_each_expert_alone(make_cfg, cpu):
    cfg = make_cfg(num_experts=2, norm="group")
    algo = FedCoE()
    state = algo.init_state(cfg, 4)
    from fedcoe_flwr.data import load_global_test
    x, y = load_global_test(cfg)
    out = algo.global_diagnostics(state, cfg, 4, cpu, x, y)
    model = FedCoEModel(cfg, 4, [0, 1], with_private=False)
    model.load_shared(state.arrays)
    model.eval()
    with torch.no_grad():
        direct = [(model.expert[str(k)](normalize(x)).argmax(1) == y).float().mean().item() for k in (0, 1)]
    assert out["expert_global_accuracy"] == pytest.approx(direct)


def test_expert_head_local_part_is_private_and_survives_a_reload(make_cfg, cpu):
    """local_part=expert_head: a private fc1 + classifier on the shared trunk (FedPer's
    private layers), never uploaded, reloaded exactly from its private state."""
    cfg = make_cfg(model="cnn", shared_trunk=True, local_part="expert_head", num_experts=2, norm="none")
    algo = FedCoE()
    state = algo.init_state(cfg, 4)
    payload, config = algo.train_payload(state, cfg, 0, 1)
    data = load_client_data(cfg, 0)
    upload, private, metrics = algo.client_train(ClientStep(arrays=payload, config=config, private=None, data=data, cfg=cfg, num_classes=4, device=cpu, seed=1))
    assert {k for k in private if k.startswith("local.")} == {
        "local.fc1.weight", "local.fc1.bias", "local.classifier.weight", "local.classifier.bias"}
    assert not any(k.startswith("local") for k in upload)
    predict, model = client_model(algo, payload, config, private, cfg, cpu)
    x = normalize(data.test_x[:6])
    with torch.no_grad():
        h = model.trunk.trunk(x)
        y, feats = model.mixture(x)
        local = torch.softmax(model.local.classifier(model.local.head_features(h)), 1)
        beta = torch.sigmoid(model.local_gate(feats))
        torch.testing.assert_close(predict(x), (1 - beta) * y + beta * local)


def test_expert_head_needs_the_shared_trunk(make_cfg):
    from fedcoe_flwr.config import ConfigError
    with pytest.raises(ConfigError, match="local_part.*shared_trunk=true"):
        make_cfg(model="cnn", local_part="expert_head")


@pytest.mark.parametrize("model, trunk_convs", [("cnn", 2), ("cnn", 1), ("resnet_moe", 2)])
@pytest.mark.parametrize("gate_input", ["trunk", "trunk_flat"])
def test_gate_on_trunk_routes_on_the_trunks_features_and_trains_it(make_cfg, cpu, model, trunk_convs, gate_input):
    cfg = make_cfg(model=model, shared_trunk=True, gate_input=gate_input, num_experts=3, norm="none",
                   trunk_convs=trunk_convs)
    algo = FedCoE()
    state = algo.init_state(cfg, 4)
    net = FedCoEModel(cfg, 4, [0, 1, 2], with_private=False)
    net.load_shared(state.arrays)
    net.eval()
    data = load_client_data(cfg, 0)
    x = normalize(data.test_x[:5])
    with torch.no_grad():
        h = net.trunk.trunk(x)
        torch.testing.assert_close(net.gate_probs(x), torch.softmax(net.gate(h), 1))
        torch.testing.assert_close(net.gate_probs(x, h), net.gate_probs(x))
    first_layer = net.gate.body[0].in_channels if gate_input == "trunk" else net.gate.hidden.in_features
    assert first_layer == (h.shape[1] if gate_input == "trunk" else h[0].numel())
    # a round trip: the upload validates and the gate's gradient reaches the trunk
    payload, config = algo.train_payload(state, cfg, 0, 1)
    upload, _, metrics = algo.client_train(ClientStep(arrays=payload, config=config, private=None, data=data, cfg=cfg, num_classes=4, device=cpu, seed=3))
    assert validate_reply(upload, metrics, algo.expected_upload(payload, config, cfg), payload,
                          cfg.max_update_norm_ratio) is None
    net.zero_grad()
    net.gate_probs(x)[:, 0].sum().backward()
    first = next(p for name, p in net.trunk.named_parameters() if name.startswith(net.trunk.trunk_prefixes))
    assert first.grad is not None and first.grad.abs().sum() > 0  # the trunk's first convolution


@pytest.mark.parametrize("values, message", [({"trunk_convs": 3}, "trunk_convs.*3.*must be 1 or 2"),
                                             ({"trunk_convs": 1, "model": "resnet_moe"}, "trunk_convs.*leave")])
def test_trunk_convs_is_checked(make_cfg, values, message):
    from fedcoe_flwr.config import ConfigError
    with pytest.raises(ConfigError, match=message):
        make_cfg(**values)


def test_gate_on_trunk_needs_the_shared_trunk(make_cfg):
    from fedcoe_flwr.config import ConfigError
    with pytest.raises(ConfigError, match="gate_input.*shared_trunk=true"):
        make_cfg(model="cnn", gate_input="trunk")


def test_local_prior_correction_reweights_the_pool_by_the_clients_labels(make_cfg, cpu):
    cfg = make_cfg(model="cnn", shared_trunk=True, local_prior_correction=True, num_experts=2, norm="none")
    algo = FedCoE()
    state = algo.init_state(cfg, 4)
    state.extra["train_prior"] = np.array([0.4, 0.3, 0.2, 0.1])
    payload, config = algo.train_payload(state, cfg, 0, 1)
    assert TRAIN_PRIOR in payload and TRAIN_PRIOR not in algo.expected_upload(payload, config, cfg)
    data = load_client_data(cfg, 0)
    upload, private, metrics = algo.client_train(ClientStep(arrays=payload, config=config, private=None, data=data, cfg=cfg, num_classes=4, device=cpu, seed=2))
    assert TRAIN_PRIOR not in upload and LOCAL_PRIOR not in upload  # the client's labels stay home
    assert validate_reply(upload, metrics, algo.expected_upload(payload, config, cfg), payload,
                          cfg.max_update_norm_ratio) is None
    counts = torch.bincount(data.train_y, minlength=4).float()
    torch.testing.assert_close(private[LOCAL_PRIOR], (counts + 1) / (counts.sum() + 4))
    predict, model = client_model(algo, payload, config, private, cfg, cpu)
    x = normalize(data.test_x[:6])
    with torch.no_grad():
        y, feats = model.mixture(x)
        mine = prior_correct(y, private[LOCAL_PRIOR], torch.tensor([0.4, 0.3, 0.2, 0.1]))
        beta = torch.sigmoid(model.local_gate(feats))
        expected = (1 - beta) * mine + beta * torch.softmax(model.local(feats), 1)
        torch.testing.assert_close(predict(x), expected)


def test_global_model_is_the_unadapted_mixture(make_cfg, cpu):
    """The global model is the mixture over the pool as trained: its balanced variant is the
    evaluator's, with the same predicted prior as every other method's (test_adaptation), so the
    server's own training prior (for the level-2 correction) must not be divided out here."""
    cfg = make_cfg(num_experts=2, norm="group")
    algo = FedCoE()
    state = algo.init_state(cfg, 4)
    state.extra["train_prior"] = np.array([0.4, 0.3, 0.2, 0.1])
    x = normalize(load_client_data(cfg, 0).test_x[:8])
    model = FedCoEModel(cfg, 4, [0, 1], with_private=False)
    model.load_shared(state.arrays)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(algo.global_predict(state, cfg, 4, cpu)(x), model.mixture(x)[0])
    from fedcoe_flwr.data import load_global_test
    gx, gy = load_global_test(cfg)
    assert not any(k.startswith("global_accuracy") for k in algo.global_diagnostics(state, cfg, 4, cpu, gx, gy))


def test_local_loss_weight_trains_the_local_part_as_a_classifier(make_cfg, cpu):
    """With local_loss_weight > 0 the local part's own cross-entropy is in the loss: the
    local head ends up a better classifier of the client's data on its own."""
    cfg = make_cfg(model="cnn", shared_trunk=True, num_experts=2, norm="none", local_epochs=3)
    algo = FedCoE()
    state = algo.init_state(cfg, 4)
    payload, config = algo.train_payload(state, cfg, 0, 1)
    data = load_client_data(cfg, 0)

    def local_nll(c):
        _, private, _ = algo.client_train(ClientStep(arrays=payload, config=config, private=None, data=data, cfg=c, num_classes=4, device=cpu, seed=5))
        model = FedCoEModel(c, 4, [0, 1])
        model.load_shared(payload)
        model.load_private(private)
        model.eval()
        with torch.no_grad():
            local = model.parts(normalize(data.train_x))[2]
        return torch.nn.functional.nll_loss(torch.log(local), data.train_y).item()

    assert local_nll(cfg.replace(local_loss_weight=1.0)) < local_nll(cfg)


def test_default_design_round_trip(tmp_path, cpu):
    """The shipped defaults (shared trunk, local prior correction, local loss,
    class-group routing targets from the received pool, the shared expert): one
    client update validates, aggregates into a class map, and every prediction is a probability
    vector."""
    from fedcoe_flwr.config import ExperimentConfig, from_dict
    cfg = from_dict({**TINY, "cache_dir": str(tmp_path / "cache"), "model": "cnn"})
    defaults = ExperimentConfig()
    assert cfg.shared_trunk and cfg.local_prior_correction and cfg.local_loss_weight > 0
    assert (defaults.shared_trunk, defaults.local_part, defaults.coldstart_prior) == (True, "head", "predicted")
    assert (defaults.assignment_level, defaults.class_groups_from, defaults.shared_expert_weight) == (
        "class_groups", "received", 0.5) and defaults.assignment_weight > 0 and defaults.class_groups_restarts > 0
    algo = FedCoE()
    state = algo.init_state(cfg, 4)
    payload, config = algo.train_payload(state, cfg, 0, 1)
    data = load_client_data(cfg, 0)
    upload, private, metrics = algo.client_train(ClientStep(arrays=payload, config=config, private=None, data=data, cfg=cfg, num_classes=4, device=cpu, seed=0))
    expected = algo.expected_upload(payload, config, cfg)
    assert validate_reply(upload, metrics, expected, payload, cfg.max_update_norm_ratio) is None
    new, diagnostics = algo.aggregate(state, [Reply(0, metrics["num_samples"], upload)], cfg, 1)
    assert set(new.arrays) == set(state.arrays)
    assert new.extra["train_prior"].sum() == pytest.approx(1.0, abs=1e-5)
    assert sorted(set(new.extra["class_expert"])) == list(range(min(cfg.num_experts, 4)))
    x = normalize(data.test_x[:5])
    with torch.no_grad():
        for probs in (algo.global_predict(new, cfg, 4, cpu)(x),
                      algo.client_predict(ClientStep(arrays=algo.eval_payload(new, cfg, 0)[0], config=config, private=private, cfg=cfg, num_classes=4, device=cpu, data=None))(x)):
            assert probs.shape == (5, 4) and torch.allclose(probs.sum(1), torch.ones(5), atol=1e-5)
    from fedcoe_flwr.data import load_global_test
    found = algo.global_diagnostics(new, cfg, 4, cpu, *load_global_test(cfg))
    assert 0.0 <= found["gate_routing_accuracy"] <= 1.0 and 0.0 <= found["oracle_routing_global_accuracy"] <= 1.0


def test_class_map_routing_scores_the_gate_against_the_map_and_routes_by_it():
    from fedcoe_flwr.algorithms.fedcoe.algorithm import class_map_routing
    y = torch.tensor([0, 1, 2, 3])
    class_expert = [0, 0, 1, 1]  # classes 0, 1 -> expert 0; 2, 3 -> expert 1
    gate = torch.tensor([[0.9, 0.1], [0.2, 0.8], [0.3, 0.7], [0.6, 0.4]])  # right on images 0 and 2
    eye = torch.eye(4)
    experts = [eye[[0, 1, 0, 0]], eye[[3, 3, 2, 2]]]  # expert 0 knows classes 0, 1; expert 1 only class 2
    found = class_map_routing(class_expert, gate, experts, y, 0.0, None)
    assert found == {"gate_routing_accuracy": 0.5, "oracle_routing_global_accuracy": 0.75}
    shared = eye[[3, 3, 3, 3]]  # a shared expert at weight 0.6 that always says class 3 outvotes the heads
    found = class_map_routing(class_expert, gate, experts, y, 0.6, shared)
    assert found["oracle_routing_global_accuracy"] == 0.25 and found["shared_expert_global_accuracy"] == 0.25
    # at weight 0.4 the heads decide; the shared expert's class 3 routes every image to expert 1
    shared = torch.tensor([[0.1, 0.0, 0.0, 0.9]] * 4)
    found = class_map_routing(class_expert, gate, experts, y, 0.4, shared)
    assert found["shared_routing_global_accuracy"] == 0.25  # expert 1 (right on image 2 alone)
    assert found["oracle_routing_global_accuracy"] == 0.75


def test_class_groups_from_received_uploads_the_received_pools_confusions(make_cfg, cpu):
    """``class_groups_from``: the co-occurrence the client uploads is the received mixture's
    ("received") or the locally trained one's ("trained"), on the client's own images."""
    from fedcoe_flwr.algorithms.fedcoe.algorithm import cooccurrence, predicted_mixture
    from fedcoe_flwr.algorithms.fedcoe.model import CLASS_COOCCURRENCE, FedCoEModel

    uploads = {}
    for source in ("received", "trained"):
        cfg = make_cfg(num_experts=3, assignment_weight=1.0, assignment_level="class_groups", class_groups_from=source)
        algo = FedCoE()
        payload, config = algo.train_payload(algo.init_state(cfg, 4), cfg, 0, 1)
        data = load_client_data(cfg, 0)
        upload, _, _ = algo.client_train(ClientStep(arrays=payload, config=config, private=None, data=data, cfg=cfg,
                                                    num_classes=4, device=cpu, seed=7))
        uploads[source] = upload[CLASS_COOCCURRENCE]
        received = FedCoEModel(cfg, 4, [int(k) for k in config["expert_ids"]], with_private=False)
        received.load_shared(payload)
        expected = cooccurrence(predicted_mixture(received, data.train_x, cfg, cpu))
        assert uploads[source].shape == (4, 4)
        assert torch.allclose(uploads[source], expected, atol=1e-6) == (source == "received"), source
    # training moved the mixture: the two sources differ
    assert not torch.allclose(uploads["received"], uploads["trained"], atol=1e-4)
