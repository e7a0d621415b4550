"""One round of the plain single-process loop that the benchmarks measure against: the
server's payloads, each sampled client's local update, aggregation; no Flower. Imported
only by the child processes that run it (it loads torch and the package)."""

from __future__ import annotations

from typing import Any, Callable, Sequence

import torch

from fedcoe_flwr.algorithms.base import Algorithm, ClientStep, Reply, ServerState
from fedcoe_flwr.client.node import client_seed
from fedcoe_flwr.config import ExperimentConfig
from fedcoe_flwr.data import ClientData

Train = Callable[[Sequence[ClientStep]], Sequence[tuple[Any, Any, dict[str, Any]]]]


def plain_round(algo: Algorithm, state: ServerState, cfg: ExperimentConfig, clients: Sequence[int], server_round: int,
                privates: dict[int, Any], data_of: Callable[[int], ClientData], num_classes: int,
                train: Train) -> ServerState:
    """``train`` gets every sampled client's step and returns their ``client_train`` results in
    order; private parts are kept in ``privates`` for the client's next round."""
    device = torch.device("cpu")
    steps = []
    for client in clients:
        payload, pconfig = algo.train_payload(state, cfg, client, server_round)
        steps.append(ClientStep(payload, {**pconfig, "server_round": server_round}, privates.get(client),
                                data_of(client), cfg, num_classes, device, client_seed(cfg, client, server_round)))
    replies = []
    for client, (upload, private, metrics) in zip(clients, train(steps)):
        if private:
            privates[client] = private
        replies.append(Reply(client, int(metrics["num_samples"]), upload, metrics))
    return algo.aggregate(state, replies, cfg, server_round)[0]
