"""FedAvg (McMahan et al. 2017): sample-weighted average of all parameters.
With ``prox_mu`` > 0 the local loss gets FedProx's (mu/2)||w - w_global||^2 term."""

from __future__ import annotations

from functools import partial
from typing import Any, Mapping

import torch
import torch.nn.functional as F

from ..config import ExperimentConfig
from ..models import build_expert
from .base import Algorithm, ClientStep, Predictor, Reply, ServerState
from .training import (Arrays, LocalTask, Trained, load_module, prefixed, proximal_term, seeded_init,
                       softmax_predictor, state_of, unprefixed, weighted_average)

PREFIX = "model."


def build_model(cfg: ExperimentConfig, num_classes: int, state: Mapping[str, torch.Tensor],
                device: torch.device) -> torch.nn.Module:
    return load_module(build_expert(cfg, num_classes), state, device)


def local_loss(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, start: Mapping[str, torch.Tensor], *,
               load_balance_weight: float, prox_mu: float) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy on the whole model (plus the ResNet-MoE routers' load balance), plus
    the proximal term to the starting model when prox_mu > 0."""
    loss = F.cross_entropy(model(x), y) + load_balance_weight * model.load_balance_loss()
    if prox_mu > 0:
        loss = loss + prox_mu / 2 * proximal_term([model], [start])
    return loss, {}


class FedAvg(Algorithm):
    name = "fedavg"
    can_join_training = True  # no per-client server state

    def proximal_weight(self, cfg: ExperimentConfig) -> float:
        return 0.0  # plain cross-entropy
    def init_state(self, cfg: ExperimentConfig, num_classes: int) -> ServerState:
        model = seeded_init(lambda: build_expert(cfg, num_classes), cfg.seed)
        return ServerState(prefixed(PREFIX, state_of(model)))

    def train_payload(self, state, cfg, client_index, server_round):
        return dict(state.arrays), {}

    def aggregate(self, state: ServerState, replies: list[Reply], cfg, server_round):
        averaged = weighted_average([r.arrays for r in replies], [r.num_samples for r in replies],
                                    cfg.robust_aggregation, cfg.trim_fraction)
        return ServerState(averaged, state.extra), {}

    def global_predict(self, state, cfg, num_classes, device):
        return softmax_predictor(build_model(cfg, num_classes, unprefixed(PREFIX, state.arrays), device))

    def local_task(self, step: ClientStep) -> LocalTask:
        cfg, data = step.cfg, step.data
        model = build_model(cfg, step.num_classes, unprefixed(PREFIX, step.arrays), step.device)
        prox_mu = self.proximal_weight(cfg)

        def finish(model: torch.nn.Module, trained: Trained) -> tuple[Arrays, Arrays | None, dict[str, Any]]:
            return prefixed(PREFIX, state_of(model)), None, {"num_samples": data.num_train,
                                                             "train_loss": trained.mean_loss}

        return LocalTask(model, partial(local_loss, load_balance_weight=cfg.load_balance_weight, prox_mu=prox_mu),
                         finish, data, step.seed, uses_start=prox_mu > 0)

    def client_predict(self, step: ClientStep) -> Predictor:
        return self.new_client_model(step)[0]

    def new_client_model(self, step: ClientStep) -> tuple[Predictor, list[torch.nn.Module]]:
        model = build_model(step.cfg, step.num_classes, unprefixed(PREFIX, step.arrays), step.device)
        return softmax_predictor(model), [model]

