"""A simulation backend that trains the clients of a round as cohorts, in this process.

Flower's simulation runtime hands each message to ``Backend.process_message(message,
context)`` from one of ``num_workers`` threads, with the Context of the SuperNode it is
addressed to. This backend answers every message type but ``train`` with the ClientApp,
one at a time, as a single Ray actor would. Training messages are collected: each worker
thread parks its (message, context) and waits; once no further training message has
arrived for ``QUIET_S`` (the runtime's dispatcher queues a round's messages together,
every 0.1 s) or ``num_workers`` are parked, the collector trains them all with one call of
``client.handlers.handle_train_cohort`` (``cohort.train_clients``) and each thread returns
its own node's reply and Context. Each node's private parts stay in its own Context, as
with Ray actors; the ServerApp and the ClientApp are the same, and a deployment (one site
per SuperNode, no simulation backend) never reaches this code (docs/COHORT.md)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from typing import Callable

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.server.superlink.fleet.vce.backend import Backend, BackendConfig

from .executor import DEFAULT_CHUNK_SIZE

QUIET_S = 0.25  # no new training message for this long: the round's batch is complete
TRAIN = "train"


@dataclass
class _Parked:
    message: Message
    context: Context
    done: threading.Event = field(default_factory=threading.Event)
    reply: Message | Exception | None = None


class CohortBackend(Backend):
    """``backend_config``: ``cohort_size`` (most training messages trained together; also
    the number of worker threads) and ``chunk_size`` (the executor's chunk)."""

    def __init__(self, backend_config: BackendConfig) -> None:
        super().__init__(backend_config)
        cohort = dict(backend_config.get("cohort", {}))
        self.cohort_size = max(1, int(cohort.get("cohort_size", DEFAULT_CHUNK_SIZE)))
        self.chunk_size = max(1, int(cohort.get("chunk_size", DEFAULT_CHUNK_SIZE)))
        self.app: ClientApp | None = None
        self._compute = threading.Lock()  # one ClientApp call or cohort at a time: torch uses the cores
        self._parked: list[_Parked] = []
        self._arrived = threading.Condition()
        self._last_arrival = 0.0
        self._stop = threading.Event()
        self._collector: threading.Thread | None = None

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        self.app = app_fn()
        self._collector = threading.Thread(target=self._collect, name="cohort-collector", daemon=True)
        self._collector.start()

    @property
    def num_workers(self) -> int:
        return self.cohort_size

    def is_worker_idle(self) -> bool:
        return True

    def terminate(self) -> None:
        self._stop.set()
        with self._arrived:
            self._arrived.notify_all()
        if self._collector is not None:
            self._collector.join(timeout=5)

    def process_message(self, message: Message, context: Context) -> tuple[Message, Context]:
        if message.metadata.message_type != TRAIN:
            with self._compute:
                return self.app(message, context), context  # type: ignore[misc]
        parked = _Parked(message, context)
        with self._arrived:
            self._parked.append(parked)
            self._last_arrival = time.monotonic()
            self._arrived.notify_all()
        parked.done.wait()
        if isinstance(parked.reply, Exception):
            raise parked.reply
        return parked.reply, context  # type: ignore[return-value]

    def _collect(self) -> None:
        from ..client.handlers import handle_train_cohort  # the ClientApp's modules load with the app

        while not self._stop.is_set():
            with self._arrived:
                while not self._parked and not self._stop.is_set():
                    self._arrived.wait(timeout=1.0)
                while (self._parked and len(self._parked) < self.cohort_size and not self._stop.is_set()
                       and time.monotonic() - self._last_arrival < QUIET_S):
                    self._arrived.wait(timeout=QUIET_S)
                batch, self._parked = self._parked, []
            if not batch:
                continue
            try:
                with self._compute:
                    replies = handle_train_cohort([(p.message, p.context) for p in batch], self.chunk_size)
            except Exception as err:  # noqa: BLE001 - every parked call gets the error reply
                replies = [err] * len(batch)
            for parked, reply in zip(batch, replies):
                parked.reply = reply
                parked.done.set()
