"""Label-free, gradient-free adaptations, the same for every method (ALGORITHMS.md, protocol
item 5): EM label-prior correction (Saerens et al. 2002) from the federation's predicted
training prior, the same after the federation's temperature calibration (``em_calibrated``),
the balanced global model (that prior divided out), and AdaBN (BatchNorm statistics
re-estimated on a new client's unlabeled images, Li et al. 2016).

The training prior is predicted, never counted: each training client reports the mean class
probabilities of the model in question on its own training images (no labels), and the server
takes their sample-weighted mean. EM's estimate needs calibrated posteriors (Alexandari et al.
2020), and a model trained for long grows overconfident: in the same exchange each training
client also reports the negative log-likelihood of the model at each of ``TEMPERATURES`` on its
own labelled local test split, and the server keeps the temperature with the lowest total: a
new client's labels are never used, only the training clients' own. The server runs this
exchange for every method that has a global or new-client model (``server.evaluation``); the
client side is ``prior_share`` on the method's ``new_client_model``; cold-start scoring is
``label_free_scores``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Mapping, Sequence

import torch
from torch import nn

from ..config import ExperimentConfig
from ..data import ClientData, batches
from .training import predict_probs

Predictor = Callable[[torch.Tensor], torch.Tensor]

# config key of a cold-start message: the federation's predicted training prior (num_classes floats)
TRAIN_PRIOR_KEY = "train_prior"
# evaluation record key: that prior as the evaluation predicted it (rounded), for onboarding later
PREDICTED_PRIOR_RECORD = "predicted_train_prior"
# The temperatures the federation calibrates a new-client model with before EM; 1.0 (the model
# as it is) first, so that it wins ties.
TEMPERATURES = (1.0, 0.75, 1.25, 1.5, 2.0, 3.0)
# metrics keys of a prior reply: the client's mean predicted class probabilities on its training
# images at each temperature (flattened, temperature-major; T=1 first) and the summed NLL at each
# on the labelled local test split, of that many images
TEMPERED_PROBS_KEY = "mean_probs_tempered"
HELDOUT_NLL_KEY = "heldout_nll"
NUM_HELDOUT_KEY = "num_heldout"
# config keys of a cold-start message: the federation's temperature and its prior at that temperature
TEMPERATURE_KEY = "temperature"
CALIBRATED_PRIOR_KEY = "calibrated_train_prior"
# evaluation record keys: the temperature the evaluation chose and the prior at it (rounded),
# for onboarding later
TEMPERATURE_RECORD = "coldstart_temperature"
CALIBRATED_PRIOR_RECORD = "coldstart_calibrated_prior"


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


def tempered(probs: torch.Tensor, temperature: float) -> torch.Tensor:
    """Class probabilities with their log divided by ``temperature`` (temperature scaling of
    Guo et al. 2017, on probabilities: the logits up to a per-row constant)."""
    if temperature == 1.0:
        return probs
    return torch.softmax(torch.log(probs.clamp_min(1e-12)) / temperature, dim=1)


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
def prior_share(predict: Predictor, data: ClientData, cfg: ExperimentConfig, device: torch.device,
                temperatures: Sequence[float] = TEMPERATURES) -> dict[str, Any]:
    """A training client's reply to the prior exchange: the model's mean class probabilities on
    its training images (labels unused) at each of ``temperatures``, and its summed negative
    log-likelihood at each on the labelled local test split. No image or label leaves the node:
    (num_classes + 1) floats per temperature."""
    train = predict_probs(predict, data.train_x, cfg, device)
    nll = [0.0] * len(temperatures)
    if len(data.test_y):
        held, rows = predict_probs(predict, data.test_x, cfg, device), torch.arange(len(data.test_y))
        nll = [float(-torch.log(tempered(held, t)[rows, data.test_y.long()].clamp_min(1e-12)).sum())
               for t in temperatures]
    return {TEMPERED_PROBS_KEY: [float(v) for t in temperatures for v in tempered(train, t).mean(0)],
            HELDOUT_NLL_KEY: nll,
            NUM_HELDOUT_KEY: int(len(data.test_y)), "num_samples": data.num_train}


@dataclass(frozen=True)
class Calibration:
    """The federation's temperature for a new-client model and the training prior predicted
    at that temperature (what EM starts from)."""

    temperature: float
    prior: torch.Tensor


def federation_calibration(shares: Sequence[Mapping[str, Any]]) -> Calibration | None:
    """The temperature of ``TEMPERATURES`` with the lowest NLL over every training client's
    labelled local test split, and the sample-weighted prior at it (``federation_prior``);
    None when no client had both training and test images."""
    trained = [s for s in shares if int(s["num_samples"]) > 0]
    held = [s for s in shares if int(s.get(NUM_HELDOUT_KEY, 0)) > 0]
    if not trained or not held:
        return None
    nll = [sum(float(s[HELDOUT_NLL_KEY][i]) for s in held) for i in range(len(TEMPERATURES))]
    best = min(range(len(TEMPERATURES)), key=lambda i: (nll[i], i))
    return Calibration(TEMPERATURES[best], tempered_prior(trained, best))


def tempered_prior(shares: Sequence[Mapping[str, Any]], index: int, num_temperatures: int = len(TEMPERATURES)
                   ) -> torch.Tensor:
    """``federation_prior`` of the training clients' shares at the ``index``-th of the
    ``num_temperatures`` temperatures they were computed at (index 0 of ``TEMPERATURES``: the
    model as it is)."""
    trained = [s for s in shares if int(s["num_samples"]) > 0]
    size = len(trained[0][TEMPERED_PROBS_KEY]) // num_temperatures if trained else 0
    return federation_prior([list(s[TEMPERED_PROBS_KEY])[index * size:(index + 1) * size] for s in trained],
                            [int(s["num_samples"]) for s in trained])


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


def calibration_of(config: Mapping[str, Any]) -> Calibration | None:
    """The federation's calibration a cold-start message carries, or None."""
    prior = config.get(CALIBRATED_PRIOR_KEY)
    if config.get(TEMPERATURE_KEY) is None or prior is None or not len(prior):
        return None
    return Calibration(float(config[TEMPERATURE_KEY]), as_prior(list(prior)))


def calibration_config(calibration: Calibration | None) -> dict[str, Any]:
    """``calibration`` as cold-start message config (``calibration_of`` reads it back)."""
    if calibration is None:
        return {}
    return {TEMPERATURE_KEY: float(calibration.temperature),
            CALIBRATED_PRIOR_KEY: [float(v) for v in calibration.prior]}


def calibration_record(calibration: Calibration | None) -> dict[str, Any]:
    """``calibration`` as evaluation record keys (``latest_calibration`` reads them back)."""
    if calibration is None:
        return {}
    return {TEMPERATURE_RECORD: float(calibration.temperature),
            CALIBRATED_PRIOR_RECORD: [round(float(v), 5) for v in calibration.prior]}


def latest_calibration(history: Iterable[Mapping[str, Any]]) -> Calibration | None:
    """The federation's calibration as the newest evaluation in ``history`` chose it, or None."""
    found = [r for r in history if r.get(TEMPERATURE_RECORD) is not None and r.get(CALIBRATED_PRIOR_RECORD)]
    if not found:
        return None
    newest = found[-1]
    return Calibration(float(newest[TEMPERATURE_RECORD]), as_prior([float(v) for v in newest[CALIBRATED_PRIOR_RECORD]]))


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
                      cfg: ExperimentConfig, device: torch.device, calibration: Calibration | None = None
                      ) -> dict[str, float]:
    """A new-client model's accuracy on ``test_x`` with each label-free adaptation, using only
    ``unlabeled`` images: ``plain`` (none), ``em`` (EM from the predicted training prior),
    ``em_uniform`` (EM from a uniform one), with ``calibration`` ``em_calibrated`` (EM on the
    posteriors at the federation's temperature, from the prior predicted at it), and where
    ``modules`` hold BatchNorm ``adabn`` and ``adabn_em``. AdaBN changes ``modules`` in place, so
    it runs last. The model's predictions are computed once per state, whatever the number of
    variants."""
    num_classes = None

    def scores(variants: dict[str, tuple[torch.Tensor | None, float]]) -> dict[str, float]:
        """``{name: (EM's starting prior or None for no EM, temperature)}``."""
        nonlocal num_classes
        test_probs = predict_probs(predict, test_x, cfg, device)
        pool_probs = predict_probs(predict, unlabeled, cfg, device)
        num_classes = test_probs.shape[1]
        out = {}
        for name, (em_prior, temperature) in variants.items():
            probs, pool = tempered(test_probs, temperature), tempered(pool_probs, temperature)
            if em_prior is not None and len(pool):
                probs = prior_correct(probs, em_label_prior(pool, em_prior), em_prior)
            out[name] = float((probs.argmax(1) == test_y).float().mean())
        return out

    if len(test_y) == 0:
        return {}
    out = scores({"plain": (None, 1.0)})
    uniform = torch.full((num_classes,), 1.0 / num_classes)
    em = train_prior if train_prior is not None else uniform
    variants = {"em": (em, 1.0)}
    if train_prior is not None and not torch.equal(train_prior, uniform):
        variants["em_uniform"] = (uniform, 1.0)
    if calibration is not None:
        variants["em_calibrated"] = (calibration.prior, calibration.temperature)
    out.update(scores(variants))
    if any([reestimate_batchnorm(m, unlabeled, cfg, device) for m in modules]):
        out.update(scores({"adabn": (None, 1.0), "adabn_em": (em, 1.0)}))
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
