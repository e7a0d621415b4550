"""FedPer (Arivazhagan et al. 2019): federated learning with personalisation layers.

The model is the paper's (and FedMoE-DA's) SmallCNN, split as in FedMoE-DA Sec. V-A:
the two convolutional layers are the *body* (base layers), the two fully connected
layers (``fc1`` + ``classifier``) the *head* (personalisation layers).

- Every local step trains body and head together with cross-entropy.
- Only the body is uploaded; the server averages it sample-weighted (FedAvg); the
  ``robust_aggregation`` option (median / trimmed mean) applies here, default mean.
- The head stays on the client (private state) and never leaves it during training.
- There is no single global model: global accuracy is the mean, over training clients,
  of each client's body+head on the global test set.
- Cold start (our evaluation protocol, not part of FedPer): the shared body with the
  sample-weighted average of the training clients' heads, which they send with their
  evaluation reply (``client_eval_upload``).

Our choices where the paper is silent:
- Initialisation: every client's head starts from the head of the same seeded initial
  model the server's body comes from (equivalent to broadcasting the full initial
  model w^0 once, as FedAvg-style implementations do); no extra traffic, and heads
  share an origin, so averaging them for the cold-start model is meaningful.
- A training client evaluated before it ever trained uses that same initial head.
- With no client parts at all (no training client answered the evaluation), the
  cold-start model is the body with the initial head.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from ..config import ExperimentConfig, Section, bad_value
from ..models import SmallCNN, small_cnn
from .base import Algorithm, ClientStep, Predictor, Reply, ServerState
from .training import (Arrays, LocalTask, Trained, prefixed, seeded_init, softmax_predictor, state_of, unprefixed,
                       weighted_average)

BODY = "body."
HEAD = "head."
BODY_LAYERS = ("conv1.", "conv2.")
HEAD_LAYERS = ("fc1.", "classifier.")


@dataclass(frozen=True)
class SmallCNNParams(Section):
    """Methods that split the FedMoE-DA paper's small CNN (two conv + two FC layers) into a
    shared and a private part, as their papers do: they need ``model: cnn``."""

    def check_selected(self, cfg: ExperimentConfig) -> None:
        if cfg.model != "cnn":
            raise bad_value("model", cfg.model, f"algorithm '{cfg.algorithm}' splits the small CNN as its paper "
                                                "does: use model 'cnn'")


def initial_model(cfg: ExperimentConfig, num_classes: int) -> SmallCNN:
    """The seeded initial model w^0: its body is the server's, its head every client's."""
    return seeded_init(lambda: small_cnn(cfg, num_classes), cfg.seed)


def split_state(state: Mapping[str, torch.Tensor], body_layers: tuple[str, ...] = BODY_LAYERS
                ) -> tuple[Arrays, Arrays]:
    """SmallCNN state -> (body, head) without prefixes; the head is everything else."""
    body = {k: v for k, v in state.items() if k.startswith(body_layers)} if body_layers else {}
    head = {k: v for k, v in state.items() if k not in body}
    if not all(k.startswith(BODY_LAYERS + HEAD_LAYERS) for k in state):
        raise ValueError(f"unexpected SmallCNN keys: {sorted(k for k in state if not k.startswith(BODY_LAYERS + HEAD_LAYERS))}")
    return body, head


def build_client_model(cfg: ExperimentConfig, num_classes: int, body: Mapping[str, torch.Tensor],
                       head: Mapping[str, torch.Tensor] | None, device: torch.device,
                       body_layers: tuple[str, ...] = BODY_LAYERS) -> SmallCNN:
    """Body from the server; head private (or the initial head when there is none yet)."""
    if head is None:
        head = split_state(state_of(initial_model(cfg, num_classes)), body_layers)[1]
    model = small_cnn(cfg, num_classes)
    model.load_state_dict({**dict(body), **dict(head)}, strict=True)
    return model.to(device)



def local_loss(model: SmallCNN, x: torch.Tensor, y: torch.Tensor, start: Mapping[str, torch.Tensor]
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Body and head trained together with cross-entropy."""
    return F.cross_entropy(model(x), y), {}


class FedPer(Algorithm):
    name = "fedper"
    Params = SmallCNNParams
    has_global_model = False
    coldstart_needs_client_parts = True
    body_layers: tuple[str, ...] = BODY_LAYERS  # shared; the rest of the CNN is private

    # ---- server side
    def init_state(self, cfg: ExperimentConfig, num_classes: int) -> ServerState:
        body, _ = split_state(state_of(initial_model(cfg, num_classes)), self.body_layers)
        return ServerState(prefixed(BODY, body))

    def train_payload(self, state, cfg, client_index, server_round):
        return dict(state.arrays), {}

    def aggregate(self, state: ServerState, replies: list[Reply], cfg, server_round):
        body = weighted_average([unprefixed(BODY, r.arrays) for r in replies], [r.num_samples for r in replies],
                                cfg.robust_aggregation, cfg.trim_fraction)
        return ServerState(prefixed(BODY, body), state.extra), {}

    def coldstart_payload(self, state, cfg, client_parts=None):
        """Shared body + sample-weighted average of the training clients' heads."""
        arrays = dict(state.arrays)
        heads = [(unprefixed(HEAD, parts), n) for parts, n in (client_parts or []) if parts]
        if heads:
            arrays.update(prefixed(HEAD, weighted_average([h for h, _ in heads], [n for _, n in heads])))
        return arrays, {"num_heads_averaged": len(heads)}

    # ---- client side
    def local_task(self, step: ClientStep) -> LocalTask:
        private, data = step.private, step.data
        head = unprefixed(HEAD, private) if private else None
        model = build_client_model(step.cfg, step.num_classes, unprefixed(BODY, step.arrays), head, step.device,
                                   self.body_layers)

        def finish(model: SmallCNN, trained: Trained) -> tuple[Arrays, Arrays | None, dict[str, Any]]:
            body, head = split_state(state_of(model), self.body_layers)
            return prefixed(BODY, body), prefixed(HEAD, head), {"num_samples": data.num_train,
                                                                "train_loss": trained.mean_loss}

        return LocalTask(model, local_loss, finish, data, step.seed)

    def client_predict(self, step: ClientStep) -> Predictor:
        arrays, private, cfg, num_classes, device = step.arrays, step.private, step.cfg, step.num_classes, step.device
        if private:
            head = unprefixed(HEAD, private)
        elif any(k.startswith(HEAD) for k in arrays):  # the cold-start model carries its head
            head = unprefixed(HEAD, arrays)
        else:  # a training client that has not trained yet: the initial head
            head = None
        return softmax_predictor(build_client_model(cfg, num_classes, unprefixed(BODY, arrays), head, device,
                                                    self.body_layers))

    def client_eval_upload(self, step: ClientStep) -> Arrays | None:
        private = step.private
        """The private head, only for the cold-start model's average (evaluation protocol)."""
        return dict(private) if private else None
