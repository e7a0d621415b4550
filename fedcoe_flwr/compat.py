"""Everything that depends on Flower's internals, in one place, for Flower 1.39.x only:
the replacement of the simulation's message dispatcher, and of its backend by the cohort
backend (``simulation_backend``). ``SUPPORTED`` is False on any
other Flower version, and then nothing is replaced (tests/unit/test_compat.py fails
loudly so that the replacement is re-checked against the new version's source)."""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Iterator

import flwr
from flwr.server.superlink.fleet.vce import vce_api
from flwr.supercore.date import now

FLOWER_SERIES = "1.39."
SUPPORTED = flwr.__version__.startswith(FLOWER_SERIES)

PATCH_ENV = "FEDCOE_FAST_VCE"  # "0" runs Flower's own message dispatcher (for comparison)


def _fast_add_messages_to_queue(state, queue, nodes_mapping, f_stop) -> None:  # noqa: ANN001
    """Flower 1.39's simulation dispatcher (``vce_api.add_messages_to_queue``) asks the
    LinkState, every 0.1 s, for one message per node: ``get_message_ins(node)`` scans
    every stored message and re-validates each one (TTL, federation membership), so one
    sweep costs nodes x messages checks -- 50,000 for 1000 nodes and 50 messages in
    flight, in the process that also runs the server, holding the GIL while the clients
    train. This does the same in one pass over the stored messages: each undelivered
    message validated once, at most one message per node per sweep (as before), marked
    delivered and queued in the order the server sent them."""

    store = getattr(state, "message_ins_store", None)
    lock = getattr(state, "lock", None)
    check = getattr(state, "_check_stored_messages", None)
    if store is None or lock is None or check is None:  # another LinkState: Flower's own loop
        return _ORIGINAL_DISPATCH(state, queue, nodes_mapping, f_stop)
    while not f_stop.is_set():
        batch = []
        with lock:
            pending = [mid for mid, msg in store.items() if msg.metadata.delivered_at == ""]
            if pending:
                check(set(pending))  # drops expired / out-of-federation messages, as get_message_ins does
                taken: set[int] = set()
                for mid in pending:
                    msg = store.get(mid)
                    if msg is None or msg.metadata.delivered_at != "":
                        continue
                    node = msg.metadata.dst_node_id
                    if node in taken or node not in nodes_mapping:
                        continue
                    taken.add(node)
                    batch.append(msg)
                stamp = now().isoformat()
                for msg in batch:
                    msg.metadata.delivered_at = stamp
        for msg in batch:
            queue.put(msg)
        f_stop.wait(0.1)


_ORIGINAL_DISPATCH = None


def install_fast_dispatch() -> bool:
    """Replace Flower's simulation dispatcher by ``_fast_add_messages_to_queue`` in this
    process (Flower 1.39.x only; ``FEDCOE_FAST_VCE=0`` keeps Flower's)."""
    global _ORIGINAL_DISPATCH
    if os.environ.get(PATCH_ENV, "1") == "0":
        return False
    if not SUPPORTED or not hasattr(vce_api, "add_messages_to_queue"):
        return False
    if vce_api.add_messages_to_queue is not _fast_add_messages_to_queue:
        _ORIGINAL_DISPATCH = vce_api.add_messages_to_queue
        vce_api.add_messages_to_queue = _fast_add_messages_to_queue
    return True


@contextmanager
def simulation_backend(backend_cls: type | None) -> Iterator[bool]:
    """Within the block, Flower 1.39's simulation runtime builds ``backend_cls`` where it
    would build its Ray backend (``vce_api.start_vce`` imports ``RayBackend`` from
    ``backend.raybackend`` when it starts). None, or another Flower version: Ray, as is.
    Yields whether the replacement is in place."""
    if backend_cls is None or not SUPPORTED:
        yield False
        return
    from flwr.server.superlink.fleet.vce.backend import raybackend

    original = raybackend.RayBackend
    raybackend.RayBackend = backend_cls
    try:
        yield True
    finally:
        raybackend.RayBackend = original
