"""FedCoE: the aggregation math (smoothed, capped correlation weights; untouched
experts; BatchNorm statistics by samples), the server state, per-client payloads,
the client update, and the cold-start adaptations (EM label prior, AdaBN)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from fedcoe_flwr.algorithms.base import ClientStep
from fedcoe_flwr.algorithms.base import Reply
from fedcoe_flwr.algorithms.training import unprefixed
from fedcoe_flwr.algorithms.fedcoe import FedCoE
from fedcoe_flwr.algorithms.fedcoe.aggregation import (aggregate_expert, aggregate_pool, cap_shares, expert_set,
                                                       expert_weights, routing_diagnostics)
from fedcoe_flwr.algorithms.fedcoe.coldstart import coldstart_evaluate, reestimate_batchnorm, training_prior
from fedcoe_flwr.algorithms.fedcoe.model import (CLASS_MARGINAL, CORRELATION, GATE, LOCAL_PRIOR, TRAIN_PRIOR,
                                                 FedCoEModel, expert_prefix)
from fedcoe_flwr.algorithms.fedcoe.params import experts_per_client
from fedcoe_flwr.algorithms.fedcoe.priors import em_label_prior, prior_correct
from fedcoe_flwr.data import load_client_data, load_dataset, normalize
from fedcoe_flwr.server.validation import validate_reply


# This module switches each lever on explicitly: its configs start from the first design
# (whole expert networks, no level-2 extras, raw global model); test_default_design_*
# checks the shipped defaults.
FIRST_DESIGN = dict(shared_trunk=False, gate_input="image", aux_weight=1.0, local_prior_correction=False,
                    local_loss_weight=0.0, global_balanced=False)


@pytest.fixture
def make_cfg(make_cfg):
    return lambda **overrides: make_cfg(**{**FIRST_DESIGN, **overrides})


def clone(arrays):
    return {k: v.clone() for k, v in arrays.items()}


def assert_same(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


# ============================================================== expert sets
def test_expert_set_is_top_m_of_the_row_sorted():
    row = np.array([0.1, 0.5, 0.05, 0.35])
    assert expert_set(row, 2, 4) == [1, 3]
    assert expert_set(row, 1, 4) == [1]
    assert expert_set(row, 3, 4) == [0, 1, 3]


def test_expert_set_is_everything_when_unknown_or_m_is_k():
    assert expert_set(None, 2, 4) == [0, 1, 2, 3]
    assert expert_set(np.array([0.7, 0.1, 0.1, 0.1]), 4, 4) == [0, 1, 2, 3]


def test_expert_set_ties_are_deterministic():
    assert expert_set(np.full(4, 0.25), 2, 4) == [0, 1]


# ============================================================== cap_shares
@pytest.mark.parametrize("shares,cap,expected", [
    ([0.7, 0.2, 0.1], 0.5, [0.5, 1 / 3, 1 / 6]),  # excess handed out in proportion
    ([0.6, 0.35, 0.05], 0.4, [0.4, 0.4, 0.2]),  # the hand-out pushes a second one over: cap it too
    ([0.2, 0.3, 0.5], 0.5, [0.2, 0.3, 0.5]),  # at the cap: unchanged
    ([0.9, 0.1], 0.3, [0.5, 0.5]),  # infeasible (2 contributors, cap 0.3): cap raised to 1/2
    ([5.0], 0.5, [1.0]),  # one contributor takes it all
    ([7.0, 2.0, 1.0], 0.5, [0.5, 1 / 3, 1 / 6]),  # unnormalised input
])
def test_cap_shares_by_hand(shares, cap, expected):
    np.testing.assert_allclose(cap_shares(np.array(shares), cap), expected, rtol=1e-9)


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("cap", [0.15, 0.3, 0.5, 1.0])
def test_cap_shares_properties(seed, cap):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 9))
    raw = rng.dirichlet(np.full(n, 0.3)) * rng.uniform(0.5, 100)
    out = cap_shares(raw, cap)
    assert out.shape == raw.shape
    assert out.sum() == pytest.approx(1.0, abs=1e-9)
    assert (out >= 0).all()
    assert out.max() <= max(cap, 1 / n) + 1e-9
    # order preserved: a larger raw share never ends up with less
    order = np.argsort(raw, kind="stable")
    assert np.all(np.diff(out[order]) >= -1e-12)
    # shares already under the cap are untouched up to a common scale
    if (raw / raw.sum()).max() <= max(cap, 1 / n):
        np.testing.assert_allclose(out, raw / raw.sum(), rtol=1e-9)


def test_cap_shares_with_zero_shares_still_sums_to_one():
    out = cap_shares(np.array([1.0, 0.0, 0.0]), 0.5)
    assert out.sum() == pytest.approx(1.0)
    assert out.max() == pytest.approx(0.5)


# ============================================================== expert_weights
def test_expert_weights_smoothing_and_cap_by_hand(make_cfg):
    n = np.array([100, 300])
    rows = np.array([[0.9, 0.1], [0.2, 0.8]])
    cfg = make_cfg(correlation_smoothing=0.5, correlation_cap=1.0)
    # expert 0: 100 * (0.45 + 0.25) = 70, 300 * (0.10 + 0.25) = 105
    np.testing.assert_allclose(expert_weights(n, rows, 0, cfg), [0.4, 0.6])
    # expert 1: 100 * 0.30 = 30, 300 * 0.65 = 195
    np.testing.assert_allclose(expert_weights(n, rows, 1, cfg), [30 / 225, 195 / 225])
    np.testing.assert_allclose(expert_weights(n, rows, 1, cfg.replace(correlation_cap=0.7)), [0.3, 0.7])
    # pure correlation weighting: 90 vs 60, 10 vs 240
    pure = cfg.replace(correlation_smoothing=0.0)
    np.testing.assert_allclose(expert_weights(n, rows, 0, pure), [0.6, 0.4])
    np.testing.assert_allclose(expert_weights(n, rows, 1, pure), [0.04, 0.96])
    # full smoothing: plain sample weights
    np.testing.assert_allclose(expert_weights(n, rows, 1, cfg.replace(correlation_smoothing=1.0)), [0.25, 0.75])
    # correlation weighting off: sample weights, no cap
    off = cfg.replace(correlation_weighting=False, correlation_cap=0.5)
    np.testing.assert_allclose(expert_weights(n, rows, 1, off), [0.25, 0.75])


def test_expert_weights_default_cap_stops_a_takeover(make_cfg):
    cfg = make_cfg()  # defaults: smoothing 0.5, cap 0.5
    n = np.array([1000, 50, 50, 50])
    rows = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    w = expert_weights(n, rows, 0, cfg)
    assert w.sum() == pytest.approx(1.0) and w.max() == pytest.approx(0.5)


# ============================================================== aggregate_expert / aggregate_pool
def scalar_expert(w: float, bn_mean: float, batches: int) -> dict[str, torch.Tensor]:
    return {"conv.weight": torch.tensor([w, -w], dtype=torch.float32),
            "bn.weight": torch.tensor([w]),
            "bn.running_mean": torch.tensor([bn_mean]),
            "bn.running_var": torch.tensor([bn_mean * 2]),
            "bn.num_batches_tracked": torch.tensor(batches)}


def test_aggregate_expert_batchnorm_by_samples_not_correlation():
    states = [scalar_expert(1.0, 10.0, 4), scalar_expert(2.0, 20.0, 8)]
    out = aggregate_expert(states, np.array([0.9, 0.1]), np.array([100.0, 300.0]))
    torch.testing.assert_close(out["conv.weight"], torch.tensor([1.1, -1.1]))  # correlation shares
    torch.testing.assert_close(out["bn.weight"], torch.tensor([1.1]))  # affine BN params are parameters
    torch.testing.assert_close(out["bn.running_mean"], torch.tensor([17.5]))  # samples 1:3
    torch.testing.assert_close(out["bn.running_var"], torch.tensor([35.0]))
    assert out["bn.num_batches_tracked"].dtype == torch.int64 and int(out["bn.num_batches_tracked"]) == 7


@pytest.mark.parametrize("smoothing,cap,expected0,expected1,max_share", [
    (0.5, 1.0, 1.6, 28 / 15, [0.6, 13 / 15]),
    (0.5, 0.5, 1.5, 1.5, [0.5, 0.5]),
    (0.5, 0.7, 1.6, 1.7, [0.6, 0.7]),
    (0.0, 1.0, 1.4, 1.96, [0.6, 0.96]),
])
def test_aggregate_pool_two_clients_by_hand(make_cfg, smoothing, cap, expected0, expected1, max_share):
    """Client A: n=100, row (0.9, 0.1), experts hold w=1; client B: n=300, row (0.2, 0.8), w=2."""
    cfg = make_cfg(correlation_smoothing=smoothing, correlation_cap=cap)
    pool = [scalar_expert(0.0, 0.0, 0), scalar_expert(0.0, 0.0, 0)]
    a, b = scalar_expert(1.0, 10.0, 4), scalar_expert(2.0, 20.0, 8)
    contributions = [({0: a, 1: a}, np.array([0.9, 0.1]), 100), ({0: b, 1: b}, np.array([0.2, 0.8]), 300)]
    new_pool, shares = aggregate_pool(pool, contributions, cfg)
    assert new_pool[0]["conv.weight"][0].item() == pytest.approx(expected0, rel=1e-6)
    assert new_pool[1]["conv.weight"][0].item() == pytest.approx(expected1, rel=1e-6)
    assert shares == pytest.approx(max_share, rel=1e-9)
    for expert in new_pool:  # BN statistics: samples only, whatever the correlation
        assert expert["bn.running_mean"].item() == pytest.approx(17.5)
        assert int(expert["bn.num_batches_tracked"]) == 7


def test_expert_nobody_received_stays_as_it_was(make_cfg):
    cfg = make_cfg()
    pool = [scalar_expert(float(k), float(k), k) for k in range(3)]
    before = [clone(e) for e in pool]
    a, b = scalar_expert(5.0, 5.0, 5), scalar_expert(7.0, 7.0, 7)
    contributions = [({0: a}, np.array([0.8, 0.1, 0.1]), 10), ({0: b, 1: b}, np.array([0.1, 0.8, 0.1]), 30)]
    new_pool, shares = aggregate_pool(pool, contributions, cfg)
    assert_same(new_pool[2], before[2])
    assert shares[2] is None
    assert_same(new_pool[1], b)  # a single contributor is the expert (cap raised to 1)
    assert shares[1] == pytest.approx(1.0)
    assert 5.0 < new_pool[0]["conv.weight"][0].item() < 7.0


def test_no_contributions_leave_the_pool_unchanged(make_cfg):
    pool = [scalar_expert(1.0, 1.0, 1), scalar_expert(2.0, 2.0, 2)]
    new_pool, shares = aggregate_pool(pool, [], make_cfg())
    for new, old in zip(new_pool, pool):
        assert_same(new, old)
    assert shares == [None, None]


@pytest.mark.parametrize("smoothing,cap", [(0.5, 0.5), (0.0, 1.0), (0.9, 0.3)])
def test_identical_states_average_to_themselves(make_cfg, smoothing, cap):
    """Shares sum to one: averaging copies of one state returns that state."""
    cfg = make_cfg(correlation_smoothing=smoothing, correlation_cap=cap)
    torch.manual_seed(0)
    state = {"w": torch.randn(4, 3), "bn.running_var": torch.rand(3) + 0.5,
             "bn.num_batches_tracked": torch.tensor(12)}
    rng = np.random.default_rng(0)
    contributions = [({0: clone(state)}, rng.dirichlet(np.ones(2)), int(rng.integers(1, 500))) for _ in range(5)]
    new_pool, _ = aggregate_pool([{k: torch.zeros_like(v) for k, v in state.items()}, state], contributions, cfg)
    torch.testing.assert_close(new_pool[0]["w"], state["w"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(new_pool[0]["bn.running_var"], state["bn.running_var"], rtol=1e-6, atol=1e-6)
    assert int(new_pool[0]["bn.num_batches_tracked"]) == 12


# ============================================================== server: init, payloads, aggregate
@pytest.fixture
def fedcoe_cfg(make_cfg):
    return make_cfg(num_experts=3, top_m=2, correlation_smoothing=0.5, correlation_cap=1.0)


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


# ============================================================== client side
@pytest.fixture
def trained(fedcoe_cfg, cpu):
    """One FedCoE client update of client 0, whose correlation row is known (2 of 3 experts)."""
    algo = FedCoE()
    state = algo.init_state(fedcoe_cfg, 4)
    state.extra["correlation"][0] = [0.5, 0.1, 0.4]
    state.extra["correlation_known"][0] = True
    payload, config = algo.train_payload(state, fedcoe_cfg, 0, 1)
    data = load_client_data(fedcoe_cfg, 0)
    upload, private, metrics = algo.client_train(ClientStep(arrays=payload, config=config, private=None, data=data, cfg=fedcoe_cfg, num_classes=4, device=cpu, seed=7))
    return dict(algo=algo, state=state, payload=payload, config=config, data=data, upload=upload,
                private=private, metrics=metrics)


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


def test_model_mixture_restricted_to_top_experts(fedcoe_cfg):
    model = FedCoEModel(fedcoe_cfg, 4, [0, 1, 2], with_private=False)
    model.eval()
    x = torch.randn(6, 3, 16, 16)
    with torch.no_grad():
        full, _ = model.mixture(x)
        top1, _ = model.mixture(x, per_sample_top=1)
        best = model.gate_probs(x).argmax(1)
        for i in range(6):  # top-1: exactly the most gated expert's prediction
            expert = model.expert[str(int(best[i]))]
            torch.testing.assert_close(top1[i], torch.softmax(expert(x[i:i + 1]), 1)[0], rtol=1e-5, atol=1e-6)
        p, y = model(x)
    torch.testing.assert_close(p, y)  # no private part: the personalised model is the mixture
    torch.testing.assert_close(full.sum(1), torch.ones(6))


# ============================================================== cold start
def test_em_label_prior_recovers_a_label_shift():
    """Calibrated posteriors under a uniform training prior; the new client's labels
    follow q. EM must recover q from the posteriors alone."""
    rng = np.random.default_rng(0)
    q = np.array([0.6, 0.25, 0.1, 0.05])
    means = np.array([-3.0, -1.0, 1.0, 3.0])
    y = rng.choice(4, size=20000, p=q)
    x = rng.normal(means[y], 1.0)
    logits = -0.5 * (x[:, None] - means[None]) ** 2
    posteriors = torch.softmax(torch.tensor(logits), dim=1).float()
    uniform = torch.full((4,), 0.25)
    assert (posteriors.mean(0) - torch.tensor(q, dtype=torch.float32)).abs().max() > 0.05  # naive is off
    prior = em_label_prior(posteriors, uniform, iters=500)
    np.testing.assert_allclose(prior.numpy(), q, atol=0.02)
    assert prior.sum().item() == pytest.approx(1.0, abs=1e-5)
    # correcting with it moves accuracy up on the shifted data
    before = (posteriors.argmax(1).numpy() == y).mean()
    after = (prior_correct(posteriors, prior, uniform).argmax(1).numpy() == y).mean()
    assert after > before + 0.02


def test_em_label_prior_keeps_a_matching_prior():
    probs = torch.softmax(torch.randn(500, 3), 1)
    prior = torch.full((3,), 1 / 3)
    torch.testing.assert_close(prior_correct(probs, prior, prior), probs)


def test_reestimate_batchnorm_uses_the_local_data(make_cfg, cpu):
    cfg = make_cfg(eval_batch_size=32)
    model = nn.Sequential(nn.BatchNorm2d(3))
    model[0].momentum = 0.3
    x = torch.randint(100, 256, (128, 3, 4, 4), dtype=torch.uint8)  # bright: mean far from 0
    weight, bias = model[0].weight.clone(), model[0].bias.clone()
    assert reestimate_batchnorm(model, x, cfg, cpu) is True
    xn = normalize(x)
    torch.testing.assert_close(model[0].running_mean, xn.mean(dim=(0, 2, 3)), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(model[0].running_var, xn.var(dim=(0, 2, 3)), rtol=0.05, atol=1e-3)
    assert torch.equal(model[0].weight, weight) and torch.equal(model[0].bias, bias)
    assert model[0].momentum == 0.3 and not model.training


def test_reestimate_batchnorm_on_an_expert(make_cfg, cpu):
    cfg = make_cfg()
    model = FedCoEModel(cfg, 4, [0, 1, 2], with_private=False)
    params = {k: v.clone() for k, v in model.named_parameters()}
    buffers = {k: v.clone() for k, v in model.named_buffers()}
    x = torch.randint(0, 256, (40, 3, 16, 16), dtype=torch.uint8)
    assert reestimate_batchnorm(model, x, cfg, cpu)
    for k, v in model.named_parameters():
        assert torch.equal(v, params[k]), k
    changed = [k for k, v in model.named_buffers() if k.endswith("running_mean") and not torch.equal(v, buffers[k])]
    assert len(changed) == sum(k.endswith("running_mean") for k in buffers) > 0
    no_bn = FedCoEModel(make_cfg(norm="group"), 4, [0], with_private=False)
    assert reestimate_batchnorm(no_bn, x, cfg, cpu) is False


@pytest.mark.parametrize("adabn,em,norm,key", [
    (True, True, "batch", "coldstart_accuracy_adabn_em"),
    (True, False, "batch", "coldstart_accuracy_adabn"),
    (False, True, "batch", "coldstart_accuracy_em"),
    (False, False, "batch", "coldstart_accuracy_plain"),
    (True, True, "group", "coldstart_accuracy_em"),  # AdaBN has nothing to adapt
])
def test_coldstart_evaluate_changes_no_parameters_and_reports_variants(make_cfg, cpu, adabn, em, norm, key):
    cfg = make_cfg(coldstart_adabn=adabn, coldstart_em=em, norm=norm, num_experts=2)
    algo = FedCoE()
    state = algo.init_state(cfg, 4)
    arrays, config = algo.coldstart_payload(state, cfg)
    before = clone(arrays)
    data = load_client_data(cfg, cfg.num_clients)  # the cold-start partition
    out = algo.client_coldstart(ClientStep(arrays=arrays, config=config, data=data, cfg=cfg, num_classes=4, device=cpu, private=None))
    assert_same(arrays, before)
    assert_same(state.arrays, {k: v for k, v in before.items() if k != TRAIN_PRIOR})
    variants = {"coldstart_accuracy_plain", "coldstart_accuracy_em"}
    if norm == "batch":
        variants |= {"coldstart_accuracy_adabn", "coldstart_accuracy_adabn_em"}
    assert variants | {"coldstart_accuracy"} == {k for k in out if k.startswith("coldstart_accuracy")}
    assert out["coldstart_accuracy"] == out[key]
    for k in variants:
        assert 0.0 <= out[k] <= 1.0
    assert out["num_test"] == len(data.test_y)
    assert len(out["routing_row"]) == 2 and sum(out["routing_row"]) == pytest.approx(1.0, abs=1e-5)


def test_coldstart_accuracy_matches_a_direct_computation(make_cfg, cpu):
    """Plain cold-start accuracy is the pool's mixture scored on the local test split."""
    cfg = make_cfg(num_experts=2, norm="group")
    algo = FedCoE()
    state = algo.init_state(cfg, 4)
    data = load_client_data(cfg, cfg.num_clients)
    out = coldstart_evaluate(state.arrays, data, cfg, 4, cpu)
    predict = algo.global_predict(state, cfg, 4, cpu)
    with torch.no_grad():
        acc = (predict(normalize(data.test_x)).argmax(1) == data.test_y).float().mean().item()
    assert out["coldstart_accuracy_plain"] == pytest.approx(acc)
    assert load_dataset(cfg).num_classes == 4


# ============================================================== shared trunk, diagnostics, EM prior
def client_model(algo, payload, config, private, cfg, cpu):
    """The client's prediction function and the same model rebuilt by hand (experts 0, 1)."""
    predict = algo.client_predict(ClientStep(arrays=payload, config=config, private=private, cfg=cfg, num_classes=4, device=cpu, data=None))
    model = FedCoEModel(cfg, 4, [0, 1])
    model.load_shared(payload)
    model.load_private(private)
    model.eval()
    return predict, model


def test_shared_trunk_payload_holds_one_trunk_and_expert_heads(make_cfg, cpu):
    cfg = make_cfg(model="cnn", shared_trunk=True, num_experts=3, norm="none")
    algo = FedCoE()
    state = algo.init_state(cfg, 4)
    trunk_keys = {k for k in state.arrays if k.startswith("trunk.")}
    assert trunk_keys == {"trunk.conv1.weight", "trunk.conv1.bias", "trunk.conv2.weight", "trunk.conv2.bias"}
    for k in range(3):  # heads only: fc1 and the classifier, never a convolution
        keys = {key[len(expert_prefix(k)):] for key in state.arrays if key.startswith(expert_prefix(k))}
        assert keys == {"fc1.weight", "fc1.bias", "classifier.weight", "classifier.bias"}
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


def test_routing_diagnostics_by_hand():
    same = routing_diagnostics(np.array([[0.5, 0.5], [0.5, 0.5]]))
    assert same["expert_usage_entropy"] == pytest.approx(1.0)
    assert same["correlation_row_entropy"] == pytest.approx(1.0)
    assert same["correlation_spread"] == pytest.approx(0.0)
    split = routing_diagnostics(np.array([[1.0, 0.0], [0.0, 1.0]]))
    assert split["expert_usage_entropy"] == pytest.approx(1.0)  # both experts used ...
    assert split["correlation_row_entropy"] == pytest.approx(0.0, abs=1e-9)  # ... each by one client
    assert split["correlation_spread"] == pytest.approx(0.5)
    collapsed = routing_diagnostics(np.array([[1.0, 0.0], [1.0, 0.0]]))
    assert collapsed["expert_usage_entropy"] == pytest.approx(0.0, abs=1e-9)
    assert routing_diagnostics(np.zeros((0, 3))) == {"expert_usage": []}


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


def test_em_needs_the_training_prior_the_pool_learned_under():
    """Posteriors of a model trained under a skewed prior; a new client with another
    skew. EM from the true training prior recovers the client's prior; assuming a
    uniform training prior does not."""
    rng = np.random.default_rng(0)
    train_prior = torch.tensor([0.6, 0.3, 0.1])
    q = np.array([0.1, 0.2, 0.7])
    y = rng.choice(3, size=4000, p=q)
    likelihood = np.array([[0.7, 0.2, 0.1], [0.2, 0.6, 0.2], [0.1, 0.2, 0.7]])  # p(x-bin | y)
    bins = np.array([rng.choice(3, p=likelihood[c]) for c in y])
    joint = likelihood.T * train_prior.numpy()  # p(bin, y) under training
    posteriors = torch.tensor(joint[bins] / joint[bins].sum(1, keepdims=True), dtype=torch.float32)
    right = em_label_prior(posteriors, train_prior, iters=1000)
    wrong = em_label_prior(posteriors, torch.full((3,), 1 / 3), iters=1000)
    np.testing.assert_allclose(right.numpy(), q, atol=0.05)
    assert np.abs(wrong.numpy() - q).max() > 0.1


def test_coldstart_reports_em_with_both_priors_when_they_differ(make_cfg, cpu):
    cfg = make_cfg(num_experts=2, norm="group")
    algo = FedCoE()
    state = algo.init_state(cfg, 4)
    state.extra["train_prior"] = np.array([0.4, 0.3, 0.2, 0.1])
    arrays, config = algo.coldstart_payload(state, cfg)
    torch.testing.assert_close(training_prior(arrays, cfg, 4), torch.tensor([0.4, 0.3, 0.2, 0.1]))
    out = algo.client_coldstart(ClientStep(arrays=arrays, config=config, data=load_client_data(cfg, cfg.num_clients), cfg=cfg, num_classes=4, device=cpu, private=None))
    assert {"coldstart_accuracy_em", "coldstart_accuracy_em_uniform"} <= set(out)
    uniform_cfg = cfg.replace(coldstart_prior="uniform")
    assert TRAIN_PRIOR not in algo.coldstart_payload(state, uniform_cfg)[0]
    torch.testing.assert_close(training_prior(arrays, uniform_cfg, 4), torch.full((4,), 0.25))


def test_correlation_plot_is_written(make_cfg, tmp_path):
    from fedcoe_flwr.algorithms.fedcoe.plots import plot_correlation
    path = plot_correlation(np.array([[0.7, 0.3], [0.2, 0.8], [0.5, 0.5]]), np.array([True, True, False]),
                            tmp_path / "correlation.png")
    assert path.is_file() and path.stat().st_size > 1000


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


@pytest.mark.parametrize("model", ["cnn", "resnet_moe"])
def test_gate_on_trunk_routes_on_the_trunks_features_and_trains_it(make_cfg, cpu, model):
    cfg = make_cfg(model=model, shared_trunk=True, gate_input="trunk", num_experts=3, norm="none")
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
    assert net.gate.body[0].in_channels == h.shape[1]
    # a round trip: the upload validates and the gate's gradient reaches the trunk
    payload, config = algo.train_payload(state, cfg, 0, 1)
    upload, _, metrics = algo.client_train(ClientStep(arrays=payload, config=config, private=None, data=data, cfg=cfg, num_classes=4, device=cpu, seed=3))
    assert validate_reply(upload, metrics, algo.expected_upload(payload, config, cfg), payload,
                          cfg.max_update_norm_ratio) is None
    net.zero_grad()
    net.gate_probs(x)[:, 0].sum().backward()
    first = next(p for name, p in net.trunk.named_parameters() if name.startswith(net.trunk.trunk_prefixes))
    assert first.grad is not None and first.grad.abs().sum() > 0  # the trunk's first convolution


def test_gate_on_trunk_needs_the_shared_trunk(make_cfg):
    from fedcoe_flwr.config import ConfigError
    with pytest.raises(ConfigError, match="gate_input.*shared_trunk=true"):
        make_cfg(model="cnn", gate_input="trunk")


def test_gate_temperature_sharpens_routing(make_cfg):
    cfg = make_cfg(num_experts=3, norm="group")
    sharp = cfg.replace(gate_temperature=0.25)
    state = FedCoE().init_state(cfg, 4)
    x = normalize(load_client_data(cfg, 0).train_x[:8])
    probs = []
    for c in (cfg, sharp):
        model = FedCoEModel(c, 4, [0, 1, 2], with_private=False)
        model.load_shared(state.arrays)
        with torch.no_grad():
            probs.append(model.gate_probs(x))
    torch.testing.assert_close(probs[1], torch.softmax(torch.log(probs[0]) / 0.25, 1), rtol=1e-4, atol=1e-6)
    assert probs[1].max(1).values.mean() > probs[0].max(1).values.mean()


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


def test_global_balanced_divides_out_the_training_prior(make_cfg, cpu):
    cfg = make_cfg(num_experts=2, norm="group", global_balanced=True)
    algo = FedCoE()
    state = algo.init_state(cfg, 4)
    state.extra["train_prior"] = np.array([0.4, 0.3, 0.2, 0.1])
    x = normalize(load_client_data(cfg, 0).test_x[:8])
    with torch.no_grad():
        raw = algo.global_predict(state, cfg.replace(global_balanced=False), 4, cpu)(x)
        balanced = algo.global_predict(state, cfg, 4, cpu)(x)
    torch.testing.assert_close(balanced, prior_correct(raw, torch.full((4,), 0.25),
                                                       torch.tensor([0.4, 0.3, 0.2, 0.1])))
    from fedcoe_flwr.data import load_global_test
    gx, gy = load_global_test(cfg)
    assert "global_accuracy_raw" in algo.global_diagnostics(state, cfg, 4, cpu, gx, gy)


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
    """The shipped defaults (shared trunk, local prior correction, local loss, balanced
    global model): one client update validates, aggregates, and every prediction is a
    probability vector."""
    from fedcoe_flwr.config import ExperimentConfig, from_dict
    from conftest import TINY
    cfg = from_dict({**TINY, "cache_dir": str(tmp_path / "cache"), "model": "cnn"})
    defaults = ExperimentConfig()
    assert cfg.shared_trunk and cfg.local_prior_correction and cfg.global_balanced and cfg.local_loss_weight > 0
    assert (defaults.shared_trunk, defaults.local_part, defaults.coldstart_prior) == (True, "head", "predicted")
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
    x = normalize(data.test_x[:5])
    with torch.no_grad():
        for probs in (algo.global_predict(new, cfg, 4, cpu)(x),
                      algo.client_predict(ClientStep(arrays=algo.eval_payload(new, cfg, 0)[0], config=config, private=private, cfg=cfg, num_classes=4, device=cpu, data=None))(x)):
            assert probs.shape == (5, 4) and torch.allclose(probs.sum(1), torch.ones(5), atol=1e-5)
