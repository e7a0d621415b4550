"""The cohort executor against the per-client path, for every method: C clients trained
together (in one chunk, and in another order in chunks of two) and one by one give the
same uploads, private states and training metrics (max abs difference <= 1e-5, float32,
CPU).

The clients have unequal data (9, 20, 13 and 1 images at batch 8: per epoch batches of 8+1,
8+8+4, 8+5 and 1, so the step counts differ, last batches differ in size, a trailing batch
of one is dropped and the one-image client steps once in its first epoch only), two local
epochs, momentum and weight decay, and two rounds, so the second round starts from the
private state the first wrote back. The images are uniform noise: on images with exact
duplicate patches float32 rounding can resolve max-pooling near-ties differently
(docs/COHORT.md). FedMoE-DA falls back to the per-client path."""

from __future__ import annotations

from typing import Any

import pytest
import torch

from fedcoe_flwr.algorithms import get_algorithm
from fedcoe_flwr.algorithms.base import ClientStep
from fedcoe_flwr.config import from_dict
from fedcoe_flwr.cohort import train_clients
from fedcoe_flwr.data import ClientData

NUM_CLASSES = 4
SIZES = [9, 20, 13, 1]
TOLERANCE = 1e-5
RESNET = dict(model="resnet_moe", resnet_depth=8, resnet_width=4, inner_experts=2, inner_top_k=1,
              load_balance_weight=0.01)
CASES = {
    "fedavg": ("fedavg", {}),
    "fedprox": ("fedprox", {"prox_mu": 0.1}),
    "fedper": ("fedper", {}),
    "local": ("local", {}),
    "pfedmoe-two-widths": ("pfedmoe", {"pfedmoe_local_widths": "1.0,0.5"}),
    "fedmoe_da-fallback": ("fedmoe_da", {}),
    "fedcoe": ("fedcoe", {}),
    "fedcoe-resnet-batchnorm": ("fedcoe", RESNET),
    "fedcoe-client-assignment": ("fedcoe", {"assignment_weight": 0.5, "assignment_level": "client"}),
    "fedcoe-image-assignment": ("fedcoe", {"assignment_weight": 0.5, "assignment_level": "sample"}),
    "fedcoe-class-assignment": ("fedcoe", {"assignment_weight": 0.5, "assignment_level": "class"}),
    "fedcoe-label-split": ("fedcoe", {"assignment_weight": 0.5, "assignment_level": "label_split"}),
    "fedcoe-class-groups": ("fedcoe", {"assignment_weight": 0.5, "assignment_level": "class_groups"}),
    "fedcoe-shared-expert": ("fedcoe", {"assignment_weight": 0.5, "assignment_level": "class_groups",
                                        "shared_expert_weight": 0.5, "class_groups_from": "received",
                                        "class_groups_restarts": 4}),
    "fedavg-resnet-batchnorm-augment": ("fedavg", {**RESNET, "augment": True}),
}


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def make_data(seed: int, n: int) -> ClientData:
    g = torch.Generator().manual_seed(seed)

    def draw(k: int) -> tuple[torch.Tensor, torch.Tensor]:
        return (torch.rand(k, 3, 16, 16, generator=g) * 255).to(torch.uint8), torch.randint(0, NUM_CLASSES, (k,),
                                                                                            generator=g)
    return ClientData(*draw(n), *draw(8))


def make_steps(algorithm: str, extra: dict[str, Any], server_round: int, privates: dict[int, Any]
               ) -> list[ClientStep]:
    cfg = from_dict({**dict(dataset="synthetic", image_size=16, model="cnn", num_clients=len(SIZES),
                            num_coldstart_clients=0, synthetic_num_classes=NUM_CLASSES, batch_size=8, lr=0.05,
                            momentum=0.9, weight_decay=5e-4, local_epochs=2, num_experts=3, top_m=2,
                            algorithm=algorithm, fedmoe_da_top_p=1, fedmoe_da_interval=1), **extra})
    algo = get_algorithm(algorithm)
    state = algo.init_state(cfg, NUM_CLASSES)
    if algorithm == "fedcoe":  # known correlation rows: clients get different expert sets (several groups)
        state.extra["correlation"][:] = torch.tensor([[.6, .3, .1], [.1, .3, .6], [.6, .3, .1], [.3, .1, .6]]).numpy()
        state.extra["correlation_known"][:] = True
    steps = []
    for client, n in enumerate(SIZES):
        payload, pconfig = algo.train_payload(state, cfg, client, server_round)
        steps.append(ClientStep(payload, {**pconfig, "server_round": server_round}, privates.get(client),
                                make_data(client, n), cfg, NUM_CLASSES, torch.device("cpu"),
                                seed=1000 * server_round + client))
    return steps


def max_difference(a: tuple, b: tuple) -> float:
    """Max abs difference over uploads, private states and float metrics; keys must agree."""
    worst = 0.0
    for x, y in ((a[0], b[0]), (a[1] or {}, b[1] or {})):
        assert x.keys() == y.keys()
        for key in x:
            assert x[key].shape == y[key].shape and x[key].dtype == y[key].dtype, key
            if x[key].numel():
                worst = max(worst, float((x[key].double() - y[key].double()).abs().max()))
    assert a[2].keys() == b[2].keys()
    for key, value in a[2].items():
        if isinstance(value, float):
            worst = max(worst, abs(value - b[2][key]))
        else:
            assert value == b[2][key], key
    return worst


@pytest.mark.parametrize("case", sorted(CASES))
def test_cohort_matches_per_client_path(case):
    algorithm, extra = CASES[case]
    algo = get_algorithm(algorithm)
    privates: dict[int, Any] = {}
    changed = False
    for server_round in (1, 2):
        steps = make_steps(algorithm, extra, server_round, privates)
        one_by_one = [algo.client_train(step) for step in steps]
        together = train_clients(algo, make_steps(algorithm, extra, server_round, privates))
        order = [2, 0, 3, 1]  # another order, in chunks of two: other cohort-mates for every client
        in_pairs = train_clients(algo, [make_steps(algorithm, extra, server_round, privates)[i] for i in order],
                                 chunk_size=2)
        for client, reference in enumerate(one_by_one):
            for other in (together[client], in_pairs[order.index(client)]):
                assert max_difference(reference, other) <= TOLERANCE, (case, server_round, client)
            before = {**steps[client].arrays, **(steps[client].private or {})}
            after = {**reference[0], **(reference[1] or {})}
            changed |= any(not torch.equal(after[k], before[k]) for k in after.keys() & before.keys())
        privates = {client: result[1] for client, result in enumerate(one_by_one)}
    assert changed, "nothing trained: the comparison would be empty"
