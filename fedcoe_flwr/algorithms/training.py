"""What the methods' own modules share: state-dict plumbing, weighted averaging, the
local SGD loop (and ``LocalTask``, a client's local update as the per-client loop and the
cohort executor both run it) and prediction/accuracy helpers."""

from __future__ import annotations

import zlib
from dataclasses import dataclass
from typing import Any, Callable, Hashable, Iterable, Iterator, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ExperimentConfig
from ..data import ClientData, batches

Arrays = dict[str, torch.Tensor]
BN_STATISTICS = ("running_mean", "running_var")  # BatchNorm buffers that are data statistics, not weights
BN_BUFFER_SUFFIXES = BN_STATISTICS + ("num_batches_tracked",)


def expert_prefix(k: int) -> str:
    """Payload key prefix of expert k (mixture methods)."""
    return f"expert.{k}."


def common_seed(method: str, seed: int, part: str) -> int:
    """A seed shared by every client for one part of a method's initial model (the
    initial model broadcast once), distinct per method and part."""
    return zlib.crc32(f"{method}/{seed}/{part}".encode())


def softmax_predictor(model: nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
    model.eval()
    return lambda x: F.softmax(model(x), dim=1)


# ------------------------------------------------------------------ state dicts
def prefixed(prefix: str, state: Mapping[str, torch.Tensor]) -> Arrays:
    return {f"{prefix}{k}": v.detach() for k, v in state.items()}


def unprefixed(prefix: str, arrays: Mapping[str, torch.Tensor]) -> Arrays:
    return {k[len(prefix):]: v for k, v in arrays.items() if k.startswith(prefix)}


def weighted_average(states: list[Mapping[str, torch.Tensor]], weights: Iterable[float],
                     method: str = "mean", trim_fraction: float = 0.1) -> Arrays:
    """Key by key: ``mean`` = sum_i w_i state_i / sum_i w_i; the robust options ignore
    the weights and take the coordinate-wise ``median`` or the ``trimmed_mean``
    (drop the floor(trim_fraction * n) largest and smallest values of each coordinate).
    Integer tensors are rounded back."""
    w = torch.tensor(list(weights), dtype=torch.float64)
    if len(states) == 0 or not w.sum() > 0:
        raise ValueError("weighted_average needs at least one state with positive weight")
    w = w / w.sum()
    trim = int(trim_fraction * len(states))
    out: Arrays = {}
    for key, ref in states[0].items():
        if method == "median" or (method == "trimmed_mean" and trim > 0):
            stacked = torch.stack([s[key].to(torch.float64) for s in states])
            if method == "median":
                avg = stacked.median(dim=0).values if len(states) % 2 else stacked.sort(dim=0).values[
                    len(states) // 2 - 1:len(states) // 2 + 1].mean(0)
            else:
                avg = stacked.sort(dim=0).values[trim:len(states) - trim].mean(0)
        else:
            # accumulated in place: stacking n float64 copies first was 15x slower (50 clients, 0.9M weights)
            avg = torch.zeros(ref.shape, dtype=torch.float64)
            for weight, s in zip(w.tolist(), states):
                avg.add_(s[key], alpha=weight)
        out[key] = avg.round().to(ref.dtype) if not ref.is_floating_point() else avg.to(ref.dtype)
    return out


def load_module(module: nn.Module, state: Mapping[str, torch.Tensor], device: torch.device) -> nn.Module:
    module.load_state_dict(dict(state), strict=True)
    return module.to(device)


def state_of(module: nn.Module) -> Arrays:
    return {k: v.detach().cpu().clone() for k, v in module.state_dict().items()}


def seeded_init(builder: Callable[[], nn.Module], seed: int) -> nn.Module:
    """Build a module with a fixed seed without disturbing the global RNG."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return builder()


# ------------------------------------------------------------------ training
def make_optimizer(params: Iterable[nn.Parameter], cfg: ExperimentConfig) -> torch.optim.Optimizer:
    return torch.optim.SGD(list(params), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def proximal_term(modules: Iterable[nn.Module], anchors: Iterable[Mapping[str, torch.Tensor]]) -> torch.Tensor:
    """sum ||w - w_anchor||^2 over trainable parameters (FedProx, Li et al. 2020)."""
    total = None
    for module, anchor in zip(modules, anchors):
        for name, p in module.named_parameters():
            d = (p - anchor[name]).pow(2).sum()
            total = d if total is None else total + d
    return total if total is not None else torch.zeros(())


def local_batches(data: ClientData, cfg: ExperimentConfig, device: torch.device, seed: int
                  ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """The batches local training steps on, in order, over ``cfg.local_epochs`` epochs,
    shuffled (and augmented) with the client's own seed; a batch of one after the first
    is dropped, not trained on (it breaks BatchNorm). The per-client loop and the cohort
    executor both take their batches from here, so a client steps on the same batches
    whichever path trains it and whichever clients it is trained with."""
    generator = torch.Generator().manual_seed(seed)
    first = True
    for _ in range(cfg.local_epochs):
        for xb, yb in batches(data.train_x, data.train_y, cfg.batch_size, device, generator, cfg.augment,
                              cfg.pixel_scale):
            if xb.shape[0] < 2 and not first:
                continue
            first = False
            yield xb, yb


def check_finite(loss: torch.Tensor, cfg: ExperimentConfig, who: str = "local training") -> None:
    if not bool(torch.isfinite(loss).all()):
        raise FloatingPointError(f"{who} loss became {loss.tolist()}; lower lr ({cfg.lr})")


def run_local_epochs(params: list[nn.Parameter], modules: list[nn.Module], data: ClientData,
                     cfg: ExperimentConfig, device: torch.device, seed: int,
                     loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> float:
    """Local SGD over ``cfg.local_epochs`` epochs; returns the mean training loss."""
    optimizer = make_optimizer(params, cfg)
    for m in modules:
        m.train()
    total, count = 0.0, 0
    for xb, yb in local_batches(data, cfg, device, seed):
        optimizer.zero_grad(set_to_none=True)
        loss = loss_fn(xb, yb)
        check_finite(loss, cfg)
        loss.backward()
        optimizer.step()
        total += loss.item() * xb.shape[0]
        count += xb.shape[0]
    return total / max(count, 1)


# ------------------------------------------------------------------ one client's local update
Objective = Callable[[nn.Module, torch.Tensor, torch.Tensor, Mapping[str, torch.Tensor]],
                     tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass
class Trained:
    """What local training measured: the sample-weighted mean loss, the objective's
    per-batch statistics summed over the batches, and how many samples were stepped on."""

    mean_loss: float
    sums: dict[str, float]
    samples: int


@dataclass
class LocalTask:
    """One client's local update, split so that the per-client loop (``run_task``) and the
    cohort executor (``fedcoe_flwr.cohort``) run the same math.

    ``model``: the client's model holding its starting parameters (the cohort path reads it
    as the functional template and writes the trained parameters back into it).
    ``objective(model, x, y, start)``: the method's local loss, a pure function of the
    model's parameters and buffers, the batch and ``start`` (the parameters when training
    began, by ``named_parameters`` name; FedProx's anchor; empty unless ``uses_start``);
    returns (loss, per-batch statistics to sum, each a 0-d tensor). It may call any method
    of ``model`` but must not keep state between calls other than buffers (BatchNorm).
    ``finish(model, trained)``: ``client_train``'s result from the trained model.
    ``signature``: clients whose tasks have equal signatures (and parameter shapes) share
    the objective's constants and stack into one vectorised cohort."""

    model: nn.Module
    objective: Objective
    finish: Callable[[nn.Module, Trained], tuple[Arrays, Arrays | None, dict[str, Any]]]
    data: ClientData
    seed: int
    signature: Hashable = ()
    uses_start: bool = False


def start_parameters(model: nn.Module) -> Arrays:
    return {k: v.detach().clone() for k, v in model.named_parameters()}


def module_anchors(model: nn.Module, modules: Iterable[nn.Module], start: Mapping[str, torch.Tensor]
                   ) -> list[Arrays]:
    """``start`` (by the model's parameter names) split into one anchor per submodule, by
    that submodule's own parameter names (``proximal_term``'s anchors)."""
    names = {id(m): name for name, m in model.named_modules()}
    out = []
    for module in modules:
        prefix = names[id(module)] + "." if names[id(module)] else ""
        out.append({n: start[prefix + n] for n, _ in module.named_parameters()})
    return out


def run_task(task: LocalTask, cfg: ExperimentConfig, device: torch.device
             ) -> tuple[Arrays, Arrays | None, dict[str, Any]]:
    """The per-client path: ``run_local_epochs`` on the task's own model."""
    model = task.model
    start = start_parameters(model) if task.uses_start else {}
    sums: dict[str, float] = {}
    samples = 0

    def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        nonlocal samples
        loss, stats = task.objective(model, x, y, start)
        for key, value in stats.items():
            sums[key] = sums.get(key, 0.0) + float(value)
        samples += x.shape[0]
        return loss

    loss = run_local_epochs(list(model.parameters()), [model], task.data, cfg, device, task.seed, loss_fn)
    return task.finish(model, Trained(loss, sums, samples))


def nll_of_probs(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.nll_loss(torch.log(probs.clamp_min(1e-8)), y)


@torch.no_grad()
def predict_probs(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                  cfg: ExperimentConfig, device: torch.device) -> torch.Tensor:
    out = [predict(xb).float().cpu() for xb, _ in batches(x, torch.zeros(len(x)), cfg.eval_batch_size, device,
                                                         pixel_scale=cfg.pixel_scale)]
    return torch.cat(out) if out else torch.zeros(0)


def accuracy(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
             cfg: ExperimentConfig, device: torch.device) -> float:
    if len(y) == 0:
        return float("nan")
    probs = predict_probs(predict, x, cfg, device)
    return float((probs.argmax(1) == y).float().mean())
