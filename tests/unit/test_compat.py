"""The replacement of Flower's simulation dispatcher is written against Flower 1.39's
source: on any other version this test fails, so that the replacement is re-checked
(fedcoe_flwr/compat.py) before the pin in pyproject.toml moves."""

from __future__ import annotations

import flwr
from flwr.server.superlink.fleet.vce import vce_api

from fedcoe_flwr import compat


def test_flower_is_the_series_the_dispatcher_was_written_for():
    assert flwr.__version__.startswith(compat.FLOWER_SERIES), (
        f"Flower {flwr.__version__} is installed; fedcoe_flwr/compat.py replaces Flower "
        f"{compat.FLOWER_SERIES}x's vce_api.add_messages_to_queue: read the new version's source, adapt the "
        "replacement, then update FLOWER_SERIES and the pin in pyproject.toml")
    assert compat.SUPPORTED
    assert hasattr(vce_api, "add_messages_to_queue")


def test_install_replaces_the_dispatcher_once_and_can_be_switched_off(monkeypatch):
    original = vce_api.add_messages_to_queue
    try:
        monkeypatch.setenv(compat.PATCH_ENV, "0")
        assert compat.install_fast_dispatch() is False
        monkeypatch.delenv(compat.PATCH_ENV)
        assert compat.install_fast_dispatch() is True
        assert vce_api.add_messages_to_queue is compat._fast_add_messages_to_queue
        assert compat.install_fast_dispatch() is True  # idempotent
    finally:
        vce_api.add_messages_to_queue = original
