"""Local-only training: nothing leaves a client during training; the cold-start model
is the sample-weighted average of the clients' own models."""

import torch

from fedcoe_flwr.algorithms.base import ClientStep
from fedcoe_flwr.algorithms import get_algorithm
from fedcoe_flwr.algorithms.base import Reply
from fedcoe_flwr.algorithms.training import weighted_average
from fedcoe_flwr.data import load_client_data


def test_local_only_shares_nothing_and_averages_models_for_cold_start(make_cfg, cpu):
    cfg = make_cfg(algorithm="local", model="cnn", width_multiplier=0.25)
    algo = get_algorithm("local")
    state = algo.init_state(cfg, 4)
    assert state.arrays == {}  # the server holds no model at all
    privates, replies = [], []
    for client in range(2):
        payload, config = algo.train_payload(state, cfg, client, 1)
        assert payload == {}
        upload, private, metrics = algo.client_train(ClientStep(arrays=payload, config=config, private=None, data=load_client_data(cfg, client), cfg=cfg, num_classes=4, device=cpu, seed=client))
        assert upload == {} and private  # the whole model stays on the client
        privates.append(private)
        replies.append(Reply(client, metrics["num_samples"], upload, metrics))
    assert not torch.equal(privates[0]["head.conv1.weight"], privates[1]["head.conv1.weight"])
    state, _ = algo.aggregate(state, replies, cfg, 1)
    assert state.arrays == {}
    parts = [(algo.client_eval_upload(ClientStep(arrays={}, config={}, private=p, cfg=cfg, data=None)), r.num_samples) for p, r in zip(privates, replies)]
    cold, _ = algo.coldstart_payload(state, cfg, parts)
    expected = weighted_average([p for p, _ in parts], [n for _, n in parts])
    assert set(cold) == set(expected)
    for key, value in expected.items():
        assert torch.equal(cold[key], value), key
