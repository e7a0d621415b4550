"""Unit tests are fast: a test here marked slow belongs in tests/integration."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models: intra-op threads only add contention on a busy 2-core machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    misplaced = [item.nodeid for item in items
                 if HERE in Path(str(item.fspath)).resolve().parents and item.get_closest_marker("slow")]
    if misplaced:
        raise pytest.UsageError(f"slow tests under tests/unit (move them to tests/integration): {misplaced}")
