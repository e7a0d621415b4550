"""Fixtures of FedCoE's tests: configs that start from the first design (whole expert networks,
no level-2 extras, raw global model) so each test switches its lever on explicitly, and a
client that trained once."""

from __future__ import annotations

import pytest
from fedcoe_flwr.algorithms.base import ClientStep
from fedcoe_flwr.algorithms.fedcoe import FedCoE
from fedcoe_flwr.data import load_client_data
# This module switches each lever on explicitly: its configs start from the first design
# (whole expert networks, no level-2 extras, no routing targets, no shared
# expert); test_default_design_* checks the shipped defaults.
FIRST_DESIGN = dict(shared_trunk=False, gate_input="image", aux_weight=1.0, local_prior_correction=False,
                    local_loss_weight=0.0, assignment_weight=0.0, shared_expert_weight=0.0)


@pytest.fixture
def make_cfg(make_cfg):
    return lambda **overrides: make_cfg(**{**FIRST_DESIGN, **overrides})


# ============================================================== server: init, payloads, aggregate
@pytest.fixture
def fedcoe_cfg(make_cfg):
    return make_cfg(num_experts=3, top_m=2, correlation_smoothing=0.5, correlation_cap=1.0)


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
