"""The functional SGD against torch.optim.SGD, row by row, and the grouping rules."""

from __future__ import annotations

import pytest
import torch

from fedcoe_flwr.algorithms import get_algorithm
from fedcoe_flwr.algorithms.base import ClientStep
from fedcoe_flwr.cohort.grouping import chunked, group_tasks
from fedcoe_flwr.cohort.optim import FunctionalSGD
from fedcoe_flwr.config import from_dict
from fedcoe_flwr.data import ClientData


@pytest.mark.parametrize("momentum,weight_decay", [(0.0, 0.0), (0.9, 0.0), (0.9, 5e-4), (0.0, 1e-2)])
def test_functional_sgd_steps_each_row_as_torch_sgd(momentum, weight_decay):
    g = torch.Generator().manual_seed(0)
    rows = torch.randn(3, 5, 4, generator=g)
    grads = [torch.randn(3, 5, 4, generator=g) for _ in range(4)]
    opt = FunctionalSGD(lr=0.1, momentum=momentum, weight_decay=weight_decay)
    stacked = {"w": rows.clone()}
    state = opt.init(stacked)
    for grad in grads:
        opt.step(stacked, {"w": grad}, state)
    for i in range(3):
        w = torch.nn.Parameter(rows[i].clone())
        reference = torch.optim.SGD([w], lr=0.1, momentum=momentum, weight_decay=weight_decay)
        for grad in grads:
            w.grad = grad[i].clone()
            reference.step()
        assert torch.equal(stacked["w"][i], w.detach())


def test_chunked_bounds_and_rejects_nonpositive_size():
    assert chunked(list(range(5)), 2) == [[0, 1], [2, 3], [4]]
    with pytest.raises(ValueError, match="chunk size must be >= 1, got 0"):
        chunked([1], 0)


def test_pfedmoe_clients_of_different_widths_are_grouped_apart_by_size():
    cfg = from_dict(dict(dataset="synthetic", image_size=16, model="cnn", num_clients=4, num_coldstart_clients=0,
                         synthetic_num_classes=4, algorithm="pfedmoe", pfedmoe_local_widths="1.0,0.5"))
    algo = get_algorithm("pfedmoe")
    state = algo.init_state(cfg, 4)
    tasks = []
    for client, n in enumerate([3, 7, 5, 9]):
        payload, pconfig = algo.train_payload(state, cfg, client, 1)
        x = torch.zeros(n, 3, 16, 16, dtype=torch.uint8)
        data = ClientData(x, torch.zeros(n, dtype=torch.long), x[:1], torch.zeros(1, dtype=torch.long))
        tasks.append(algo.local_task(ClientStep(payload, pconfig, None, data, cfg, 4, torch.device("cpu"), client)))
    assert group_tasks(tasks) == [[2, 0], [3, 1]]  # widths 1.0 (clients 0, 2) and 0.5; most samples first
