"""FedAvg / FedProx: the sample-weighted average of state dicts and the aggregate step."""

from __future__ import annotations

import math

import pytest
import torch

from fedcoe_flwr.algorithms.base import ClientStep
from fedcoe_flwr.algorithms import get_algorithm
from fedcoe_flwr.algorithms.base import Reply
from fedcoe_flwr.algorithms.training import prefixed, proximal_term, seeded_init, unprefixed, weighted_average
from fedcoe_flwr.algorithms.fedavg import PREFIX, FedAvg
from fedcoe_flwr.algorithms.fedprox import FedProx
from fedcoe_flwr.data import load_client_data
from fedcoe_flwr.server.validation import validate_reply


# ------------------------------------------------------------------ weighted_average
def test_weighted_average_by_hand():
    a = {"w": torch.tensor([1.0, 2.0]), "n": torch.tensor(3), "h": torch.tensor([1.0], dtype=torch.float16)}
    b = {"w": torch.tensor([3.0, 6.0]), "n": torch.tensor(4), "h": torch.tensor([3.0], dtype=torch.float16)}
    out = weighted_average([a, b], [1, 3])
    torch.testing.assert_close(out["w"], torch.tensor([2.5, 5.0]))
    assert out["n"].dtype == torch.int64 and int(out["n"]) == 4  # 3.75 rounded, not truncated
    assert out["h"].dtype == torch.float16 and float(out["h"]) == 2.5
    assert out["w"].dtype == torch.float32


def test_weighted_average_normalises_weights():
    a, b = {"w": torch.tensor([0.0])}, {"w": torch.tensor([10.0])}
    assert float(weighted_average([a, b], [0.2, 0.8])["w"]) == pytest.approx(8.0)
    assert float(weighted_average([a, b], [20, 80])["w"]) == pytest.approx(8.0)
    assert float(weighted_average([a, b], [1, 0])["w"]) == 0.0


def test_weighted_average_of_one_state_is_that_state():
    s = {"w": torch.randn(3, 4), "b": torch.randn(4).double(), "steps": torch.tensor(17)}
    out = weighted_average([s], [42])
    for k in s:
        assert out[k].dtype == s[k].dtype
        torch.testing.assert_close(out[k], s[k])


def test_weighted_average_does_not_modify_its_inputs():
    a, b = {"w": torch.ones(2)}, {"w": torch.zeros(2)}
    weighted_average([a, b], [1, 1])
    assert torch.equal(a["w"], torch.ones(2)) and torch.equal(b["w"], torch.zeros(2))


@pytest.mark.parametrize("states,weights", [([], []), ([{"w": torch.ones(1)}], [0]),
                                            ([{"w": torch.ones(1)}] * 2, [0, 0])])
def test_weighted_average_needs_positive_weight(states, weights):
    with pytest.raises(ValueError):
        weighted_average(states, weights)


def test_prefix_helpers_round_trip():
    state = {"a.weight": torch.ones(2), "b": torch.zeros(1)}
    wire = prefixed("model.", state)
    assert set(wire) == {"model.a.weight", "model.b"}
    back = unprefixed("model.", {**wire, "gate.x": torch.ones(1)})
    assert set(back) == set(state)


def test_proximal_term_by_hand():
    lin = torch.nn.Linear(2, 1)
    anchor = {k: v.detach().clone() for k, v in lin.named_parameters()}
    assert proximal_term([lin], [anchor]).item() == 0.0
    with torch.no_grad():
        lin.weight.add_(torch.tensor([[1.0, 2.0]]))
        lin.bias.add_(3.0)
    term = proximal_term([lin], [anchor])
    assert term.item() == pytest.approx(1 + 4 + 9)
    term.backward()  # gradient 2 (w - anchor)
    torch.testing.assert_close(lin.weight.grad, torch.tensor([[2.0, 4.0]]))


def test_seeded_init_is_reproducible_and_leaves_global_rng_alone():
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = seeded_init(lambda: torch.nn.Linear(4, 4), 5)
    b = seeded_init(lambda: torch.nn.Linear(4, 4), 5)
    assert torch.equal(torch.rand(1), expected_next)
    assert torch.equal(a.weight, b.weight)
    assert not torch.equal(a.weight, seeded_init(lambda: torch.nn.Linear(4, 4), 6).weight)


# ------------------------------------------------------------------ FedAvg
@pytest.fixture
def cnn_cfg(make_cfg):
    return make_cfg(algorithm="fedavg", model="cnn", image_size=16)


def test_get_algorithm():
    assert isinstance(get_algorithm("fedavg"), FedAvg) and not isinstance(get_algorithm("fedavg"), FedProx)
    assert isinstance(get_algorithm("fedprox"), FedProx)
    assert get_algorithm("fedcoe").name == "fedcoe"


def test_fedavg_aggregate_is_the_sample_weighted_average(make_cfg):
    cfg = make_cfg(algorithm="fedavg")  # ResNet-MoE with BatchNorm: integer buffers too
    algo = FedAvg()
    state = algo.init_state(cfg, num_classes=4)
    payload, _ = algo.train_payload(state, cfg, 0, 1)
    assert set(payload) == set(state.arrays) and all(k.startswith(PREFIX) for k in payload)
    replies = []
    for client, (delta, n) in enumerate([(1.0, 10), (-2.0, 30), (4.0, 60)]):
        arrays = {k: v + delta if v.is_floating_point() else v + int(abs(delta)) for k, v in payload.items()}
        replies.append(Reply(client, n, arrays))
    new, diagnostics = algo.aggregate(state, replies, cfg, 1)
    mean_delta = (10 * 1.0 + 30 * -2.0 + 60 * 4.0) / 100  # 1.9
    for key, old in state.arrays.items():
        if old.is_floating_point():
            torch.testing.assert_close(new.arrays[key], old + mean_delta, rtol=1e-5, atol=1e-5)
        else:  # (1*10 + 2*30 + 4*60) / 100 = 3.1 -> 3
            assert new.arrays[key].dtype == old.dtype and int(new.arrays[key]) == int(old) + 3
    assert set(new.arrays) == set(state.arrays)


def test_fedavg_client_train_round_trip(cnn_cfg, cpu):
    algo = FedAvg()
    state = algo.init_state(cnn_cfg, num_classes=4)
    payload, config = algo.train_payload(state, cnn_cfg, 0, 1)
    data = load_client_data(cnn_cfg, 0)
    upload, private, metrics = algo.client_train(ClientStep(arrays=payload, config=config, private=None, data=data, cfg=cnn_cfg, num_classes=4, device=cpu, seed=0))
    assert private is None
    assert metrics["num_samples"] == data.num_train and math.isfinite(metrics["train_loss"])
    assert set(upload) == set(payload)
    assert any(not torch.equal(upload[k], payload[k]) for k in payload)
    expected = algo.expected_upload(payload, config, cnn_cfg)
    assert validate_reply(upload, metrics, expected, payload, cnn_cfg.max_update_norm_ratio) is None
    # a one-client round returns exactly that client's model
    new, _ = algo.aggregate(state, [Reply(0, metrics["num_samples"], upload)], cnn_cfg, 1)
    for k in upload:
        torch.testing.assert_close(new.arrays[k], upload[k])
    predict = algo.global_predict(new, cnn_cfg, 4, cpu)
    with torch.no_grad():
        p = predict(torch.randn(3, 3, 16, 16))
    assert p.shape == (3, 4)
    torch.testing.assert_close(p.sum(1), torch.ones(3))


def test_fedprox_anchors_to_the_global_model(cnn_cfg, cpu):
    """With lr * mu = 1 each step pulls the weights back to the global model, so FedProx
    drifts about one step's worth; FedAvg (which ignores prox_mu) drifts every step."""
    data = load_client_data(cnn_cfg, 0)
    cfg = cnn_cfg.replace(lr=0.01, momentum=0.0, local_epochs=2)
    state = FedAvg().init_state(cfg, 4)
    payload, config = FedAvg().train_payload(state, cfg, 0, 1)

    def upload(algo, mu):
        return algo.client_train(ClientStep(arrays=payload, config=config, private=None, data=data, cfg=cfg.replace(prox_mu=mu), num_classes=4, device=cpu, seed=0))[0]

    def drift(arrays):
        return sum(float((arrays[k] - payload[k]).norm()) for k in payload if payload[k].is_floating_point())

    free = upload(FedAvg(), 100.0)
    assert drift(upload(FedProx(), 100.0)) < 0.5 * drift(free)
    same = upload(FedProx(), 0.0)  # mu = 0: FedProx is FedAvg, step for step
    for k in payload:
        torch.testing.assert_close(same[k], free[k])
