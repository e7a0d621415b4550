"""The simulation's cohort path at the Flower glue: ``handle_train_cohort`` against
``handle_train`` node by node (uploads, metrics, each node's private parts in its own
Context), a bad call failing alone, the cohort backend batching concurrent training
messages into one call, and when a simulation uses cohorts."""

from __future__ import annotations

import threading

import pytest
import torch
from harness import TINY, context, message

from client_app.app import app as client_app
from fedcoe_flwr.algorithms import get_algorithm
from fedcoe_flwr.client import handlers
from fedcoe_flwr.client.private_state import PRIVATE
from fedcoe_flwr.cohort import backend as cohort_backend
from fedcoe_flwr.config import from_dict
from fedcoe_flwr.records import ARRAYS, METRICS, from_array_record
from fedcoe_flwr.simulate import uses_cohorts

pytestmark = pytest.mark.usefixtures("one_torch_thread")
TOLERANCE = 1e-5


def setting(algorithm: str):
    cfg = from_dict({**TINY, "model": "cnn", "algorithm": algorithm, "local_epochs": 2, "batch_size": 16,
                     "synthetic_train_size": 180})
    algo = get_algorithm(cfg.algorithm)
    state = algo.init_state(cfg, TINY["synthetic_num_classes"])
    nodes = {10 + i: {"partition-id": i, "num-partitions": cfg.num_partitions} for i in range(cfg.num_partitions)}
    msgs = {}
    for node, nc in nodes.items():
        payload, pconfig = algo.train_payload(state, cfg, nc["partition-id"], 1)
        msgs[node] = message(cfg, "train", payload, {**pconfig, "server_round": 1}, node_id=node)
    return cfg, nodes, msgs


def arrays_of(reply) -> dict[str, torch.Tensor]:
    return from_array_record(reply.content.array_records[ARRAYS])


def max_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max((float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel()), default=0.0)


# not FedCoE here: on this data set's saturated pixels, float32 rounding of the batched
# convolutions resolves near-ties of max-pooling differently (docs/COHORT.md); its
# equivalence is tested on noise images in test_equivalence.py
@pytest.mark.parametrize("algorithm", ["fedper", "pfedmoe"])
def test_cohort_handler_answers_each_node_as_handle_train_does(algorithm):
    cfg, nodes, msgs = setting(algorithm)
    one_by_one, alone = {}, {}
    for node, nc in nodes.items():
        alone[node] = context(nc, node_id=node)
        try:
            one_by_one[node] = handlers.handle_train(msgs[node], alone[node])
        except ValueError as err:
            one_by_one[node] = err
    together = {node: context(nc, node_id=node) for node, nc in nodes.items()}
    replies = dict(zip(nodes, handlers.handle_train_cohort([(msgs[n], together[n]) for n in nodes])))
    coldstart = 10 + cfg.num_clients  # the cold-start node refuses to train, in both paths, alone
    assert isinstance(one_by_one[coldstart], ValueError) and isinstance(replies[coldstart], ValueError)
    assert "must never train" in str(replies[coldstart])
    for node in list(nodes)[:cfg.num_clients]:
        assert max_diff(arrays_of(one_by_one[node]), arrays_of(replies[node])) <= TOLERANCE
        m_alone, m_cohort = (dict(r.content.metric_records[METRICS]) for r in (one_by_one[node], replies[node]))
        assert m_alone["num_samples"] == m_cohort["num_samples"] and m_cohort["train_time_s"] > 0
        assert abs(m_alone["train_loss"] - m_cohort["train_loss"]) <= TOLERANCE
        private_alone = from_array_record(alone[node].state.array_records[PRIVATE])
        private_cohort = from_array_record(together[node].state.array_records[PRIVATE])
        assert max_diff(private_alone, private_cohort) <= TOLERANCE


def test_backend_trains_concurrent_training_messages_in_one_call(monkeypatch):
    cfg, nodes, msgs = setting("fedavg")
    calls = []
    real = handlers.handle_train_cohort

    def counting(pairs, chunk_size):
        calls.append(len(pairs))
        return real(pairs, chunk_size)

    monkeypatch.setattr(handlers, "handle_train_cohort", counting)
    backend = cohort_backend.CohortBackend({"cohort": {"cohort_size": 8, "chunk_size": 2}})
    backend.build(lambda: client_app)
    training = list(nodes)[:cfg.num_clients]
    contexts = {n: context(nodes[n], node_id=n) for n in nodes}
    out = {}

    def send(node):
        out[node] = backend.process_message(msgs[node], contexts[node])

    threads = [threading.Thread(target=send, args=(n,)) for n in training]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=120)
        assert calls == [len(training)]  # one cohort for all of them
        for node in training:
            reply, ctx = out[node]
            assert ctx is contexts[node]
            expected = handlers.handle_train(msgs[node], context(nodes[node], node_id=node))
            assert max_diff(arrays_of(expected), arrays_of(reply)) <= TOLERANCE
        with pytest.raises(Exception, match="must never train"):  # an error reaches the runtime's worker
            backend.process_message(msgs[10 + cfg.num_clients], contexts[10 + cfg.num_clients])
    finally:
        backend.terminate()


def test_simulation_uses_cohorts_where_configured_or_on_a_gpu():
    cfg = from_dict(dict(TINY))
    assert cfg.simulation_training == "auto"
    assert not uses_cohorts(cfg, cuda_available=False)  # CPU: measured slower (benchmarks/README.md)
    assert uses_cohorts(cfg, cuda_available=True)
    assert not uses_cohorts(cfg.replace(device="cpu"), cuda_available=True)
    assert uses_cohorts(cfg.replace(simulation_training="cohort"), cuda_available=False)
    assert not uses_cohorts(cfg.replace(simulation_training="per_client"), cuda_available=True)


def test_simulation_backend_replaces_ray_only_within_the_block():
    from flwr.server.superlink.fleet.vce.backend import raybackend

    from fedcoe_flwr.compat import simulation_backend

    original = raybackend.RayBackend
    with simulation_backend(cohort_backend.CohortBackend) as replaced:
        assert replaced and raybackend.RayBackend is cohort_backend.CohortBackend
    assert raybackend.RayBackend is original
    with simulation_backend(None) as replaced:
        assert not replaced and raybackend.RayBackend is original
