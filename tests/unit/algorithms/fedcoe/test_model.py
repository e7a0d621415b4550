"""FedCoE's model: the mixture over an expert set, the gate's temperature, the correlation plot."""

from __future__ import annotations

import numpy as np
import torch
from fedcoe_flwr.algorithms.fedcoe import FedCoE
from fedcoe_flwr.algorithms.fedcoe.model import FedCoEModel
from fedcoe_flwr.data import load_client_data, normalize


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


def test_correlation_plot_is_written(make_cfg, tmp_path):
    from fedcoe_flwr.algorithms.fedcoe.plots import plot_correlation
    path = plot_correlation(np.array([[0.7, 0.3], [0.2, 0.8], [0.5, 0.5]]), np.array([True, True, False]),
                            tmp_path / "correlation.png")
    assert path.is_file() and path.stat().st_size > 1000


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


def test_local_loss_runs_the_gate_once_and_routes_with_the_mixtures_gate(make_cfg):
    """The gate's routing target is scored on the gate probabilities the mixture used: one gate
    pass per step, the same values as ``gate_probs``."""
    from fedcoe_flwr.algorithms.fedcoe.algorithm import local_loss
    from fedcoe_flwr.algorithms.training import state_of

    cfg = make_cfg(num_experts=3, norm="group", assignment_weight=1.0, assignment_level="class_groups")
    model = FedCoEModel(cfg, 4, [0, 1, 2])
    x, y = torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 3, 0, 1])
    calls = []
    model.gate.register_forward_hook(lambda *_: calls.append(1))
    parts = model.parts(x)
    torch.testing.assert_close(parts.gate, model.gate_probs(x))
    calls.clear()
    local_loss(model, x, y, state_of(model), cfg=cfg, class_expert=(0, 1, 2, 0))
    assert len(calls) == 1


def test_shared_expert_is_the_trunks_head_shared_and_mixed_in_with_its_weight(make_cfg):
    """``shared_expert_weight``: the trunk network's own head is uploaded with the trunk, and
    every prediction is (1 - w) x the routed mixture + w x that head's."""
    from fedcoe_flwr.algorithms.fedcoe.model import TRUNK

    cfg = make_cfg(num_experts=3, norm="group", shared_trunk=True)
    shared = FedCoEModel(cfg.replace(shared_expert_weight=0.25), 4, [0, 1, 2], with_private=False)
    plain = FedCoEModel(cfg, 4, [0, 1, 2], with_private=False)
    head_keys = {k for k in shared.shared_state() if k.startswith(TRUNK + "classifier.")}
    assert head_keys and not {k for k in plain.shared_state() if k.startswith(TRUNK + "classifier.")}
    plain.load_state_dict(shared.state_dict())
    x = torch.randn(5, 3, 16, 16)
    with torch.no_grad():
        own = torch.softmax(shared.trunk.classifier(shared.trunk.head_features(shared.trunk.trunk(x))), 1)
        torch.testing.assert_close(shared.mixture(x)[0], 0.75 * plain.mixture(x)[0] + 0.25 * own)
    state = FedCoE().init_state(cfg.replace(shared_expert_weight=0.25), 4)
    assert head_keys <= set(state.arrays)  # the server starts it and averages it like the trunk


def test_pool_outputs_are_the_gate_each_expert_and_the_shared_expert_alone(make_cfg):
    """One trunk pass gives what the diagnostics score: the gate, each expert alone and the
    shared expert alone, equal to computing each on its own (with and without a shared trunk)."""
    from fedcoe_flwr.algorithms.fedcoe.model import split_pool_outputs

    x = torch.randn(5, 3, 16, 16)
    for overrides in ({"shared_trunk": True, "shared_expert_weight": 0.25},
                      {"shared_trunk": False, "shared_expert_weight": 0.0, "gate_input": "image"}):
        cfg = make_cfg(num_experts=3, norm="group", **overrides)
        model = FedCoEModel(cfg, 4, [0, 1, 2], with_private=False).eval()
        with torch.no_grad():
            gate, experts, shared = split_pool_outputs(model.pool_outputs(x), 3, 4)
            torch.testing.assert_close(gate, model.gate_probs(x))
            for k in range(3):
                torch.testing.assert_close(experts[k], model.expert_alone(k)(x))
            if cfg.shared_expert_weight > 0:
                torch.testing.assert_close(shared, model.head_on_trunk(model.trunk)(x))
            else:
                assert shared is None
