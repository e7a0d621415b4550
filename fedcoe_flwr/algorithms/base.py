"""The hooks every method implements; the server (``fedcoe_flwr.server``) and the client
(``fedcoe_flwr.client``) call only these and never name a method or its payload keys.

Arrays cross the wire as flat ``dict[str, Tensor]`` with dotted prefixes (``model.``,
``gate.``, ``expert.3.``); the Flower glue only converts them. Keys that start with
``records.RELAY_PREFIX`` stand for peer-to-peer traffic the server only relays (FedMoE-DA's
experts): the communication report counts their bytes separately."""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Mapping

import numpy as np
import torch

from ..config import ExperimentConfig, Section
from ..data import ClientData
from .training import LocalTask, accuracy, run_task
from .adaptation import calibration_of, coldstart_record, label_free_scores, prior_of

Arrays = dict[str, torch.Tensor]
Predictor = Callable[[torch.Tensor], torch.Tensor]


@dataclass
class Reply:
    """One client's validated training reply, as the aggregation functions see it."""

    client_index: int
    num_samples: int
    arrays: Arrays
    metrics: dict[str, Any] = field(default_factory=dict)


@dataclass
class ServerState:
    """Everything the server must checkpoint: tensors plus small numpy extras."""

    arrays: Arrays
    extra: dict[str, np.ndarray] = field(default_factory=dict)


@dataclass
class ClientStep:
    """What one client-side call gets: the server's payload and its config, this client's
    private parts (None before it trained), its data (None where the call needs none),
    the experiment config, and where to compute."""

    arrays: Arrays
    config: Mapping[str, Any]
    private: Arrays | None
    data: ClientData | None
    cfg: ExperimentConfig
    num_classes: int = 0
    device: torch.device = torch.device("cpu")
    seed: int = 0


@dataclass(frozen=True)
class NoParams(Section):
    """A method with no keys of its own."""


class Algorithm:
    """Pure client-update and server-aggregation functions of one method."""

    name = "base"
    Params: type = NoParams  # the method's own config section (its keys, their defaults, its checks)
    has_global_model = True  # False: global accuracy is the mean over clients' models
    # True: the new-client model averages clients' private parts (FedPer's heads, ...),
    # which training clients send with their evaluation reply (see client_eval_upload)
    coldstart_needs_client_parts = False
    # True: an onboarded node may join training (add_client grows any per-client server state)
    can_join_training = False
    diagnostic_keys: tuple[str, ...] = ()  # round/evaluation record keys worth a log line

    # ---- server side ---------------------------------------------------------
    def init_state(self, cfg: ExperimentConfig, num_classes: int) -> ServerState:
        raise NotImplementedError

    def train_payload(self, state: ServerState, cfg: ExperimentConfig, client_index: int,
                      server_round: int) -> tuple[Arrays, dict[str, Any]]:
        raise NotImplementedError

    def expected_upload(self, payload: Arrays, config: Mapping[str, Any], cfg: ExperimentConfig
                        ) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
        """Keys, shapes and dtypes a valid reply to ``payload`` must carry."""
        return {k: (tuple(v.shape), v.dtype) for k, v in payload.items()}

    def validate_upload(self, arrays: Arrays, cfg: ExperimentConfig) -> str | None:
        """The method's own checks of a reply that passed the generic ones: why it must be
        rejected, or None."""
        return None

    def aggregate(self, state: ServerState, replies: list[Reply], cfg: ExperimentConfig,
                  server_round: int) -> tuple[ServerState, dict[str, Any]]:
        raise NotImplementedError

    def eval_payload(self, state: ServerState, cfg: ExperimentConfig, client_index: int
                     ) -> tuple[Arrays, dict[str, Any]]:
        return self.train_payload(state, cfg, client_index, 0)

    def coldstart_payload(self, state: ServerState, cfg: ExperimentConfig,
                          client_parts: list[tuple[Arrays, int]] | None = None
                          ) -> tuple[Arrays, dict[str, Any]]:
        """The model a new client gets. ``client_parts``: (arrays, n_train) from every
        training client's evaluation reply when ``coldstart_needs_client_parts``."""
        return self.train_payload(state, cfg, -1, 0)

    def add_client(self, state: ServerState, client_index: int, cfg: ExperimentConfig) -> ServerState:
        """The state once an onboarded node trains as ``client_index`` (per-client rows grow)."""
        return state

    def global_predict(self, state: ServerState, cfg: ExperimentConfig, num_classes: int,
                       device: torch.device) -> Predictor | None:
        """A function x -> class probabilities of the method's single global model."""
        return None

    def global_diagnostics(self, state: ServerState, cfg: ExperimentConfig, num_classes: int,
                           device: torch.device, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        """Extra per-evaluation figures on the global test set (FedCoE: each expert alone)."""
        return {}

    def write_plots(self, state: ServerState, cfg: ExperimentConfig, run_dir: Path) -> list[Path]:
        """The method's own pictures of its final state, written into ``run_dir``."""
        return []

    def describe(self, cfg: ExperimentConfig) -> str:
        """One line of the method's shape for the start-of-run log."""
        return f"model={cfg.model}"

    # ---- onboarding --------------------------------------------------------
    def routing_row_size(self, cfg: ExperimentConfig) -> int | None:
        """Length of the routing row a new node reports (a mixture's K), or None: no row."""
        return None

    def onboard(self, step: ClientStep, unlabeled: torch.Tensor) -> tuple[dict[str, Any], list[float] | None]:
        """A new node's model from the cold-start package, adapted to its ``unlabeled``
        images with no gradient step: (what the node saves, its routing row or None)."""
        return {"arrays": {k: v.detach().cpu().clone() for k, v in step.arrays.items()},
                "payload_config": dict(step.config)}, None

    def bundle_predictor(self, bundle: Mapping[str, Any], cfg: ExperimentConfig, num_classes: int,
                         device: torch.device) -> Predictor:
        """x -> class probabilities of a model saved by ``onboard``."""
        return self.client_predict(ClientStep(bundle["arrays"], bundle["payload_config"], None, None, cfg,
                                              num_classes, device))

    # ---- client side ---------------------------------------------------------
    # why ``local_task`` is None (a method that trains its own way): the cohort executor then
    # trains its clients one by one, and logs this
    cohort_fallback = "the method defines no local task"

    def local_task(self, step: ClientStep) -> LocalTask | None:
        """The client's local update as a ``LocalTask`` (its model, the method's local loss as
        a pure function, and how the reply is made from the trained model), or None where the
        method trains its own way. The per-client path (``client_train``) and the cohort
        executor (``fedcoe_flwr.cohort``) both train from it: one copy of the method's math."""
        return None

    def client_train(self, step: ClientStep) -> tuple[Arrays, Arrays | None, dict[str, Any]]:
        """-> (arrays to upload, new private state, metrics incl. num_samples, train_loss)."""
        task = self.local_task(step)
        if task is None:
            raise NotImplementedError(f"{self.name} defines neither local_task nor client_train")
        return run_task(task, step.cfg, step.device)

    def client_predict(self, step: ClientStep) -> Predictor:
        """The client's personalised model as x -> class probabilities."""
        raise NotImplementedError

    def client_gate(self, step: ClientStep) -> Predictor | None:
        """A method whose clients each route with a gate of their own (a per-client mixture): this
        client's gate as x -> probabilities over its experts, so that evaluation measures how it
        routes the global test set (``algorithms.specialisation``); None for any other method."""
        return None

    def client_eval_upload(self, step: ClientStep) -> Arrays | None:
        """What a training client sends back at evaluation time for the cold-start model
        (only when ``coldstart_needs_client_parts``); never training data."""
        return None

    def new_client_model(self, step: ClientStep) -> tuple[Predictor, list[torch.nn.Module]]:
        """The model a new client builds from the cold-start package (``step.arrays``, no private
        part) as x -> class probabilities, and the modules whose BatchNorm statistics AdaBN may
        re-estimate (the predictor reads them). Training clients also run it on their own images
        to predict the federation's training prior (``adaptation``)."""
        return self.client_predict(replace(step, private=None, data=None)), []

    def client_coldstart(self, step: ClientStep) -> dict[str, Any]:
        """The new-client model on the local test split with no gradient step: unadapted and with
        every label-free adaptation (``adaptation.label_free_scores``), from the predicted
        training prior the message carries."""
        predict, modules = self.new_client_model(step)
        data = step.data
        unlabeled = data.train_x if len(data.train_x) else data.test_x
        return coldstart_record(label_free_scores(predict, modules, unlabeled, data.test_x, data.test_y,
                                                  prior_of(step.config), step.cfg, step.device,
                                                  calibration_of(step.config)))
