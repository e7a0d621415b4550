"""Discovery: the wait for SuperNodes says who is connected and how long it still waits;
a federation of the wrong size or with two nodes claiming one client is named."""

from __future__ import annotations

import logging

import pytest
from harness import InProcessGrid

from fedcoe_flwr.server import nodes as nodes_module
from fedcoe_flwr.server.loop import RoundLoop
from fedcoe_flwr.server.nodes import FederationError


class LateGrid(InProcessGrid):
    """The last node connects only after the server asked a few times."""

    def __init__(self, nodes: dict[int, dict], late: int, after_calls: int):
        super().__init__(nodes)
        self.late, self.after_calls, self.calls = late, after_calls, 0

    def get_node_ids(self):
        self.calls += 1
        return [n for n in self.contexts if n != self.late or self.calls > self.after_calls]


@pytest.fixture
def flwr_log():
    records: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: records.append(record.getMessage())
    logger = logging.getLogger("flwr")
    logger.addHandler(handler)
    yield records
    logger.removeHandler(handler)


def test_the_wait_for_nodes_counts_down_and_names_who_connected(make_cfg, monkeypatch, flwr_log):
    monkeypatch.setattr(nodes_module, "WAIT_REPORT_S", 0.0)
    monkeypatch.setattr(nodes_module.time, "sleep", lambda s: None)
    cfg = make_cfg(num_clients=2, num_coldstart_clients=1, wait_for_nodes=60.0)
    grid = LateGrid({100 + p: {"partition-id": p, "num-partitions": 3} for p in range(3)}, late=102, after_calls=2)
    loop = RoundLoop(cfg)
    loop.nodes.discover(grid)
    waits = [m for m in flwr_log if "SuperNodes connected; waiting up to" in m]
    assert waits and waits[0].startswith("[nodes] 2 of 3 SuperNodes connected")
    (connected,) = [m for m in flwr_log if m.startswith("[nodes] connected before round 1")]
    assert "client 0 = partition-0 (node 100)" in connected and "client 2 = partition-2 (node 102)" in connected


def test_two_nodes_claiming_one_client_are_both_named(make_cfg):
    cfg = make_cfg(num_clients=2, num_coldstart_clients=1)
    grid = InProcessGrid({100: {"partition-id": 0, "num-partitions": 3}, 101: {"partition-id": 0, "num-partitions": 3},
                          102: {"partition-id": 1, "num-partitions": 3}})
    with pytest.raises(FederationError, match=r"nodes 100 and 101 both claim client 0"):
        RoundLoop(cfg).nodes.discover(grid)


def test_a_simulation_of_another_size_gets_the_num_supernodes_remedy(make_cfg):
    cfg = make_cfg(num_clients=3, num_coldstart_clients=1)
    grid = InProcessGrid({100 + p: {"partition-id": p, "num-partitions": 2} for p in range(2)})
    with pytest.raises(FederationError, match='num-supernodes=4'):
        RoundLoop(cfg).nodes.discover(grid)
