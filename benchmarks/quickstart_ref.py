"""Reference apps in the style of Flower's quickstart-pytorch (flwr 1.x Message API),
run on the same workload as ours to show what the usual way of writing a ClientApp
costs. As in the quickstart, on every call the ClientApp

* builds a new model and loads the received weights into it (``to_torch_state_dict``),
* loads its partition from a Hugging Face data set (``partitioner.load_partition``; the
  partitioner is cached per process like the quickstart's global ``fds``), applies the
  torchvision transforms (``ToTensor``, ``Normalize``) through ``with_transform`` and
  wraps it in a new ``DataLoader``,
* trains with a new optimizer and converts the weights back (``ArrayRecord(model.state_dict())``).

The server is Flower's own ``FedAvg`` strategy. Differences from the quickstart, all to
keep the workload identical to the benchmark's: our SmallCNN instead of its LeNet, SGD
with momentum, the whole partition used for training (no ``train_test_split``), and the
data set read from a local Arrow copy of our decoded CIFAR-10 (PNG-encoded images like
``uoft-cs/cifar10``; the machine is offline) instead of the Hub."""

from __future__ import annotations

import random
import time
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp
from flwr.serverapp.strategy import FedAvg

app = ClientApp()
_partitioner = None  # per process, like the quickstart's global FederatedDataset


def _net(num_classes: int = 10) -> torch.nn.Module:
    from fedcoe_flwr.models import SmallCNN

    return SmallCNN(num_classes)


def load_data(partition_id: int, num_partitions: int, path: str, batch_size: int):  # noqa: ANN201
    from datasets import load_from_disk
    from flwr_datasets.partitioner import IidPartitioner
    from torch.utils.data import DataLoader
    from torchvision.transforms import Compose, Normalize, ToTensor

    global _partitioner
    if _partitioner is None:
        _partitioner = IidPartitioner(num_partitions=num_partitions)
        _partitioner.dataset = load_from_disk(path)
    partition = _partitioner.load_partition(partition_id)
    transforms = Compose([ToTensor(), Normalize((0.5, 0.5, 0.5), (0.5, 0.5, 0.5))])

    def apply_transforms(batch: dict[str, Any]) -> dict[str, Any]:
        batch["img"] = [transforms(img) for img in batch["img"]]
        return batch

    return DataLoader(partition.with_transform(apply_transforms), batch_size=batch_size, shuffle=True)


def train_fn(net: torch.nn.Module, loader, epochs: int, lr: float, momentum: float) -> float:  # noqa: ANN001
    criterion = torch.nn.CrossEntropyLoss()
    optimizer = torch.optim.SGD(net.parameters(), lr=lr, momentum=momentum)
    net.train()
    running, seen = 0.0, 0
    for _ in range(epochs):
        for batch in loader:
            optimizer.zero_grad()
            loss = criterion(net(batch["img"]), batch["label"])
            loss.backward()
            optimizer.step()
            running += loss.item() * len(batch["label"])
            seen += len(batch["label"])
    return running / max(seen, 1)


@app.query()
def warm_up(msg: Message, context: Context) -> Message:
    """Only for the harness: lets every actor start before the timed rounds."""
    return Message(content=RecordDict({"config": ConfigRecord({"ok": 1})}), reply_to=msg)


@app.train()
def train(msg: Message, context: Context) -> Message:
    config = msg.content["config"]
    if int(config["threads"]) > 0:  # the quickstart sets none (torch then uses every core in every actor)
        torch.set_num_threads(int(config["threads"]))
    model = _net()
    model.load_state_dict(msg.content["arrays"].to_torch_state_dict())
    loader = load_data(int(context.node_config["partition-id"]), int(context.node_config["num-partitions"]),
                       str(config["data-path"]), int(config["batch-size"]))
    loss = train_fn(model, loader, int(config["local-epochs"]), float(config["lr"]), float(config["momentum"]))
    content = RecordDict({"arrays": ArrayRecord(model.state_dict()),
                          "metrics": MetricRecord({"train_loss": loss, "num-examples": len(loader.dataset)})})
    return Message(content=content, reply_to=msg)


class TimedFedAvg(FedAvg):
    """Flower's FedAvg, recording when each round starts and ends (harness only)."""

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.round_times: list[tuple[float, float]] = []

    def configure_train(self, server_round, arrays, config, grid):  # noqa: ANN001, ANN201
        self._t0 = time.time()
        return super().configure_train(server_round, arrays, config, grid)

    def aggregate_train(self, server_round, replies):  # noqa: ANN001, ANN201
        out = super().aggregate_train(server_round, replies)
        self.round_times.append((self._t0, time.time()))
        return out


def make_server(num_nodes: int, clients_per_round: int, rounds: int, train_config: dict[str, Any],
                seed: int, result: dict[str, Any]) -> ServerApp:
    server = ServerApp()

    @server.main()
    def main(grid: Grid, context: Context) -> None:
        random.seed(seed)  # FedAvg samples nodes with `random`
        while len(list(grid.get_node_ids())) < num_nodes:
            time.sleep(0.5)
        # harness: one query per node so that every actor is up, as our app's discovery does
        nodes = list(grid.get_node_ids())
        grid.send_and_receive([Message(content=RecordDict(), dst_node_id=n, message_type="query")
                               for n in nodes], timeout=600)
        strategy = TimedFedAvg(fraction_train=clients_per_round / num_nodes, fraction_evaluate=0.0,
                               min_train_nodes=clients_per_round, min_available_nodes=num_nodes)
        torch.manual_seed(seed)
        out = strategy.start(grid=grid, initial_arrays=ArrayRecord(_net().state_dict()),
                             train_config=ConfigRecord(train_config), num_rounds=rounds)
        result["round_times"] = strategy.round_times
        result["arrays"] = out.arrays.to_torch_state_dict()

    return server
