"""pFedMoE (Yi et al. 2024, arXiv 2402.01350), as docs/algorithms/pfedmoe.md describes it.

Each client runs a local mixture of two feature extractors:
- the *global expert*: a shared small homogeneous feature extractor, uploaded after
  local training and averaged by the server with sample weights (or by the
  ``robust_aggregation`` rule when set; default mean);
- the *local expert*: the client's own (possibly wider) feature extractor, private;
- a private *local gate* on the raw sample (flattened): Linear -> switchable
  normalisation -> ReLU -> Linear -> softmax over 2, giving per-sample weights
  (alpha_global, alpha_local);
- a private *prediction head* on the mixed representation
  alpha_global * r_global(x) + alpha_local * r_local(x).
All four parts are trained together, in every local step, with cross-entropy. Only the
homogeneous extractor ever leaves the client during training.

Architecture, as FedMoE-DA (Sec. V-A) runs pFedMoE: the two convolutional layers of the
SmallCNN are the representation extractor, its two fully connected layers
(``fc1`` + ``classifier``) the head. The global extractor is the SmallCNN's conv part at
``width_multiplier``; the local extractor of client i has width
``pfedmoe_local_widths[i mod len]`` (channels 32w and 64w, as the SmallCNN).

Our choices where the paper (or its summary) is silent:
- Equal representation dimension: pFedMoE mixes representations of equal dimension.
  When a local extractor's last conv has a different channel count from the global
  one, a private 1x1 convolution + ReLU projects it to the global channel count (same
  spatial size, so the flattened representations have equal length). Width 1.0 (the
  default) needs no projection.
- The gate's hidden width is GATE_HIDDEN (128): not stated in the material we have.
  Switchable normalisation (Luo et al. 2019) is implemented for 1-D features as a
  learned softmax mix of layer-norm and batch-norm statistics (the official
  SwitchNorm1d form); running batch statistics use PyTorch's momentum 0.1 with
  mean 0 / variance 1 start instead of the official 0.997 with variance 0, so that an
  early evaluation is not thrown off by an empty running variance.
- Initialisation: every part starts from a seeded common initialisation (global
  extractor, gate and head the same for all clients; local extractors the same for all
  clients of one width), i.e. the initial model broadcast once.
- No global model: global accuracy is the mean over training clients of each client's
  model on the global test set.
- Cold start (our evaluation protocol): the global extractor with the sample-weighted
  average of the training clients' local parts. The gate and head have the same shape
  on every client and are averaged over all of them. Local extractors of different
  widths cannot be averaged: the new client gets the sample-weighted average within the
  group of clients whose local extractor is the most common architecture (ties: the
  group with more training samples, then the one seen first).
- A training client evaluated before it ever trained uses the initial local parts.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ExperimentConfig, bad_value
from .base import Algorithm, ClientStep, Predictor, Reply, ServerState
from .training import (Arrays, LocalTask, Trained, common_seed, prefixed, seeded_init, state_of, unprefixed,
                       weighted_average)
from .fedper import SmallCNNParams

GLOBAL = "global."
LOCAL = "local."
GATE = "gate."
HEAD = "head."
PRIVATE_PREFIXES = (LOCAL, GATE, HEAD)
GATE_HIDDEN = 128


# ============================================================== modules
class SwitchNorm1d(nn.Module):
    """Switchable normalisation for [B, C] features: mean and variance are learned
    softmax mixes of layer-norm (over C) and batch-norm (over B) statistics."""

    def __init__(self, num_features: int, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.eps, self.momentum = eps, momentum
        self.weight = nn.Parameter(torch.ones(num_features))
        self.bias = nn.Parameter(torch.zeros(num_features))
        self.mean_weight = nn.Parameter(torch.ones(2))
        self.var_weight = nn.Parameter(torch.ones(2))
        self.register_buffer("running_mean", torch.zeros(num_features))
        self.register_buffer("running_var", torch.ones(num_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mean_ln = x.mean(1, keepdim=True)
        var_ln = x.var(1, keepdim=True, unbiased=False)
        if self.training:
            mean_bn = x.mean(0, keepdim=True)
            var_bn = x.var(0, keepdim=True, unbiased=False)
            with torch.no_grad():
                self.running_mean.mul_(1 - self.momentum).add_(self.momentum * mean_bn.squeeze(0))
                self.running_var.mul_(1 - self.momentum).add_(self.momentum * var_bn.squeeze(0))
        else:
            mean_bn, var_bn = self.running_mean[None], self.running_var[None]
        mw, vw = F.softmax(self.mean_weight, 0), F.softmax(self.var_weight, 0)
        mean = mw[0] * mean_ln + mw[1] * mean_bn
        var = vw[0] * var_ln + vw[1] * var_bn
        return (x - mean) / (var + self.eps).sqrt() * self.weight + self.bias


class LocalGate(nn.Module):
    """pFedMoE's gate: flattened raw sample -> Linear -> SwitchNorm -> ReLU -> Linear -> softmax(2)."""

    def __init__(self, in_dim: int, hidden: int = GATE_HIDDEN):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.norm = SwitchNorm1d(hidden)
        self.fc2 = nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.softmax(self.fc2(F.relu(self.norm(self.fc1(x.flatten(1))))), dim=1)


class ConvExtractor(nn.Module):
    """The SmallCNN's two conv layers (5x5, ReLU, 2x2 max-pool), flattened; with an
    optional 1x1 conv + ReLU projecting the last channel count to ``out_channels``."""

    def __init__(self, c1: int, c2: int, out_channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(3, c1, 5)
        self.conv2 = nn.Conv2d(c1, c2, 5)
        self.proj = nn.Conv2d(c2, out_channels, 1) if out_channels != c2 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.conv1(x)), 2)
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        if self.proj is not None:
            h = F.relu(self.proj(h))
        return h.flatten(1)


class Head(nn.Module):
    """The SmallCNN's two fully connected layers."""

    def __init__(self, in_dim: int, hidden: int, num_classes: int):
        super().__init__()
        self.fc1 = nn.Linear(in_dim, hidden)
        self.classifier = nn.Linear(hidden, num_classes)

    def forward(self, r: torch.Tensor) -> torch.Tensor:
        return self.classifier(F.relu(self.fc1(r)))


def global_channels(cfg: ExperimentConfig) -> tuple[int, int]:
    return int(32 * cfg.width_multiplier), int(64 * cfg.width_multiplier)


def width_channels(width: float) -> tuple[int, int]:
    return max(1, int(32 * width)), max(1, int(64 * width))


def representation_dim(cfg: ExperimentConfig) -> int:
    side = ((cfg.image_size - 4) // 2 - 4) // 2
    return global_channels(cfg)[1] * side * side


def local_widths(cfg: ExperimentConfig) -> list[float]:
    return [float(w) for w in cfg.pfedmoe_local_widths.split(",")]


def width_of_client(cfg: ExperimentConfig, client_index: int) -> float:
    widths = local_widths(cfg)
    return widths[client_index % len(widths)] if client_index >= 0 else widths[0]



def build_global_extractor(cfg: ExperimentConfig) -> ConvExtractor:
    c1, c2 = global_channels(cfg)
    return ConvExtractor(c1, c2, c2)


def build_local_extractor(cfg: ExperimentConfig, c1: int, c2: int) -> ConvExtractor:
    return ConvExtractor(c1, c2, global_channels(cfg)[1])


def initial_private(cfg: ExperimentConfig, num_classes: int, width: float) -> Arrays:
    """Seeded common initial local parts for a client of the given width."""
    c1, c2 = width_channels(width)
    local = seeded_init(lambda: build_local_extractor(cfg, c1, c2), common_seed("pfedmoe", cfg.seed, f"local/{c1}/{c2}"))
    gate = seeded_init(lambda: LocalGate(3 * cfg.image_size ** 2), common_seed("pfedmoe", cfg.seed, "gate"))
    head = seeded_init(lambda: Head(representation_dim(cfg), int(512 * cfg.width_multiplier), num_classes),
                       common_seed("pfedmoe", cfg.seed, "head"))
    return {**prefixed(LOCAL, state_of(local)), **prefixed(GATE, state_of(gate)), **prefixed(HEAD, state_of(head))}


class PFedMoEModel(nn.Module):
    def __init__(self, cfg: ExperimentConfig, num_classes: int, local_c1: int, local_c2: int):
        super().__init__()
        self.global_extractor = build_global_extractor(cfg)
        self.local_extractor = build_local_extractor(cfg, local_c1, local_c2)
        self.gate = LocalGate(3 * cfg.image_size ** 2)
        self.head = Head(representation_dim(cfg), int(512 * cfg.width_multiplier), num_classes)

    def mix(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (mixed representation, gate weights [B, 2] = (global, local))."""
        w = self.gate(x)
        r = w[:, 0:1] * self.global_extractor(x) + w[:, 1:2] * self.local_extractor(x)
        return r, w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mix(x)[0])

    def load_parts(self, shared: Mapping[str, torch.Tensor], private: Mapping[str, torch.Tensor]) -> None:
        self.global_extractor.load_state_dict(unprefixed(GLOBAL, shared))
        self.local_extractor.load_state_dict(unprefixed(LOCAL, private))
        self.gate.load_state_dict(unprefixed(GATE, private))
        self.head.load_state_dict(unprefixed(HEAD, private))

    def shared_state(self) -> Arrays:
        return prefixed(GLOBAL, state_of(self.global_extractor))

    def private_state(self) -> Arrays:
        return {**prefixed(LOCAL, state_of(self.local_extractor)), **prefixed(GATE, state_of(self.gate)),
                **prefixed(HEAD, state_of(self.head))}


def local_channels_of(private: Mapping[str, torch.Tensor]) -> tuple[int, int]:
    return int(private[LOCAL + "conv1.weight"].shape[0]), int(private[LOCAL + "conv2.weight"].shape[0])


def build_client_model(cfg: ExperimentConfig, num_classes: int, shared: Mapping[str, torch.Tensor],
                       private: Mapping[str, torch.Tensor], device: torch.device) -> PFedMoEModel:
    c1, c2 = local_channels_of(private)
    model = PFedMoEModel(cfg, num_classes, c1, c2)
    model.load_parts(shared, private)
    return model.to(device)


def private_parts(arrays: Mapping[str, torch.Tensor]) -> Arrays:
    return {k: v for k, v in arrays.items() if k.startswith(PRIVATE_PREFIXES)}


def architecture(arrays: Mapping[str, torch.Tensor], prefix: str) -> tuple:
    return tuple(sorted((k, tuple(v.shape)) for k, v in arrays.items() if k.startswith(prefix)))


def average_local_parts(client_parts: list[tuple[Mapping[str, torch.Tensor], int]]) -> tuple[Arrays, dict[str, Any]]:
    """Cold-start local parts: gate and head averaged (sample-weighted) over every
    client; the local extractor averaged within the most common architecture group."""
    parts = [(p, n) for p, n in client_parts if p]
    if not parts:
        return {}, {"coldstart_group_size": 0}
    out: Arrays = {}
    for prefix in (GATE, HEAD):
        avg = weighted_average([unprefixed(prefix, p) for p, _ in parts], [n for _, n in parts])
        out.update(prefixed(prefix, avg))
    groups: dict[tuple, list[tuple[Mapping[str, torch.Tensor], int]]] = {}
    for p, n in parts:
        groups.setdefault(architecture(p, LOCAL), []).append((p, n))
    # max() keeps the first of equal keys: dict order is the order groups were seen
    best = max(groups.values(), key=lambda g: (len(g), sum(n for _, n in g)))
    local = weighted_average([unprefixed(LOCAL, p) for p, _ in best], [n for _, n in best])
    out.update(prefixed(LOCAL, local))
    c1, c2 = local_channels_of(out)
    return out, {"coldstart_group_size": len(best), "coldstart_local_channels": [c1, c2]}


def local_loss(model: PFedMoEModel, x: torch.Tensor, y: torch.Tensor, start: Mapping[str, torch.Tensor]
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Cross-entropy of the head on the gate-mixed representation: all four parts train
    together. Statistic: the gate's summed weight on the global expert."""
    r, w = model.mix(x)
    return F.cross_entropy(model.head(r), y), {"gate_global": w[:, 0].detach().sum()}


# ============================================================== the method
@dataclass(frozen=True)
class PFedMoEParams(SmallCNNParams):
    pfedmoe_local_widths: str = "1.0"  # width multipliers of local extractors, cycled over clients

    def check(self, cfg: ExperimentConfig) -> None:
        try:
            widths = [float(w) for w in self.pfedmoe_local_widths.split(",")]
        except ValueError:
            widths = []
        if not widths or min(widths) <= 0:
            raise bad_value("pfedmoe_local_widths", self.pfedmoe_local_widths,
                            "must be comma-separated positive numbers, e.g. '1.0,2.0'")


class PFedMoE(Algorithm):
    name = "pfedmoe"
    Params = PFedMoEParams
    has_global_model = False
    coldstart_needs_client_parts = True
    diagnostic_keys = ("expert_class_mi_bits",)  # its clients' own gates on the global test set

    # ---- server side
    def init_state(self, cfg: ExperimentConfig, num_classes: int) -> ServerState:
        extractor = seeded_init(lambda: build_global_extractor(cfg), common_seed("pfedmoe", cfg.seed, "global"))
        return ServerState(prefixed(GLOBAL, state_of(extractor)))

    def _payload(self, state: ServerState, cfg: ExperimentConfig, client_index: int):
        return dict(state.arrays), {"local_width": width_of_client(cfg, client_index)}

    def train_payload(self, state, cfg, client_index, server_round):
        return self._payload(state, cfg, client_index)

    def eval_payload(self, state, cfg, client_index):
        return self._payload(state, cfg, client_index)

    def aggregate(self, state: ServerState, replies: list[Reply], cfg, server_round):
        avg = weighted_average([unprefixed(GLOBAL, r.arrays) for r in replies], [r.num_samples for r in replies],
                               cfg.robust_aggregation, cfg.trim_fraction)
        gate_global = [float(r.metrics["gate_global_mean"]) for r in replies if "gate_global_mean" in r.metrics]
        diagnostics = {"gate_global_weight_mean": sum(gate_global) / len(gate_global)} if gate_global else {}
        return ServerState(prefixed(GLOBAL, avg), state.extra), diagnostics

    def coldstart_payload(self, state, cfg, client_parts=None):
        """Global extractor + averaged local parts; with no parts at all (nobody answered
        the evaluation) the new client falls back to the initial local parts."""
        local, info = average_local_parts(client_parts or [])
        return {**dict(state.arrays), **local}, info

    # ---- client side
    def local_task(self, step: ClientStep) -> LocalTask:
        private, data, cfg = step.private, step.data, step.cfg
        if not private:
            private = initial_private(cfg, step.num_classes, float(step.config["local_width"]))
        model = build_client_model(cfg, step.num_classes, step.arrays, private, step.device)

        def finish(model: PFedMoEModel, trained: Trained) -> tuple[Arrays, Arrays | None, dict[str, Any]]:
            return model.shared_state(), model.private_state(), {
                "num_samples": data.num_train, "train_loss": trained.mean_loss,
                "gate_global_mean": trained.sums.get("gate_global", 0.0) / max(trained.samples, 1)}

        # clients of different local widths have different shapes: they never stack together
        return LocalTask(model, local_loss, finish, data, step.seed, signature=local_channels_of(private))

    def client_model(self, step: ClientStep) -> PFedMoEModel:
        """The model this client evaluates, in eval mode."""
        arrays, config, private, cfg, num_classes, device = (
            step.arrays, step.config, step.private, step.cfg, step.num_classes, step.device)
        if private:
            parts = private
        elif any(k.startswith(LOCAL) for k in arrays):  # the cold-start model carries averaged parts
            parts = private_parts(arrays)
        else:  # a training client that has not trained yet: the initial local parts
            parts = initial_private(cfg, num_classes, float(config.get("local_width", width_of_client(cfg, -1))))
        return build_client_model(cfg, num_classes, arrays, parts, device).eval()

    def client_predict(self, step: ClientStep) -> Predictor:
        model = self.client_model(step)
        return lambda x: F.softmax(model(x), dim=1)

    def client_gate(self, step: ClientStep) -> Predictor | None:
        return self.client_model(step).gate  # weights of (global, local) extractor

    def client_eval_upload(self, step: ClientStep) -> Arrays | None:
        private = step.private
        """Local extractor, gate and head, only for the cold-start average."""
        return dict(private) if private else None
