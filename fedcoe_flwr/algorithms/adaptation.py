"""Label-free, gradient-free adaptations, the same for every method (ALGORITHMS.md, protocol
item 5): EM label-prior correction (Saerens et al. 2002) from the federation's predicted
training prior, the balanced global model (that prior divided out), and AdaBN (BatchNorm
statistics re-estimated on a new client's unlabeled images, Li et al. 2016).

The training prior is predicted, never counted: each training client reports the mean class
probabilities of the model in question on its own training images (no labels), and the server
takes their sample-weighted mean. The server runs this exchange for every method that has a
global or new-client model (``server.evaluation``); the client side is ``mean_prediction`` on
the method's ``new_client_model``; cold-start scoring is ``label_free_scores``."""

from __future__ import annotations

from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from ..config import ExperimentConfig
from ..data import batches
from .training import predict_probs

Predictor = Callable[[torch.Tensor], torch.Tensor]

# config key of a cold-start message: the federation's predicted training prior (num_classes floats)
TRAIN_PRIOR_KEY = "train_prior"
# evaluation record key: that prior as the evaluation predicted it (rounded), for onboarding later
PREDICTED_PRIOR_RECORD = "predicted_train_prior"
# metrics key of a prior reply: the client's mean predicted class probabilities on its training images
MEAN_PROBS_KEY = "mean_probs"


# ------------------------------------------------------------------ label-shift arithmetic
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


def balanced(predict: Predictor, train_prior: torch.Tensor) -> Predictor:
    """The model with its training prior divided out (a uniform prior put in its place): the
    right prior for a balanced test set such as the official one."""
    uniform = torch.full_like(train_prior, 1.0 / len(train_prior))

    def predict_balanced(x: torch.Tensor) -> torch.Tensor:
        probs = predict(x)
        return prior_correct(probs, uniform.to(probs.device), train_prior.to(probs.device))

    return predict_balanced


# ------------------------------------------------------------------ the predicted training prior
def mean_prediction(predict: Predictor, x: torch.Tensor, cfg: ExperimentConfig, device: torch.device
                    ) -> list[float]:
    """A training client's share of the predicted training prior: the model's mean class
    probabilities on its training images (labels unused)."""
    return [float(v) for v in predict_probs(predict, x, cfg, device).mean(0)]


def federation_prior(rows: Sequence[Sequence[float]], weights: Sequence[int]) -> torch.Tensor:
    """The sample-weighted mean of the clients' mean predictions."""
    w = torch.tensor([float(n) for n in weights], dtype=torch.float64)
    if not len(rows) or not w.sum() > 0:
        raise ValueError("federation_prior needs at least one client with training images")
    stacked = torch.tensor([list(r) for r in rows], dtype=torch.float64)
    return as_prior((w[:, None] * stacked).sum(0) / w.sum())


def prior_of(config: Mapping[str, Any]) -> torch.Tensor | None:
    """The predicted training prior a cold-start message carries, or None."""
    values = config.get(TRAIN_PRIOR_KEY)
    return as_prior(list(values)) if values is not None and len(values) else None


def latest_predicted_prior(history: Iterable[Mapping[str, Any]]) -> list[float] | None:
    """The federation's training prior as the newest evaluation in ``history`` predicted it, or None."""
    found = [r[PREDICTED_PRIOR_RECORD] for r in history if r.get(PREDICTED_PRIOR_RECORD)]
    return [float(v) for v in found[-1]] if found else None


# ------------------------------------------------------------------ AdaBN
@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, x: torch.Tensor, cfg: ExperimentConfig, device: torch.device) -> bool:
    """AdaBN (Li et al. 2016): BatchNorm statistics recomputed on unlabeled local data.
    False (nothing changed) when the model has no BatchNorm or there is no data."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or len(x) == 0:
        return False
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
    model.train()
    for xb, _ in batches(x, torch.zeros(len(x)), cfg.eval_batch_size, device, pixel_scale=cfg.pixel_scale):
        model(xb)
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    model.eval()
    return True


# ------------------------------------------------------------------ a new client's scores
def label_free_scores(predict: Predictor, modules: Iterable[nn.Module], unlabeled: torch.Tensor,
                      test_x: torch.Tensor, test_y: torch.Tensor, train_prior: torch.Tensor | None,
                      cfg: ExperimentConfig, device: torch.device) -> dict[str, float]:
    """A new-client model's accuracy on ``test_x`` with each label-free adaptation, using only
    ``unlabeled`` images: ``plain`` (none), ``em`` (EM from the predicted training prior),
    ``em_uniform`` (EM from a uniform one), and where ``modules`` hold BatchNorm ``adabn`` and
    ``adabn_em``. AdaBN changes ``modules`` in place, so it runs last. The model's predictions
    are computed once per state, whatever the number of variants."""
    num_classes = None

    def scores(em_priors: dict[str, torch.Tensor | None]) -> dict[str, float]:
        nonlocal num_classes
        test_probs = predict_probs(predict, test_x, cfg, device)
        pool_probs = predict_probs(predict, unlabeled, cfg, device)
        num_classes = test_probs.shape[1]
        out = {}
        for name, em_prior in em_priors.items():
            probs = test_probs if em_prior is None or not len(pool_probs) else prior_correct(
                test_probs, em_label_prior(pool_probs, em_prior), em_prior)
            out[name] = float((probs.argmax(1) == test_y).float().mean())
        return out

    if len(test_y) == 0:
        return {}
    out = scores({"plain": None})
    uniform = torch.full((num_classes,), 1.0 / num_classes)
    variants: dict[str, torch.Tensor | None] = {"em": train_prior if train_prior is not None else uniform}
    if train_prior is not None and not torch.equal(train_prior, uniform):
        variants["em_uniform"] = uniform
    out.update(scores(variants))
    if any([reestimate_batchnorm(m, unlabeled, cfg, device) for m in modules]):
        out.update(scores({"adabn": None, "adabn_em": variants["em"]}))
    return out


def coldstart_record(scores: Mapping[str, float], configured: float | None = None) -> dict[str, float]:
    """The metrics of a cold-start reply: every variant under ``coldstart_accuracy_<name>``, and
    ``coldstart_accuracy`` the method's configured adaptation (``configured``) or, for a method
    with none, the unadapted model."""
    out = {f"coldstart_accuracy_{name}": value for name, value in scores.items()}
    if configured is not None:
        out["coldstart_accuracy"] = configured
    elif "plain" in scores:
        out["coldstart_accuracy"] = scores["plain"]
    return out
