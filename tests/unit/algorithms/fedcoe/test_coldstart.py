"""FedCoE's cold start with no gradient step: EM label prior, AdaBN, the reported variants."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn
from harness import assert_same, clone

from fedcoe_flwr.algorithms.base import ClientStep
from fedcoe_flwr.algorithms.fedcoe import FedCoE
from fedcoe_flwr.algorithms.adaptation import reestimate_batchnorm
from fedcoe_flwr.algorithms.fedcoe.coldstart import coldstart_evaluate, training_prior
from fedcoe_flwr.algorithms.fedcoe.model import TRAIN_PRIOR, FedCoEModel
from fedcoe_flwr.algorithms.adaptation import em_label_prior, prior_correct
from fedcoe_flwr.data import load_client_data, load_dataset, normalize


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


def test_configured_coldstart_starts_em_from_the_evaluations_predicted_prior(make_cfg, cpu):
    """The configured adaptation (what an onboarded node keeps) and the reported EM variant use
    the same prior: the one the evaluation predicted and sent, not the package's own."""
    from fedcoe_flwr.algorithms.adaptation import TRAIN_PRIOR_KEY
    from fedcoe_flwr.algorithms.fedcoe.coldstart import adapt_new_client

    cfg = make_cfg(num_experts=2, norm="group")
    algo = FedCoE()
    state = algo.init_state(cfg, 4)
    state.extra["train_prior"] = np.array([0.4, 0.3, 0.2, 0.1])
    arrays, config = algo.coldstart_payload(state, cfg)
    data = load_client_data(cfg, cfg.num_clients)
    predicted = [0.1, 0.1, 0.1, 0.7]
    out = algo.client_coldstart(ClientStep(arrays=arrays, config={**config, TRAIN_PRIOR_KEY: predicted}, data=data,
                                           cfg=cfg, num_classes=4, device=cpu, private=None))
    assert out["coldstart_accuracy"] == out["coldstart_accuracy_em"]
    new = adapt_new_client(arrays, data.train_x, cfg, 4, cpu, torch.tensor(predicted))
    torch.testing.assert_close(new.train_prior, torch.tensor(predicted))
    assert not torch.allclose(adapt_new_client(arrays, data.train_x, cfg, 4, cpu).train_prior, new.train_prior)
    uniform = adapt_new_client(arrays, data.train_x, cfg.replace(coldstart_prior="uniform"), 4, cpu,
                               torch.tensor(predicted))
    torch.testing.assert_close(uniform.train_prior, torch.full((4,), 0.25))


def test_configured_coldstart_runs_em_at_the_federations_temperature(make_cfg, cpu):
    """With the federation's calibration in the package, the configured adaptation (what an
    onboarded node keeps) is EM on the posteriors at that temperature from the prior predicted at
    it: the reported ``em_calibrated`` variant, and the saved model predicts the same."""
    from fedcoe_flwr.algorithms.adaptation import Calibration, calibration_config, tempered
    from fedcoe_flwr.algorithms.fedcoe.coldstart import adapt_new_client, pool_model
    from fedcoe_flwr.algorithms.training import predict_probs

    cfg = make_cfg(num_experts=2, norm="group")
    algo = FedCoE()
    state = algo.init_state(cfg, 4)
    arrays, config = algo.coldstart_payload(state, cfg)
    data = load_client_data(cfg, cfg.num_clients)
    calibration = Calibration(3.0, torch.tensor([0.55, 0.25, 0.15, 0.05]))
    step = ClientStep(arrays=arrays, config={**config, **calibration_config(calibration)}, data=data, cfg=cfg,
                      num_classes=4, device=cpu, private=None)
    out = algo.client_coldstart(step)
    assert out["coldstart_accuracy"] == out["coldstart_accuracy_em_calibrated"]

    new = adapt_new_client(arrays, data.train_x, cfg, 4, cpu, calibration=calibration)
    assert new.temperature == 3.0
    torch.testing.assert_close(new.train_prior, calibration.prior)
    pool = pool_model(arrays, cfg, 4, cpu)
    probs = tempered(predict_probs(lambda x: pool.mixture(x)[0], data.train_x, cfg, cpu), 3.0)
    torch.testing.assert_close(new.prior, em_label_prior(probs, calibration.prior))
    x = normalize(data.test_x[:16])
    expected = prior_correct(tempered(pool.mixture(x)[0].detach(), 3.0), new.prior, calibration.prior)
    torch.testing.assert_close(new.predict(x), expected)
    plain = adapt_new_client(arrays, data.train_x, cfg, 4, cpu)
    assert plain.temperature == 1.0 and not torch.allclose(plain.prior, new.prior)

    bundle, _ = algo.onboard(step, data.train_x)
    assert bundle["temperature"] == 3.0
    torch.testing.assert_close(algo.bundle_predictor(bundle, cfg, 4, cpu)(x), expected)
