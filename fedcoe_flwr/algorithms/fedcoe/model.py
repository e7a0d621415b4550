"""FedCoE's model: the shared gate, the expert pool (a shared trunk and expert heads by
default), the client's private local part and local gate, and the payload keys that
split its state into what is uploaded and what never leaves the client."""

from __future__ import annotations

from typing import Mapping, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from ...config import ExperimentConfig
from ...models import GateMLP, GateNet, build_expert
from ..training import Arrays, expert_prefix, prefixed, seeded_init, state_of, unprefixed
from ..adaptation import as_prior, prior_correct

GATE = "gate."
TRUNK = "trunk."
CORRELATION = "correlation"
CLASS_MARGINAL = "class_marginal"  # mean predicted class probabilities (no labels): EM's training prior
# E[p p^T] of the mixture's predicted class probabilities (no labels): which classes it confuses
CLASS_COOCCURRENCE = "class_cooccurrence"
TRAIN_PRIOR = "train_prior"
LOCAL_PRIOR = "local_prior"  # private: the client's own label distribution



def network_part(net: nn.Module, part: str) -> Arrays:
    """``all`` of an expert network's state, or only its ``trunk`` or ``head`` keys."""
    state = state_of(net)
    if part == "all":
        return state
    return {k: v for k, v in state.items() if k.startswith(net.trunk_prefixes) == (part == "trunk")}


def trunk_part(cfg: ExperimentConfig) -> str:
    """What of the trunk network is shared: its trunk, and its head too when that is the shared expert."""
    return "all" if cfg.shared_expert_weight > 0 else "trunk"


def load_network_part(net: nn.Module, arrays: Mapping[str, torch.Tensor], part: str) -> None:
    missing, unexpected = net.load_state_dict(dict(arrays), strict=False)
    wanted = set(network_part(net, part))
    if unexpected or wanted & set(missing):
        raise KeyError(f"expert {part} state does not fit: missing {sorted(wanted & set(missing))[:3]}, "
                       f"unexpected {unexpected[:3]}")


def head_probs(net: nn.Module, h: torch.Tensor) -> torch.Tensor:
    """Class probabilities of ``net``'s head on the shared trunk's output ``h``."""
    return F.softmax(net.classifier(net.head_features(h)), dim=1)


def pool_network(cfg: ExperimentConfig, num_classes: int) -> nn.Module:
    """One network of the pool (the trunk's or an expert's), split at the config's trunk."""
    return build_expert(cfg, num_classes, cfg.trunk_convs)


def with_shared_expert(routed: torch.Tensor, shared: torch.Tensor, weight: float) -> torch.Tensor:
    """The routed experts' blend mixed with the shared expert's output at its weight."""
    return (1 - weight) * routed + weight * shared


def build_gate(cfg: ExperimentConfig, num_classes: int) -> nn.Module:
    """The shared gate: over the image, or (``gate_input: trunk``, ``trunk_flat``) over the shared
    trunk's feature map, which the gate then helps train and which already encodes the class."""
    if cfg.gate_input == "trunk":
        channels = pool_network(cfg, num_classes).trunk_channels
        return GateNet(cfg.num_experts, cfg.gate_width, in_channels=channels, stride=1)
    if cfg.gate_input == "trunk_flat":
        with torch.no_grad():
            size = pool_network(cfg, num_classes).trunk(torch.zeros(1, 3, cfg.image_size, cfg.image_size)).numel()
        return GateMLP(cfg.num_experts, size, 8 * cfg.gate_width)
    return GateNet(cfg.num_experts, cfg.gate_width)


class Parts(NamedTuple):
    """One forward pass of a client's model, every piece the local loss needs."""
    personal: torch.Tensor  # p_i: the personalised prediction
    mixture: torch.Tensor  # y: the global mixture
    local: torch.Tensor | None  # the local part's own class probabilities
    gate: torch.Tensor  # the gate's routing probabilities over the whole pool


class FedCoEModel(nn.Module):
    """The client's view: shared gate, its expert set, and (optionally) private parts."""

    def __init__(self, cfg: ExperimentConfig, num_classes: int, expert_ids: list[int],
                 with_private: bool = True):
        super().__init__()
        self.expert_ids = list(expert_ids)
        self.gate = build_gate(cfg, num_classes)
        self.gate_on_trunk = cfg.gate_input != "image"
        # with a shared trunk, only the trunk part of ``trunk`` and the head parts of the experts are used
        self.trunk = pool_network(cfg, num_classes) if cfg.shared_trunk else None
        self.expert_part = "head" if cfg.shared_trunk else "all"
        self.trunk_part = trunk_part(cfg)
        self.shared_expert_weight = cfg.shared_expert_weight
        self.expert = nn.ModuleDict({str(k): pool_network(cfg, num_classes) for k in expert_ids})
        dim = next(iter(self.expert.values())).feature_dim
        self.local: nn.Module | None = None
        self.local_gate: nn.Module | None = None
        # head: a Linear on the gate-mixed features; expert: a whole private network on x;
        # expert_head: a private expert head on the shared trunk's output (FedPer's private layers)
        self.local_kind = cfg.local_part
        self.local_state_part = "head" if cfg.local_part == "expert_head" else "all"
        self.gate_temperature = cfg.gate_temperature
        # level-2 label-prior correction: y re-weighted from the federation's training prior to
        # this client's own label distribution (computed from its labels; never leaves it)
        self.prior_correction = with_private and cfg.local_prior_correction
        if self.prior_correction:
            self.register_buffer("local_prior", torch.full((num_classes,), 1.0 / num_classes))
            self.register_buffer("train_prior", torch.full((num_classes,), 1.0 / num_classes))
        if with_private and cfg.local_part != "none":
            self.local = nn.Linear(dim, num_classes) if cfg.local_part == "head" else pool_network(cfg, num_classes)
            if cfg.local_gate:
                self.local_gate = nn.Linear(dim, 1)

    def gate_probs(self, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        """Routing probabilities; ``h``: the shared trunk's output for x, when the caller has it."""
        if self.gate_on_trunk:
            x = self.trunk.trunk(x) if h is None else h
        return F.softmax(self.gate(x) / self.gate_temperature, dim=1)

    def mixture(self, x: torch.Tensor, per_sample_top: int | None = None, h: torch.Tensor | None = None,
                gate: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """y(x) over the expert set (renormalised gate), and the gate-mixed features.
        ``h``, ``gate``: the shared trunk's output and the gate's probabilities for x, when the
        caller has them already."""
        if h is None and self.trunk is not None:
            h = self.trunk.trunk(x)
        weights = (self.gate_probs(x, h) if gate is None else gate)[:, self.expert_ids]
        if per_sample_top is not None and per_sample_top < len(self.expert_ids):
            top = weights.topk(per_sample_top, dim=1)
            weights = torch.zeros_like(weights).scatter(1, top.indices, top.values)
        weights = weights / weights.sum(1, keepdim=True).clamp_min(1e-12)
        probs, feats = 0.0, 0.0
        for j, k in enumerate(self.expert_ids):
            expert = self.expert[str(k)]
            f = expert.features(x) if h is None else expert.head_features(h)
            w = weights[:, j:j + 1]
            probs = probs + w * F.softmax(expert.classifier(f), dim=1)
            feats = feats + w * f
        if self.shared_expert_weight > 0:
            f, w = self.trunk.head_features(h), self.shared_expert_weight
            probs = with_shared_expert(probs, F.softmax(self.trunk.classifier(f), dim=1), w)
            feats = with_shared_expert(feats, f, w)
        return probs, feats  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (p_i: the personalised prediction, y: the global mixture)."""
        parts = self.parts(x)
        return parts.personal, parts.mixture

    def parts(self, x: torch.Tensor) -> Parts:
        """Every output of one pass, the trunk and the gate computed once."""
        h = self.trunk.trunk(x) if self.trunk is not None else None
        gate = self.gate_probs(x, h)
        y, feats = self.mixture(x, h=h, gate=gate)
        mine = prior_correct(y, self.local_prior, self.train_prior) if self.prior_correction else y
        if self.local is None:
            return Parts(mine, y, None, gate)
        if self.local_kind == "head":
            local_logits = self.local(feats)
        elif self.local_kind == "expert_head":
            local_logits = self.local.classifier(self.local.head_features(h))
        else:
            local_logits = self.local(x)
        beta = torch.sigmoid(self.local_gate(feats)) if self.local_gate is not None else 0.5
        local = F.softmax(local_logits, dim=1)
        return Parts((1 - beta) * mine + beta * local, y, local, gate)

    def expert_alone(self, k: int) -> "callable":
        """x -> class probabilities of expert k on its own (diagnostics)."""
        expert = self.expert[str(k)]
        if self.trunk is None:
            return lambda x: F.softmax(expert(x), dim=1)
        return self.head_on_trunk(expert)

    def head_on_trunk(self, net: nn.Module) -> "callable":
        """x -> class probabilities of ``net``'s head on the shared trunk's output."""
        return lambda x: head_probs(net, self.trunk.trunk(x))

    def experts_alone(self, x: torch.Tensor, with_shared: bool = False
                      ) -> tuple[list[torch.Tensor], torch.Tensor | None]:
        """Class probabilities of each of the client's experts on its own (and of the shared
        expert after them, ``with_shared`` and when it is on), the shared trunk run once for
        all; and the trunk's output (None without a shared trunk)."""
        h = self.trunk.trunk(x) if self.trunk is not None else None
        nets = [self.expert[str(k)] for k in self.expert_ids]
        if with_shared and self.shared_expert_weight > 0:
            nets.append(self.trunk)
        return [F.softmax(net(x), dim=1) if h is None else head_probs(net, h) for net in nets], h

    def pool_outputs(self, x: torch.Tensor) -> torch.Tensor:
        """The gate's K probabilities, then each expert alone, then the shared expert alone when
        it is on, side by side (images x (K + (E [+ 1]) x C)), the shared trunk run once for all
        (diagnostics: ``split_pool_outputs`` takes them apart)."""
        probs, h = self.experts_alone(x, with_shared=True)
        return torch.cat([self.gate_probs(x, h)] + probs, dim=1)

    def load_balance_loss(self) -> torch.Tensor:
        nets = list(self.expert.values()) + ([self.trunk] if self.trunk is not None else [])
        return sum((e.load_balance_loss() for e in nets), torch.zeros(()))

    # ---- state split: shared (uploaded) vs private (never leaves the client)
    def load_shared(self, arrays: Mapping[str, torch.Tensor]) -> None:
        self.gate.load_state_dict(unprefixed(GATE, arrays))
        if self.prior_correction and TRAIN_PRIOR in arrays:
            self.train_prior.copy_(as_prior(arrays[TRAIN_PRIOR]))
        if self.trunk is not None:
            load_network_part(self.trunk, unprefixed(TRUNK, arrays), self.trunk_part)
        for k in self.expert_ids:
            load_network_part(self.expert[str(k)], unprefixed(expert_prefix(k), arrays), self.expert_part)

    def shared_modules(self) -> list[nn.Module]:
        """What local training updates and uploads (the private parts aside)."""
        return ([self.gate] + ([self.trunk] if self.trunk is not None else [])
                + [self.expert[str(k)] for k in self.expert_ids])

    def shared_state(self) -> Arrays:
        out = prefixed(GATE, state_of(self.gate))
        if self.trunk is not None:
            out.update(prefixed(TRUNK, network_part(self.trunk, self.trunk_part)))
        for k in self.expert_ids:
            out.update(prefixed(expert_prefix(k), network_part(self.expert[str(k)], self.expert_part)))
        return out

    def private_modules(self) -> dict[str, nn.Module]:
        return {name: m for name, m in (("local.", self.local), ("local_gate.", self.local_gate)) if m is not None}

    def private_state(self) -> Arrays:
        out: Arrays = {}
        for prefix, module in self.private_modules().items():
            part = self.local_state_part if module is self.local else "all"
            out.update(prefixed(prefix, network_part(module, part)))
        if self.prior_correction:
            out[LOCAL_PRIOR] = self.local_prior.detach().cpu().clone()
        return out

    def set_local_prior(self, labels: torch.Tensor, num_classes: int) -> None:
        """The client's label distribution from its own training labels (Laplace-smoothed)."""
        counts = torch.bincount(labels.long().cpu(), minlength=num_classes).float()
        self.local_prior.copy_((counts + 1.0) / (counts.sum() + num_classes))

    def load_private(self, arrays: Mapping[str, torch.Tensor]) -> None:
        for prefix, module in self.private_modules().items():
            part = self.local_state_part if module is self.local else "all"
            load_network_part(module, unprefixed(prefix, arrays), part)
        if self.prior_correction and LOCAL_PRIOR in arrays:
            self.local_prior.copy_(arrays[LOCAL_PRIOR])


def build_client_model(cfg: ExperimentConfig, num_classes: int, arrays: Mapping[str, torch.Tensor],
                       expert_ids: list[int], private: Mapping[str, torch.Tensor] | None,
                       device: torch.device, private_seed: int) -> FedCoEModel:
    model = seeded_init(lambda: FedCoEModel(cfg, num_classes, expert_ids, with_private=True), private_seed)
    model.load_shared(arrays)
    if private:
        model.load_private(private)
    return model.to(device)


def split_pool_outputs(outputs: torch.Tensor, num_experts: int, num_classes: int
                       ) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor | None]:
    """``FedCoEModel.pool_outputs`` as (gate, [each expert's probabilities], the shared expert's or None)."""
    gate, rest = outputs[:, :num_experts], outputs[:, num_experts:]
    probs = list(rest.split(num_classes, dim=1))
    shared = probs.pop() if len(probs) > num_experts else None
    return gate, probs, shared


def routed_mixture(weights: torch.Tensor, experts: list[torch.Tensor], shared: torch.Tensor | None,
                   shared_weight: float) -> torch.Tensor:
    """The mixture of the experts' class probabilities (``split_pool_outputs``) routed by
    ``weights`` (images x K), blended with the shared expert's at its weight when there is one."""
    probs = (weights[:, :, None] * torch.stack(experts, 1)).sum(1)
    return probs if shared is None else with_shared_expert(probs, shared, shared_weight)
