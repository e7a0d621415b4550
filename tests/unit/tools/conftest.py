"""A finished one-round run with its checkpoint, for the tools that read saved rounds."""

from __future__ import annotations

import pytest

from fedcoe_flwr.config import from_dict
from fedcoe_flwr.server.loop import RoundLoop
from harness import InProcessGrid


@pytest.fixture
def finished_run(tmp_path):
    """(algorithm, config overrides) -> (its finished RoundLoop, its run directory)."""
    def run(algorithm: str, **overrides):
        cfg = from_dict(dict(dataset="synthetic", synthetic_train_size=240, synthetic_test_size=60, image_size=16,
                             num_clients=3, num_coldstart_clients=2, partition="dirichlet", dirichlet_alpha=0.3,
                             min_partition_size=5, model="cnn", width_multiplier=0.25, num_experts=2, gate_width=4,
                             local_epochs=1, batch_size=16, num_rounds=1, eval_every=1, results_dir=str(tmp_path),
                             cache_dir=str(tmp_path / "cache"), run_name="scan", algorithm=algorithm, **overrides))
        loop = RoundLoop(cfg)
        loop.start(InProcessGrid({100 + i: {"partition-id": i, "num-partitions": cfg.num_partitions}
                                  for i in range(cfg.num_partitions)}))
        return loop, tmp_path / "scan"
    return run
