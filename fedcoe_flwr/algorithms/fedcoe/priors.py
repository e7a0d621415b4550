"""Label-shift arithmetic on class-probability vectors: the EM estimate of a new
client's label prior (Saerens et al. 2002) and the prior correction it enables."""

from __future__ import annotations

from typing import Any

import torch


def em_label_prior(probs: torch.Tensor, train_prior: torch.Tensor, iters: int = 100, tol: float = 1e-6
                   ) -> torch.Tensor:
    """Saerens et al. (2002): EM estimate of the new client's label distribution from
    the model's posteriors on its unlabeled data."""
    prior = train_prior.clone()
    for _ in range(iters):
        adjusted = probs * (prior / train_prior)
        adjusted = adjusted / adjusted.sum(1, keepdim=True).clamp_min(1e-12)
        new_prior = adjusted.mean(0)
        if (new_prior - prior).abs().max() < tol:
            return new_prior
        prior = new_prior
    return prior


def prior_correct(probs: torch.Tensor, prior: torch.Tensor, train_prior: torch.Tensor) -> torch.Tensor:
    adjusted = probs * (prior / train_prior)
    return adjusted / adjusted.sum(1, keepdim=True).clamp_min(1e-12)


def as_prior(values: Any) -> torch.Tensor:
    """Class weights as a strictly positive distribution (float32, CPU): a zero entry would
    make a prior correction divide by zero."""
    prior = torch.as_tensor(values, dtype=torch.float32).cpu().clamp_min(1e-6)
    return prior / prior.sum()
