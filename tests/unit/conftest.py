"""Unit tests are fast: a test here marked slow belongs in tests/integration."""

from __future__ import annotations

from pathlib import Path

import pytest

HERE = Path(__file__).resolve().parent


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    misplaced = [item.nodeid for item in items
                 if HERE in Path(str(item.fspath)).resolve().parents and item.get_closest_marker("slow")]
    if misplaced:
        raise pytest.UsageError(f"slow tests under tests/unit (move them to tests/integration): {misplaced}")
