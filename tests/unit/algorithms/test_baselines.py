"""FedPer, pFedMoE and FedMoE-DA: the pure client/server functions on tiny generated
tensors. Shapes, what is (never) uploaded, FedMoE-DA's aggregation matrix against a
hand computation, Eq. 11 as a weighted sum, the stale matrix between updates,
cold-start averaging, and a 2-client x 2-round loop per method that must lower the
training loss."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedcoe_flwr.algorithms.base import ClientStep
from fedcoe_flwr.algorithms import get_algorithm
from fedcoe_flwr.algorithms import fedmoe_da as da
from fedcoe_flwr.algorithms import pfedmoe as pm
from fedcoe_flwr.algorithms.base import Reply
from fedcoe_flwr.algorithms.training import state_of, unprefixed
from fedcoe_flwr.config import ConfigError, from_dict
from fedcoe_flwr.data import ClientData, normalize
from fedcoe_flwr.records import config_record, from_array_record, to_array_record
from fedcoe_flwr.server.validation import validate_reply

NUM_CLASSES = 4
CPU = torch.device("cpu")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_cfg(**overrides):
    values = dict(dataset="synthetic", image_size=16, model="cnn", num_clients=2, num_coldstart_clients=1,
                  synthetic_num_classes=NUM_CLASSES, batch_size=16, eval_batch_size=64, lr=0.05,
                  local_epochs=2, num_experts=2, fedmoe_da_top_p=1, fedmoe_da_interval=1)
    values.update(overrides)
    return from_dict(values)


_PROTOS = torch.Generator().manual_seed(1234)
PROTOTYPES = torch.rand(NUM_CLASSES, 3, 4, 4, generator=_PROTOS).repeat_interleave(4, 2).repeat_interleave(4, 3) * 255


def make_data(seed: int, classes: list[int], n_train: int = 64, n_test: int = 32) -> ClientData:
    """Class prototypes (coarse colour blocks) plus noise: learnable in a few steps."""
    g = torch.Generator().manual_seed(seed)

    def draw(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.tensor(classes)[torch.randint(len(classes), (n,), generator=g)]
        x = PROTOTYPES[y] + 50 * torch.randn(n, 3, 16, 16, generator=g)
        return x.clamp(0, 255).to(torch.uint8), y.long()

    tx, ty = draw(n_train)
    vx, vy = draw(n_test)
    return ClientData(tx, ty, vx, vy)


def over_the_wire(arrays, config):
    """What the Flower records do to arrays and configs."""
    arrays = from_array_record(to_array_record(arrays)) if arrays else {}
    return arrays, dict(config_record(config))


def run_round(algo, cfg, state, privates, datas, server_round, seed=0):
    """One round as the Strategy + ClientApp run it; returns (state, replies)."""
    replies = []
    for client, data in enumerate(datas):
        payload, pconfig = algo.train_payload(state, cfg, client, server_round)
        pconfig = {**pconfig, "server_round": server_round}
        arrays, config = over_the_wire(payload, pconfig)
        upload, private, metrics = algo.client_train(ClientStep(arrays=arrays, config=config, private=privates.get(client), data=data, cfg=cfg, num_classes=NUM_CLASSES, device=CPU, seed=seed + 100 * server_round + client))
        if private:
            privates[client] = from_array_record(to_array_record(private))
        upload = from_array_record(to_array_record(upload))
        reason = validate_reply(upload, metrics, algo.expected_upload(payload, pconfig, cfg), payload,
                                cfg.max_update_norm_ratio)
        assert reason is None, reason
        replies.append(Reply(client, int(metrics["num_samples"]), upload, metrics))
    state, diagnostics = algo.aggregate(state, replies, cfg, server_round)
    return state, replies, diagnostics


def evaluate_all(algo, cfg, state, privates, datas, coldstart_data):
    """Personalised accuracy per client, and the cold-start accuracy (two-phase)."""
    parts, accs = [], []
    for client, data in enumerate(datas):
        payload, pconfig = algo.eval_payload(state, cfg, client)
        arrays, config = over_the_wire(payload, pconfig)
        predict = algo.client_predict(ClientStep(arrays=arrays, config=config, private=privates.get(client), cfg=cfg, num_classes=NUM_CLASSES, device=CPU, data=None))
        probs = predict(normalize(data.test_x))
        assert probs.shape == (len(data.test_y), NUM_CLASSES)
        assert torch.allclose(probs.sum(1), torch.ones(len(probs)), atol=1e-5)
        accs.append(float((probs.argmax(1) == data.test_y).float().mean()))
        up = algo.client_eval_upload(ClientStep(arrays=arrays, config=config, private=privates.get(client), cfg=cfg, data=None))
        if up is not None:
            parts.append((from_array_record(to_array_record(up)), data.num_train))
    payload, pconfig = algo.coldstart_payload(state, cfg, parts if algo.coldstart_needs_client_parts else None)
    arrays, config = over_the_wire(payload, pconfig)
    cold = algo.client_coldstart(ClientStep(arrays=arrays, config=config, data=coldstart_data, cfg=cfg, num_classes=NUM_CLASSES, device=CPU, private=None))
    return accs, cold, parts, payload


DATAS = [make_data(1, [0, 1, 2]), make_data(2, [1, 2, 3])]
COLD = make_data(3, [0, 3])


# ====================================================================== every method
@pytest.mark.parametrize("name,extra", [
    ("fedper", {}),
    ("pfedmoe", {"pfedmoe_local_widths": "1.0,2.0"}),
    ("fedmoe_da", {}),
])
def test_two_clients_two_rounds_lower_the_training_loss(name, extra):
    cfg = make_cfg(**extra)
    algo = get_algorithm(name)
    assert algo.name == name and algo.has_global_model is False and algo.coldstart_needs_client_parts
    state = algo.init_state(cfg, NUM_CLASSES)
    privates: dict[int, dict] = {}
    accs0, _, parts0, _ = evaluate_all(algo, cfg, state, privates, DATAS, COLD)  # before any training
    assert parts0 == []  # nobody has private parts yet
    losses = []
    for rnd in (1, 2):
        state, replies, _ = run_round(algo, cfg, state, privates, DATAS, rnd)
        losses.append(np.mean([r.metrics["train_loss"] for r in replies]))
    assert all(math.isfinite(v) for v in losses)
    assert losses[1] < 0.9 * losses[0], losses
    accs, cold, parts, _ = evaluate_all(algo, cfg, state, privates, DATAS, COLD)
    assert len(parts) == 2
    assert 0.0 <= cold["coldstart_accuracy"] <= 1.0
    assert np.mean(accs) > 0.5, accs  # the personalised models have learnt something


def test_baselines_refuse_a_model_they_are_not_defined_on():
    for name in ("fedper", "pfedmoe", "fedmoe_da", "local"):
        with pytest.raises(ConfigError, match="'model' = 'resnet_moe'.*use model 'cnn'"):
            make_cfg(model="resnet_moe", algorithm=name)


# ====================================================================== FedPer
def test_fedper_uploads_the_body_only_and_keeps_the_head():
    cfg = make_cfg(local_epochs=1)
    algo = get_algorithm("fedper")
    state = algo.init_state(cfg, NUM_CLASSES)
    assert set(state.arrays) == {"body.conv1.weight", "body.conv1.bias", "body.conv2.weight", "body.conv2.bias"}
    payload, config = algo.train_payload(state, cfg, 0, 1)
    upload, private, metrics = algo.client_train(ClientStep(arrays=payload, config=config, private=None, data=DATAS[0], cfg=cfg, num_classes=NUM_CLASSES, device=CPU, seed=0))
    assert set(upload) == set(payload)
    assert not any("fc1" in k or "classifier" in k for k in upload)
    assert set(private) == {"head.fc1.weight", "head.fc1.bias", "head.classifier.weight", "head.classifier.bias"}
    assert metrics["num_samples"] == DATAS[0].num_train
    # the head was trained and is passed back next round
    upload2, private2, _ = algo.client_train(ClientStep(arrays=payload, config=config, private=private, data=DATAS[0], cfg=cfg, num_classes=NUM_CLASSES, device=CPU, seed=1))
    assert not torch.equal(private2["head.fc1.weight"], private["head.fc1.weight"])


def test_fedper_body_is_sample_weighted_and_coldstart_averages_heads():
    cfg = make_cfg()
    algo = get_algorithm("fedper")
    state = algo.init_state(cfg, NUM_CLASSES)
    ones = {k: torch.ones_like(v) for k, v in state.arrays.items()}
    threes = {k: 3 * torch.ones_like(v) for k, v in state.arrays.items()}
    new, _ = algo.aggregate(state, [Reply(0, 30, ones), Reply(1, 10, threes)], cfg, 1)
    for v in new.arrays.values():
        assert torch.allclose(v, torch.full_like(v, 1.5))  # (30*1 + 10*3) / 40
    payload, config = algo.train_payload(state, cfg, 0, 1)
    _, private, _ = algo.client_train(ClientStep(payload, config, None, DATAS[0], cfg, NUM_CLASSES, CPU, 0))
    head_a = {k: torch.full_like(v, 2.0) for k, v in private.items()}
    head_b = {k: torch.full_like(v, -2.0) for k, v in private.items()}
    payload, _ = algo.coldstart_payload(new, cfg, [(head_a, 3), (head_b, 1)])
    for k in private:
        assert torch.allclose(payload[k], torch.full_like(payload[k], 1.0))  # (3*2 - 2) / 4
    for k in new.arrays:
        assert torch.equal(payload[k], new.arrays[k])
    # with no parts the new client gets the body and the initial head
    payload, _ = algo.coldstart_payload(new, cfg, [])
    assert set(payload) == set(new.arrays)
    algo.client_predict(ClientStep(arrays=payload, config={}, private=None, cfg=cfg, num_classes=NUM_CLASSES, device=CPU, data=None))(normalize(COLD.test_x))


# ====================================================================== pFedMoE
def test_pfedmoe_shapes_gate_and_projection():
    cfg = make_cfg(pfedmoe_local_widths="1.0,2.0")
    assert pm.width_of_client(cfg, 0) == 1.0 and pm.width_of_client(cfg, 1) == 2.0
    assert pm.width_of_client(cfg, 2) == 1.0  # cycled
    x = normalize(DATAS[0].train_x[:8])
    for width, has_proj in ((1.0, False), (2.0, True)):
        private = pm.initial_private(cfg, NUM_CLASSES, width)
        model = pm.build_client_model(cfg, NUM_CLASSES, pm.PFedMoE().init_state(cfg, NUM_CLASSES).arrays,
                                      private, CPU)
        assert (model.local_extractor.proj is not None) == has_proj
        assert model.local_extractor.conv2.out_channels == int(64 * width)
        r_g, r_l = model.global_extractor(x), model.local_extractor(x)
        assert r_g.shape == r_l.shape == (8, pm.representation_dim(cfg))
        mixed, w = model.mix(x)
        assert w.shape == (8, 2) and torch.allclose(w.sum(1), torch.ones(8)) and (w > 0).all()
        assert torch.allclose(mixed, w[:, :1] * r_g + w[:, 1:] * r_l, atol=1e-5)
        assert model(x).shape == (8, NUM_CLASSES)
        assert model.gate.fc1.in_features == 3 * 16 * 16  # the flattened raw sample


def test_pfedmoe_uploads_only_the_homogeneous_extractor_and_trains_every_part():
    cfg = make_cfg(pfedmoe_local_widths="1.0,2.0", local_epochs=1)
    algo = get_algorithm("pfedmoe")
    state = algo.init_state(cfg, NUM_CLASSES)
    payload, config = algo.train_payload(state, cfg, 1, 1)
    assert config["local_width"] == 2.0
    upload, private, _ = algo.client_train(ClientStep(arrays=payload, config=config, private=None, data=DATAS[1], cfg=cfg, num_classes=NUM_CLASSES, device=CPU, seed=0))
    assert set(upload) == set(payload) and all(k.startswith("global.") for k in upload)
    assert {k.split(".")[0] for k in private} == {"local", "gate", "head"}
    assert private["local.conv1.weight"].shape[0] == 64 and "local.proj.weight" in private
    initial = pm.initial_private(cfg, NUM_CLASSES, 2.0)
    for key in private:  # all parts trained together (SwitchNorm running stats included)
        if key.endswith("mean_weight") or key.endswith("var_weight") or private[key].is_floating_point():
            assert not torch.equal(private[key], initial[key]), key
    assert any(not torch.equal(upload[k], payload[k]) for k in upload)


def test_pfedmoe_coldstart_averages_within_the_most_common_width():
    cfg = make_cfg(pfedmoe_local_widths="1.0,2.0")
    algo = get_algorithm("pfedmoe")
    state = algo.init_state(cfg, NUM_CLASSES)

    def parts(width: float, value: float) -> dict:
        return {k: torch.full_like(v, value) for k, v in pm.initial_private(cfg, NUM_CLASSES, width).items()}

    client_parts = [(parts(1.0, 10.0), 5), (parts(2.0, 1.0), 1), (parts(2.0, 4.0), 3)]
    payload, info = algo.coldstart_payload(state, cfg, client_parts)
    assert info["coldstart_group_size"] == 2
    assert payload["local.conv1.weight"].shape[0] == 64  # the width-2 group (two clients)
    for k, v in payload.items():
        if k.startswith("local."):
            assert torch.allclose(v, torch.full_like(v, (1 * 1 + 3 * 4) / 4)), k
        elif k.startswith(("gate.", "head.")):
            assert torch.allclose(v, torch.full_like(v, (5 * 10 + 1 * 1 + 3 * 4) / 9)), k
        else:
            assert torch.equal(v, state.arrays[k])
    predict = algo.client_predict(ClientStep(arrays=payload, config={}, private=None, cfg=cfg, num_classes=NUM_CLASSES, device=CPU, data=None))
    assert predict(normalize(COLD.test_x)).shape == (len(COLD.test_y), NUM_CLASSES)


# ====================================================================== FedMoE-DA: Eqs. 8-11
def test_aggregation_matrix_matches_a_hand_computation():
    s = 1 / math.sqrt(2)
    proxies = np.array([[1.0, 0.0], [1.0, 1.0], [0.0, 2.0], [-3.0, 0.0]])
    # cosine similarities: r01 = s, r02 = 0, r03 = -1, r12 = s, r13 = -s, r23 = 0
    index, weight = da.aggregation_rows(proxies, top_p=1, tau=1.0)
    a = da.dense_matrix(index, weight, 4)

    def pair(r_self, r_other):
        e = np.exp([r_self, r_other])
        return e / e.sum()

    expected = np.zeros((4, 4))
    expected[0, [0, 1]] = pair(1, s)
    expected[1, [1, 0]] = pair(1, s)  # r10 = r12 = s: the lower index wins the tie
    expected[2, [2, 1]] = pair(1, s)
    expected[3, [3, 2]] = pair(1, 0)  # r32 = 0 > r31 = -s > r30 = -1
    np.testing.assert_allclose(a, expected, atol=1e-12)
    # the temperature sharpens the same rows
    a_sharp = da.dense_matrix(*da.aggregation_rows(proxies, top_p=1, tau=0.5), 4)
    np.testing.assert_allclose(a_sharp[0, [0, 1]], pair(2, 2 * s), atol=1e-12)


def test_aggregation_matrix_rows_are_sparse_softmaxes_over_the_most_similar():
    rng = np.random.default_rng(0)
    proxies = rng.normal(size=(12, 7))
    top_p = 3
    index, weight = da.aggregation_rows(proxies, top_p=top_p, tau=1.0)
    a = da.dense_matrix(index, weight, 12)
    np.testing.assert_allclose(a.sum(1), 1.0, atol=1e-12)
    assert ((a > 0).sum(1) == top_p + 1).all()
    assert (np.diag(a) > 0).all()
    unit = proxies / np.linalg.norm(proxies, axis=1, keepdims=True)
    r = unit @ unit.T
    for i in range(12):
        chosen = set(np.flatnonzero(a[i]))
        others = sorted(set(range(12)) - {i}, key=lambda j: -r[i, j])
        assert chosen == {i, *others[:top_p]}
        # a_ij proportional to exp(r_ij / tau) inside S_i
        js = sorted(chosen)
        np.testing.assert_allclose(a[i, js] / a[i, js].sum(), np.exp(r[i, js]) / np.exp(r[i, js]).sum())
    # identical proxies: every expert keeps itself, ties go to the lower index
    same = np.array([[1.0, 1.0], [2.0, 2.0], [3.0, 3.0], [1.0, -1.0]])
    a_same = da.dense_matrix(*da.aggregation_rows(same, top_p=1, tau=1.0), 4)
    assert (np.diag(a_same) > 0).all() and ((a_same > 0).sum(1) == 2).all()
    assert set(np.flatnonzero(a_same[2])) == {0, 2} and set(np.flatnonzero(a_same[0])) == {0, 1}
    np.testing.assert_allclose(a_same[2, [0, 2]], [0.5, 0.5])
    # fewer experts than P + 1: S_i is all of them
    a_small = da.dense_matrix(*da.aggregation_rows(proxies[:3], top_p=5, tau=1.0), 3)
    assert ((a_small > 0).sum(1) == 3).all()


def test_build_matrix_over_clients_leaves_unknown_clients_alone():
    rng = np.random.default_rng(1)
    gates = rng.normal(size=(3, 2, 5)).astype(np.float32)  # N=3 clients, K=2, n=5
    known = np.array([True, False, True])
    index, weight = da.build_matrix(gates, known, top_p=2, tau=1.0)
    a = da.dense_matrix(index, weight, 6)
    np.testing.assert_allclose(a.sum(1), 1.0)
    np.testing.assert_allclose(a[2:4], np.eye(6)[2:4])  # client 1: identity rows
    assert (a[:, 2:4][[0, 1, 4, 5]] == 0).all()  # and nobody's candidate
    stacked = gates[[0, 2]].reshape(4, 5)
    sub = da.dense_matrix(*da.aggregation_rows(stacked, 2, 1.0), 4)
    ids = [0, 1, 4, 5]
    np.testing.assert_allclose(a[np.ix_(ids, ids)], sub)
    assert da.requested_experts(index, 0, 2) == sorted({j % 2 for j in np.flatnonzero(a[4:].sum(0)[:2])})
    assert da.requested_experts(index, 1, 2) == []


def test_expert_aggregation_is_the_weighted_sum():
    own = [{"w": torch.full((2, 2), 1.0)}, {"w": torch.full((2, 2), 2.0)}]
    relayed = {(1, 0): {"w": torch.full((2, 2), 10.0)}, (1, 1): {"w": torch.full((2, 2), 20.0)}}
    # client 0, K=2; rows: expert 0 <- 0.5*own0 + 0.25*own1 + 0.25*(1,1); expert 1 <- 0.9*own1 + 0.1*(1,0)
    index = [0, 1, 3, 1, 2, -1]
    weight = [0.5, 0.25, 0.25, 0.9, 0.1, 0.0]
    new = da.aggregate_experts(own, relayed, 0, index, weight, 2)
    assert torch.allclose(new[0]["w"], torch.full((2, 2), 0.5 + 0.5 + 5.0))
    assert torch.allclose(new[1]["w"], torch.full((2, 2), 1.8 + 1.0))
    assert new[0]["w"].dtype == torch.float32


def test_top1_routing_is_the_gate_weighted_output_of_the_chosen_expert():
    cfg = make_cfg(num_experts=3)
    model = da.initial_model(cfg, NUM_CLASSES)
    with torch.no_grad():
        model.gate.weight.normal_(0, 0.5)  # spread the routing over the experts
    x = normalize(DATAS[0].train_x[:32])
    logits, top = model.forward_with_routing(x)
    h = model.embedding(x)
    scores = torch.softmax(h.flatten(1) @ model.gate.weight.T, 1)
    assert torch.equal(top, scores.argmax(1)) and len(set(top.tolist())) > 1
    every = torch.stack([e(h) for e in model.experts], 1)  # [B, K, C]
    manual = scores.max(1).values[:, None] * every[torch.arange(32), top]
    assert torch.allclose(logits, manual, atol=1e-5)
    assert model.gate.bias is None and model.gate.weight.shape == (3, da.embedding_dim(cfg))
    # the gate gets a gradient through the top-1 score
    torch.nn.functional.cross_entropy(logits, DATAS[0].train_y[:32]).backward()
    assert model.gate.weight.grad is not None and model.gate.weight.grad.abs().sum() > 0


# ====================================================================== FedMoE-DA: the protocol
def _fake_replies(algo, cfg, state, server_round, gates=None, value=None):
    """Replies with the declared keys/shapes; gates given per client, experts
    constant ``value(client, k)`` so the relay can be traced."""
    replies = []
    for client in range(cfg.num_clients):
        payload, config = algo.train_payload(state, cfg, client, server_round)
        arrays = {}
        for key, (shape, dtype) in algo.expected_upload(payload, config, cfg).items():
            if key in payload:
                arrays[key] = payload[key].clone()
            elif key == da.GATE_KEY:
                arrays[key] = torch.as_tensor(gates[client], dtype=dtype)
            else:
                k = int(key.split(".")[2])
                arrays[key] = torch.full(shape, float(value(client, k)), dtype=dtype)
        replies.append(Reply(client, 10, arrays))
    return replies


def test_stale_matrix_is_used_between_updates_and_only_requested_experts_travel():
    cfg = make_cfg(num_clients=3, num_experts=2, fedmoe_da_top_p=1, fedmoe_da_interval=3)
    algo = get_algorithm("fedmoe_da")
    state = algo.init_state(cfg, NUM_CLASSES)
    n = da.embedding_dim(cfg)
    rng = np.random.default_rng(0)
    gates_a, gates_b = rng.normal(size=(3, 2, n)), rng.normal(size=(3, 2, n))
    value = lambda client, k: 10 * client + k  # noqa: E731

    # round 1: gate upload round, no matrix yet: no expert is requested or aggregated
    payload, config = algo.train_payload(state, cfg, 0, 1)
    assert config["upload_gate"] and config["upload_experts"] == [] and not config["aggregate"]
    assert not any(k.startswith("relay.") for k in payload)
    state, diag = algo.aggregate(state, _fake_replies(algo, cfg, state, 1, gates_a, value), cfg, 1)
    a1 = (state.extra["agg_index"].copy(), state.extra["agg_weight"].copy())
    assert diag["aggregation_matrix_round"] == 1 and diag["relay_store_experts"] == 0
    np.testing.assert_array_equal(a1[0], da.build_matrix(gates_a, np.ones(3, bool), 1, 1.0)[0])

    # rounds 2, 3: no gate upload; experts requested and aggregated with A(1)
    for rnd in (2, 3):
        payload, config = algo.train_payload(state, cfg, 0, rnd)
        assert not config["upload_gate"]
        assert config["upload_experts"] == da.requested_experts(a1[0], 0, 2)
        state, diag = algo.aggregate(state, _fake_replies(algo, cfg, state, rnd, gates_b, value), cfg, rnd)
        np.testing.assert_array_equal(state.extra["pending_index"], a1[0])
        np.testing.assert_array_equal(state.extra["agg_index"], a1[0])
        assert diag["aggregation_matrix_round"] == 1

    # round 4: gates uploaded again; this round's experts still use the stale A(1) ...
    state, diag = algo.aggregate(state, _fake_replies(algo, cfg, state, 4, gates_b, value), cfg, 4)
    np.testing.assert_array_equal(state.extra["pending_index"], a1[0])
    a4 = da.build_matrix(gates_b, np.ones(3, bool), 1, 1.0)
    np.testing.assert_array_equal(state.extra["agg_index"], a4[0])
    assert diag["aggregation_matrix_round"] == 4 and not np.array_equal(a4[0], a1[0])
    # ... and A(4) from round 5 on
    state, _ = algo.aggregate(state, _fake_replies(algo, cfg, state, 5, gates_b, value), cfg, 5)
    np.testing.assert_array_equal(state.extra["pending_index"], a4[0])

    # the next payload relays exactly the peer experts client 0's rows need, as uploaded
    payload, config = algo.train_payload(state, cfg, 0, 6)
    assert config["aggregate"] and config["client_index"] == 0
    rows = a4[0][0:2]
    peers = {(int(j) // 2, int(j) % 2) for j in rows.reshape(-1) if j >= 0 and int(j) // 2 != 0}
    relayed = da.relayed_experts(payload)
    assert set(relayed) == peers
    for (owner, k), expert in relayed.items():
        for v in expert.values():
            assert torch.all(v == value(owner, k))
    np.testing.assert_allclose(np.array(config["agg_weight"]).reshape(2, -1), a4[1][0:2])
    # server memory: one stored copy per expert some row needs, never more
    needed = {(int(j) // 2, int(j) % 2) for c in range(3) for j in a4[0][2 * c:2 * c + 2].reshape(-1)
              if j >= 0 and int(j) // 2 != c}
    assert algo.stored(state, cfg) == needed


def test_fedmoe_da_client_applies_eq11_before_training_and_uploads_no_private_part():
    cfg = make_cfg(num_clients=2, num_experts=2, fedmoe_da_top_p=1, fedmoe_da_interval=1, local_epochs=1)
    algo = get_algorithm("fedmoe_da")
    state = algo.init_state(cfg, NUM_CLASSES)
    privates = {}
    state, replies, _ = run_round(algo, cfg, state, privates, DATAS, 1)
    # round 1 upload: embedding + gate, no experts (nobody requests before the first matrix)
    assert set(replies[0].arrays) == {"embedding.conv1.weight", "embedding.conv1.bias", "gate.weight"}
    requested = {c: algo.train_payload(state, cfg, c, 2)[1]["upload_experts"] for c in range(2)}
    assert any(requested.values())  # with these seeds some expert is a peer's nearest: relayed
    state, replies, _ = run_round(algo, cfg, state, privates, DATAS, 2)
    for r in replies:  # expert parameters travel only as the requested relay experts
        assert all(k.startswith(("embedding.", "gate.", "relay.up.")) for k in r.arrays)
        up_keys = {k for k in r.arrays if k.startswith("relay.up.")}
        assert up_keys == {f"relay.up.{k}.{name}" for k in requested[r.client_index]
                           for name in da.expert_shapes(cfg, NUM_CLASSES)}
    # the evaluated model of client 0 = its experts after Eq. 11 with the relayed ones
    payload, config = algo.eval_payload(state, cfg, 0)
    arrays, config = over_the_wire(payload, config)
    model = da.client_model(cfg, NUM_CLASSES, arrays, config, privates[0], CPU)
    own = [unprefixed(da.expert_prefix(k), privates[0]) for k in range(2)]
    peers = da.relayed_experts(arrays)
    width = len(config["agg_index"]) // 2
    for k in range(2):
        expected = None
        for j, w in zip(config["agg_index"][k * width:(k + 1) * width], config["agg_weight"][k * width:(k + 1) * width]):
            if j < 0:
                continue
            owner, kk = divmod(j, 2)
            src = own[kk] if owner == 0 else peers[(owner, kk)]
            term = {n: w * v for n, v in src.items()}
            expected = term if expected is None else {n: expected[n] + term[n] for n in term}
        for name, v in state_of(model.experts[k]).items():
            assert torch.allclose(v, expected[name], atol=1e-6), name
    # an upload of the client's experts happens only when a peer row requests them
    upload, _, _ = algo.client_train(ClientStep(arrays=arrays, config={**config, "upload_gate": False, "upload_experts": []}, private=privates[0], data=DATAS[0], cfg=cfg, num_classes=NUM_CLASSES, device=CPU, seed=7))
    assert set(upload) == {"embedding.conv1.weight", "embedding.conv1.bias"}


def test_fedmoe_da_embedding_is_a_plain_average_and_coldstart_averages_private_parts():
    cfg = make_cfg(num_clients=2, num_experts=2)
    algo = get_algorithm("fedmoe_da")
    state = algo.init_state(cfg, NUM_CLASSES)
    replies = _fake_replies(algo, cfg, state, 1, np.zeros((2, 2, da.embedding_dim(cfg))), lambda c, k: 0)
    replies[0].arrays["embedding.conv1.bias"] = torch.full_like(replies[0].arrays["embedding.conv1.bias"], 1.0)
    replies[1].arrays["embedding.conv1.bias"] = torch.full_like(replies[1].arrays["embedding.conv1.bias"], 3.0)
    replies[0].num_samples, replies[1].num_samples = 100, 1  # Eq. 5 ignores sample counts
    state, _ = algo.aggregate(state, replies, cfg, 1)
    assert torch.allclose(state.arrays["embedding.conv1.bias"], torch.full((32,), 2.0))
    private = da.initial_model(cfg, NUM_CLASSES).private_state()
    a = {k: torch.full_like(v, 1.0) for k, v in private.items()}
    b = {k: torch.full_like(v, 5.0) for k, v in private.items()}
    payload, _ = algo.coldstart_payload(state, cfg, [(a, 3), (b, 1)])
    assert not any(k.startswith("relay.") for k in payload)  # not peer-to-peer traffic
    for k in private:
        assert torch.allclose(payload[k], torch.full_like(payload[k], 2.0)), k  # (3*1 + 5) / 4
    assert torch.equal(payload["embedding.conv1.bias"], state.arrays["embedding.conv1.bias"])
    model = da.client_model(cfg, NUM_CLASSES, payload, {}, None, CPU)
    assert torch.allclose(model.gate.weight, torch.full_like(model.gate.weight, 2.0))
