"""Shared fixtures: tiny validated configs on generated data, fresh data caches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from flwr.supercore.task_identity import TaskIdentity

from harness import TINY

from fedcoe_flwr import data as data_mod
from fedcoe_flwr.config import ExperimentConfig, from_dict

REPO_ROOT = Path(__file__).resolve().parents[1]

# The test models are tiny: intra-op threads only add overhead, and on a busy 2-core
# machine oversubscription made one local epoch 10-20x slower (0.4 s -> 4-10 s).
torch.set_num_threads(1)


def clear_data_caches() -> None:
    """Forget everything the data layer memoised in this process."""
    data_mod.clear_caches()


@pytest.fixture
def make_cfg(tmp_path):
    """make_cfg(**overrides) -> a validated tiny ExperimentConfig whose data cache and results
    folder live in this test's tmp_path (so no test sees another's cached arrays, and none
    moves a run of the same name in the working directory aside)."""

    def make(**overrides) -> ExperimentConfig:
        values = {**TINY, "cache_dir": str(tmp_path / "cache"), "results_dir": str(tmp_path / "results"), **overrides}
        return from_dict(values)

    return make


@pytest.fixture
def fresh_caches():
    """Empty data caches before and after the test; yields the clearing function so a
    test can force a recomputation from scratch."""
    clear_data_caches()
    yield clear_data_caches
    clear_data_caches()


@pytest.fixture(autouse=True)
def _deterministic_torch():
    torch.manual_seed(0)
    yield


@pytest.fixture
def cpu():
    return torch.device("cpu")


@pytest.fixture(autouse=True)
def _task_identity():
    """The task identity a ClientApp handler reads when it runs outside Flower (in-process tests)."""
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    yield
