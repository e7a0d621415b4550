"""What every method shares: the Algorithm interface the Strategy and ClientApp call,
weighted averaging of state dicts, local SGD and evaluation loops.

Arrays cross the wire as flat ``dict[str, Tensor]`` with dotted prefixes
(``model.``, ``gate.``, ``expert.3.``); the Flower glue only converts them. Keys that
start with ``relay.`` stand for peer-to-peer traffic the server only relays (FedMoE-DA's
experts): the communication report counts their bytes separately."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import ExperimentConfig
from ..data import ClientData, batches

Arrays = dict[str, torch.Tensor]
BN_BUFFER_SUFFIXES = ("running_mean", "running_var", "num_batches_tracked")
RELAY_PREFIX = "relay."


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


class Algorithm:
    """Pure client-update and server-aggregation functions of one method.

    The Strategy moves records; it never looks inside them beyond validation."""

    name = "base"
    has_global_model = True  # False: global accuracy is the mean over clients' models
    # True: the new-client model averages clients' private parts (FedPer's heads, ...),
    # which training clients send with their evaluation reply (see client_eval_upload)
    coldstart_needs_client_parts = False

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

    def global_predict(self, state: ServerState, cfg: ExperimentConfig, num_classes: int,
                       device: torch.device) -> Callable[[torch.Tensor], torch.Tensor] | None:
        """A function x -> class probabilities of the method's single global model."""
        return None

    def global_diagnostics(self, state: ServerState, cfg: ExperimentConfig, num_classes: int,
                           device: torch.device, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        """Extra per-evaluation figures on the global test set (FedCoE: each expert alone)."""
        return {}

    # ---- client side ---------------------------------------------------------
    def client_train(self, arrays: Arrays, config: Mapping[str, Any], private: Arrays | None,
                     data: ClientData, cfg: ExperimentConfig, num_classes: int, device: torch.device,
                     seed: int) -> tuple[Arrays, Arrays | None, dict[str, Any]]:
        """-> (arrays to upload, new private state, metrics incl. num_samples, train_loss)."""
        raise NotImplementedError

    def client_predict(self, arrays: Arrays, config: Mapping[str, Any], private: Arrays | None,
                       cfg: ExperimentConfig, num_classes: int, device: torch.device
                       ) -> Callable[[torch.Tensor], torch.Tensor]:
        """The client's personalised model as x -> class probabilities."""
        raise NotImplementedError

    def client_eval_upload(self, arrays: Arrays, config: Mapping[str, Any], private: Arrays | None,
                           cfg: ExperimentConfig) -> Arrays | None:
        """What a training client sends back at evaluation time for the cold-start model
        (only when ``coldstart_needs_client_parts``); never training data."""
        return None

    def client_coldstart(self, arrays: Arrays, config: Mapping[str, Any], data: ClientData,
                         cfg: ExperimentConfig, num_classes: int, device: torch.device
                         ) -> dict[str, Any]:
        """Evaluate the new-client model on the local test split with no gradient step."""
        predict = self.client_predict(arrays, config, None, cfg, num_classes, device)
        return {"coldstart_accuracy": accuracy(predict, data.test_x, data.test_y, cfg, device)}


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


def run_local_epochs(params: list[nn.Parameter], modules: list[nn.Module], data: ClientData,
                     cfg: ExperimentConfig, device: torch.device, seed: int,
                     loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> float:
    """Local SGD over ``cfg.local_epochs`` epochs; returns the mean training loss."""
    optimizer = make_optimizer(params, cfg)
    generator = torch.Generator().manual_seed(seed)
    for m in modules:
        m.train()
    total, count = 0.0, 0
    for _ in range(cfg.local_epochs):
        for xb, yb in batches(data.train_x, data.train_y, cfg.batch_size, device, generator, cfg.augment):
            if xb.shape[0] < 2 and count > 0:
                continue  # a batch of one breaks BatchNorm; it is dropped, not trained on
            optimizer.zero_grad(set_to_none=True)
            loss = loss_fn(xb, yb)
            if not torch.isfinite(loss):
                raise FloatingPointError(f"local training loss became {loss.item()}; lower lr ({cfg.lr})")
            loss.backward()
            optimizer.step()
            total += loss.item() * xb.shape[0]
            count += xb.shape[0]
    return total / max(count, 1)


def nll_of_probs(probs: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    return F.nll_loss(torch.log(probs.clamp_min(1e-8)), y)


@torch.no_grad()
def predict_probs(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor,
                  cfg: ExperimentConfig, device: torch.device) -> torch.Tensor:
    out = [predict(xb).float().cpu() for xb, _ in batches(x, torch.zeros(len(x)), cfg.eval_batch_size, device)]
    return torch.cat(out) if out else torch.zeros(0)


def accuracy(predict: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
             cfg: ExperimentConfig, device: torch.device) -> float:
    if len(y) == 0:
        return float("nan")
    probs = predict_probs(predict, x, cfg, device)
    return float((probs.argmax(1) == y).float().mean())
