"""A new client's model from the pool with no gradient step: route on its unlabeled
images, keep its top-m experts when configured, AdaBN, EM label-prior correction (on the
posteriors at the federation's temperature when the package carries one).
``adapt_new_client`` is the one adaptation that cold-start evaluation scores and that an
onboarded node saves; ``coldstart_evaluate`` also reports each adaptation on and off."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch

from ...config import ExperimentConfig
from ...data import ClientData
from ..adaptation import (Calibration, as_prior, coldstart_record, em_label_prior, label_free_scores,
                          prior_correct, reestimate_batchnorm, tempered)
from ..training import accuracy, predict_probs
from .aggregation import expert_set
from .model import TRAIN_PRIOR, FedCoEModel
from .params import experts_per_client


def training_prior(arrays: Mapping[str, torch.Tensor], cfg: ExperimentConfig, num_classes: int,
                   predicted: torch.Tensor | None = None) -> torch.Tensor:
    """The label distribution the pool was trained under, as EM needs it (``coldstart_prior:
    predicted``): ``predicted``, the training clients' mean prediction with this very package
    (the evaluation's, as every method's EM gets it; sent with the package to an onboarded
    node), else the package's own, their mixtures' mean prediction after local training; or
    uniform."""
    if cfg.coldstart_prior == "predicted" and predicted is not None:
        return as_prior(predicted)
    if cfg.coldstart_prior == "predicted" and TRAIN_PRIOR in arrays:
        return as_prior(arrays[TRAIN_PRIOR])
    return torch.full((num_classes,), 1.0 / num_classes)


def pool_model(arrays: Mapping[str, torch.Tensor], cfg: ExperimentConfig, num_classes: int,
               device: torch.device) -> FedCoEModel:
    """The gate, trunk and all K experts of the package, no private parts, in eval mode."""
    model = FedCoEModel(cfg, num_classes, list(range(cfg.num_experts)), with_private=False)
    model.load_shared(arrays)
    return model.to(device).eval()


def route(model: FedCoEModel, unlabeled: torch.Tensor, cfg: ExperimentConfig, device: torch.device) -> torch.Tensor:
    """The node's routing row (mean gate probabilities on its images, before AdaBN); with
    ``coldstart_top_m`` the model keeps only the row's top-m experts."""
    row = predict_probs(model.gate_probs, unlabeled, cfg, device).mean(0)
    m = experts_per_client(cfg)
    if cfg.coldstart_top_m and m < cfg.num_experts:
        model.expert_ids = expert_set(row.numpy(), m, cfg.num_experts)
    return row


@dataclass
class NewClientModel:
    """A new client's adapted model: the routed pool, its routing row, whether AdaBN ran,
    and EM's estimate of its label prior (None without EM) against the training prior, both on
    the posteriors at ``temperature``."""

    model: FedCoEModel
    row: torch.Tensor
    adabn: bool
    prior: torch.Tensor | None
    train_prior: torch.Tensor
    temperature: float = 1.0

    @torch.no_grad()
    def predict(self, x: torch.Tensor) -> torch.Tensor:
        probs = self.model.mixture(x)[0]
        if self.prior is None:
            return probs
        return prior_correct(tempered(probs.float().cpu(), self.temperature), self.prior, self.train_prior)


def adapt_new_client(arrays: Mapping[str, torch.Tensor], unlabeled: torch.Tensor, cfg: ExperimentConfig,
                     num_classes: int, device: torch.device, predicted_prior: torch.Tensor | None = None,
                     calibration: Calibration | None = None) -> NewClientModel:
    """The configured adaptation, in this order: route (top-m), AdaBN, EM prior (from
    ``training_prior``; with ``calibration`` and ``coldstart_prior: predicted``, on the posteriors
    at the federation's temperature from the prior predicted at it, as ``em_calibrated``: EM at
    temperature 1 needs calibrated posteriors, which a model trained for long no longer gives)."""
    model = pool_model(arrays, cfg, num_classes, device)
    row = route(model, unlabeled, cfg, device)
    adabn = bool(cfg.coldstart_adabn) and reestimate_batchnorm(model, unlabeled, cfg, device)
    train_prior = training_prior(arrays, cfg, num_classes, predicted_prior)
    prior, temperature = None, 1.0
    if cfg.coldstart_em:
        if calibration is not None and cfg.coldstart_prior == "predicted":
            train_prior, temperature = calibration.prior, calibration.temperature
        probs = tempered(predict_probs(lambda x: model.mixture(x)[0], unlabeled, cfg, device), temperature)
        prior = em_label_prior(probs, train_prior)
    return NewClientModel(model, row, adabn, prior, train_prior, temperature)


def coldstart_evaluate(arrays: Mapping[str, torch.Tensor], data: ClientData, cfg: ExperimentConfig,
                       num_classes: int, device: torch.device, train_prior: torch.Tensor | None = None,
                       calibration: Calibration | None = None) -> dict[str, Any]:
    """A new client's model from the pool, adapted with unlabeled data only (its local
    train split with labels unused), scored on its local test split: the configured
    adaptation (``adapt_new_client``) and every method's
    label-free variants (``adaptation.label_free_scores``), both with ``train_prior``, the prior
    the evaluation predicted (the package's when None), the variants also with the federation's
    ``calibration``."""
    unlabeled = data.train_x if len(data.train_x) else data.test_x
    model = pool_model(arrays, cfg, num_classes, device)
    row = route(model, unlabeled, cfg, device)
    scores = label_free_scores(lambda x: model.mixture(x)[0], [model], unlabeled, data.test_x, data.test_y,
                               training_prior(arrays, cfg, num_classes) if train_prior is None else train_prior,
                               cfg, device, calibration)
    configured = adapt_new_client(arrays, unlabeled, cfg, num_classes, device, train_prior, calibration)
    out: dict[str, Any] = coldstart_record(
        scores, accuracy(configured.predict, data.test_x, data.test_y, cfg, device))
    out["routing_row"] = [float(v) for v in row]
    out["num_test"] = int(len(data.test_y))
    return out
