"""FedCoE (Dai et al. 2026), our reading in ../shared/docs/ALGORITHMS.md.

Level 1 (global): the server's expert pool {theta_k} and one shared gate phi;
y(x) = sum_k g_k(x) softmax(f_k(x)) over the client's expert set.
Level 2 (local): a private local part l_i and local gate beta_i(x);
p_i(y|x) = (1 - beta_i(x)) y(x) + beta_i(x) softmax(l_i(x)).
Clients upload their trained experts, gate and correlation row (mean gate
probabilities over their training data); the server aggregates each expert with
smoothed, capped correlation weights and the gate with sample weights.
With ``shared_trunk`` the experts share one trunk (the convolutions, averaged with
sample weights like FedAvg) and differ in their heads (the rest of the network).
Issue-8 levers (config keys, defaults set from the measured ablation in the README):
``local_prior_correction`` (y re-weighted to the client's own label prior inside p_i),
``local_loss_weight`` (the local part's own cross-entropy), ``global_balanced`` (the
global model divides out the federation's predicted training prior), ``coldstart_prior``
(EM's training prior: clients' mean predictions or uniform), ``gate_temperature``."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import ExperimentConfig
from ..data import ClientData, batches
from ..models import GateNet, build_expert
from .common import (Algorithm, Arrays, BN_BUFFER_SUFFIXES, Reply, ServerState, accuracy,
                     nll_of_probs, predict_probs, prefixed, proximal_term, run_local_epochs,
                     seeded_init, state_of, unprefixed, weighted_average)

GATE = "gate."
TRUNK = "trunk."
CORRELATION = "correlation"
CLASS_MARGINAL = "class_marginal"  # mean predicted class probabilities (no labels): EM's training prior
TRAIN_PRIOR = "train_prior"
LOCAL_PRIOR = "local_prior"  # private: the client's own label distribution


def expert_prefix(k: int) -> str:
    return f"expert.{k}."


# ============================================================== pure server math
def expert_set(row: np.ndarray | None, m: int, num_experts: int) -> list[int]:
    """The client's expert set S_i: top-m of its correlation row, all K while unknown."""
    if row is None or m >= num_experts:
        return list(range(num_experts))
    return sorted(int(k) for k in np.argsort(-row, kind="stable")[:m])


def cap_shares(shares: np.ndarray, cap: float) -> np.ndarray:
    """Limit every share to ``cap`` and hand the excess to the others in proportion
    (water-filling). With fewer than 1/cap contributors the cap is raised to 1/n."""
    shares = np.asarray(shares, dtype=np.float64)
    shares = shares / shares.sum()
    cap = max(cap, 1.0 / len(shares))
    capped = np.zeros(len(shares), dtype=bool)
    for _ in range(len(shares)):
        over = (shares > cap + 1e-12) & ~capped
        if not over.any():
            break
        capped |= over
        free = 1.0 - cap * capped.sum()
        rest = shares[~capped]
        shares = np.where(capped, cap, shares)
        if rest.sum() > 0:
            shares[~capped] = rest / rest.sum() * free
        elif (~capped).any():  # the others all had zero share: split the excess evenly (sum stays 1)
            shares[~capped] = free / (~capped).sum()
    return shares


def expert_weights(num_samples: np.ndarray, correlations: np.ndarray, k: int, cfg: ExperimentConfig
                   ) -> np.ndarray:
    """Shares of each contributor in expert k: n_i * c~_ik, c~ smoothed toward uniform,
    then capped; plain sample weights when correlation weighting is off."""
    n = np.asarray(num_samples, dtype=np.float64)
    if not cfg.correlation_weighting:
        return n / n.sum()
    num_experts = correlations.shape[1]
    s = cfg.correlation_smoothing
    smoothed = (1 - s) * correlations[:, k] + s / num_experts
    w = n * smoothed
    return cap_shares(w / w.sum(), cfg.correlation_cap)


def aggregate_expert(states: list[Mapping[str, torch.Tensor]], shares: np.ndarray,
                     num_samples: np.ndarray, method: str = "mean", trim_fraction: float = 0.1) -> Arrays:
    """Parameters by the correlation shares (or a robust rule); BatchNorm statistics by
    plain sample weights (never by correlation weights)."""
    params = weighted_average(states, shares, method, trim_fraction)
    bn_keys = [key for key in states[0] if key.endswith(BN_BUFFER_SUFFIXES)]
    if bn_keys:
        bn = weighted_average([{k: s[k] for k in bn_keys} for s in states], num_samples)
        params.update(bn)
    return params


def aggregate_pool(pool: list[Arrays], contributions: list[tuple[dict[int, Arrays], np.ndarray, int]],
                   cfg: ExperimentConfig) -> tuple[list[Arrays], list[float | None]]:
    """New expert pool from (experts the client trained, its correlation row, n_i).
    An expert nobody received stays as it was. Returns each expert's largest single
    client share (the takeover detector; None when nobody updated it)."""
    new_pool, max_share = [], []
    for k, old in enumerate(pool):
        users = [(experts[k], row, n) for experts, row, n in contributions if k in experts]
        if not users:
            new_pool.append(old)
            max_share.append(None)
            continue
        states = [u[0] for u in users]
        rows = np.stack([u[1] for u in users])
        n = np.array([u[2] for u in users], dtype=np.float64)
        shares = expert_weights(n, rows, k, cfg)
        new_pool.append(aggregate_expert(states, shares, n, cfg.robust_aggregation, cfg.trim_fraction))
        max_share.append(float(shares.max()))
    return new_pool, max_share


def routing_diagnostics(rows: np.ndarray) -> dict[str, Any]:
    """How the gate routes, from the known correlation rows (clients x K): the experts'
    mean usage, its entropy (1 = all experts used alike, 0 = one expert), the mean row
    entropy (low = each client routes to few experts) and the spread of the rows across
    clients (mean over experts of the std over clients; 0 = every client routes alike)."""
    if len(rows) == 0:
        return {"expert_usage": []}
    k = rows.shape[1]

    def entropy(p: np.ndarray) -> np.ndarray:
        p = np.clip(p, 1e-12, 1.0)
        return -(p * np.log(p)).sum(-1) / np.log(k) if k > 1 else np.zeros(p.shape[:-1])

    usage = rows.mean(0)
    return {"expert_usage": usage.tolist(), "expert_usage_entropy": float(entropy(usage)),
            "correlation_row_entropy": float(entropy(rows).mean()),
            "correlation_spread": float(rows.std(0).mean())}


# ============================================================== models
def network_part(net: nn.Module, part: str) -> Arrays:
    """``all`` of an expert network's state, or only its ``trunk`` or ``head`` keys."""
    state = state_of(net)
    if part == "all":
        return state
    return {k: v for k, v in state.items() if k.startswith(net.trunk_prefixes) == (part == "trunk")}


def load_network_part(net: nn.Module, arrays: Mapping[str, torch.Tensor], part: str) -> None:
    missing, unexpected = net.load_state_dict(dict(arrays), strict=False)
    wanted = set(network_part(net, part))
    if unexpected or wanted & set(missing):
        raise KeyError(f"expert {part} state does not fit: missing {sorted(wanted & set(missing))[:3]}, "
                       f"unexpected {unexpected[:3]}")


def build_gate(cfg: ExperimentConfig, num_classes: int) -> GateNet:
    """The shared gate: over the image, or (``gate_input: trunk``) over the shared trunk's
    feature map, which the gate then helps train and which already encodes the class."""
    if cfg.gate_input == "trunk":
        channels = build_expert(cfg, num_classes).trunk_channels
        return GateNet(cfg.num_experts, cfg.gate_width, in_channels=channels, stride=1)
    return GateNet(cfg.num_experts, cfg.gate_width)


class FedCoEModel(nn.Module):
    """The client's view: shared gate, its expert set, and (optionally) private parts."""

    def __init__(self, cfg: ExperimentConfig, num_classes: int, expert_ids: list[int],
                 with_private: bool = True):
        super().__init__()
        self.expert_ids = list(expert_ids)
        self.gate = build_gate(cfg, num_classes)
        self.gate_on_trunk = cfg.gate_input == "trunk"
        # with a shared trunk, only the trunk part of ``trunk`` and the head parts of the experts are used
        self.trunk = build_expert(cfg, num_classes) if cfg.shared_trunk else None
        self.expert_part = "head" if cfg.shared_trunk else "all"
        self.expert = nn.ModuleDict({str(k): build_expert(cfg, num_classes) for k in expert_ids})
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
            self.local = nn.Linear(dim, num_classes) if cfg.local_part == "head" else build_expert(cfg, num_classes)
            if cfg.local_gate:
                self.local_gate = nn.Linear(dim, 1)

    def gate_probs(self, x: torch.Tensor, h: torch.Tensor | None = None) -> torch.Tensor:
        """Routing probabilities; ``h``: the shared trunk's output for x, when the caller has it."""
        if self.gate_on_trunk:
            x = self.trunk.trunk(x) if h is None else h
        return F.softmax(self.gate(x) / self.gate_temperature, dim=1)

    def mixture(self, x: torch.Tensor, per_sample_top: int | None = None, h: torch.Tensor | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """y(x) over the expert set (renormalised gate), and the gate-mixed features.
        ``h``: the shared trunk's output for x, when the caller has it already."""
        if h is None and self.trunk is not None:
            h = self.trunk.trunk(x)
        weights = self.gate_probs(x, h)[:, self.expert_ids]
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
        return probs, feats  # type: ignore[return-value]

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (p_i: the personalised prediction, y: the global mixture)."""
        p, y, _ = self.parts(x)
        return p, y

    def parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """-> (p_i, y, the local part's own class probabilities or None)."""
        h = self.trunk.trunk(x) if self.trunk is not None else None
        y, feats = self.mixture(x, h=h)
        mine = prior_correct(y, self.local_prior, self.train_prior) if self.prior_correction else y
        if self.local is None:
            return mine, y, None
        if self.local_kind == "head":
            local_logits = self.local(feats)
        elif self.local_kind == "expert_head":
            local_logits = self.local.classifier(self.local.head_features(h))
        else:
            local_logits = self.local(x)
        beta = torch.sigmoid(self.local_gate(feats)) if self.local_gate is not None else 0.5
        local = F.softmax(local_logits, dim=1)
        return (1 - beta) * mine + beta * local, y, local

    def expert_alone(self, k: int) -> "callable":
        """x -> class probabilities of expert k on its own (diagnostics)."""
        expert = self.expert[str(k)]
        if self.trunk is None:
            return lambda x: F.softmax(expert(x), dim=1)
        return lambda x: F.softmax(expert.classifier(expert.head_features(self.trunk.trunk(x))), dim=1)

    def load_balance_loss(self) -> torch.Tensor:
        nets = list(self.expert.values()) + ([self.trunk] if self.trunk is not None else [])
        return sum((e.load_balance_loss() for e in nets), torch.zeros(()))

    # ---- state split: shared (uploaded) vs private (never leaves the client)
    def load_shared(self, arrays: Mapping[str, torch.Tensor]) -> None:
        self.gate.load_state_dict(unprefixed(GATE, arrays))
        if self.prior_correction and TRAIN_PRIOR in arrays:
            self.train_prior.copy_(as_prior(arrays[TRAIN_PRIOR]))
        if self.trunk is not None:
            load_network_part(self.trunk, unprefixed(TRUNK, arrays), "trunk")
        for k in self.expert_ids:
            load_network_part(self.expert[str(k)], unprefixed(expert_prefix(k), arrays), self.expert_part)

    def shared_modules(self) -> list[nn.Module]:
        """What local training updates and uploads (the private parts aside)."""
        return ([self.gate] + ([self.trunk] if self.trunk is not None else [])
                + [self.expert[str(k)] for k in self.expert_ids])

    def shared_state(self) -> Arrays:
        out = prefixed(GATE, state_of(self.gate))
        if self.trunk is not None:
            out.update(prefixed(TRUNK, network_part(self.trunk, "trunk")))
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


# ============================================================== cold start (no gradient step)
@torch.no_grad()
def reestimate_batchnorm(model: nn.Module, x: torch.Tensor, cfg: ExperimentConfig, device: torch.device) -> bool:
    """AdaBN (Li et al. 2016): BatchNorm statistics recomputed on unlabeled local data."""
    norms = [m for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if not norms or len(x) == 0:
        return False
    saved = [m.momentum for m in norms]
    for m in norms:
        m.reset_running_stats()
        m.momentum = None  # cumulative average over all batches
    model.train()
    for xb, _ in batches(x, torch.zeros(len(x)), cfg.eval_batch_size, device):
        model(xb)
    for m, momentum in zip(norms, saved):
        m.momentum = momentum
    model.eval()
    return True


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


def training_prior(arrays: Mapping[str, torch.Tensor], cfg: ExperimentConfig, num_classes: int) -> torch.Tensor:
    """The label distribution the pool was trained under, as EM needs it: the federation's
    sample-weighted mean prediction on the training clients' data (``coldstart_prior:
    predicted``, shipped in the cold-start package) or uniform."""
    if cfg.coldstart_prior == "predicted" and TRAIN_PRIOR in arrays:
        return as_prior(arrays[TRAIN_PRIOR])
    return torch.full((num_classes,), 1.0 / num_classes)


def coldstart_evaluate(arrays: Mapping[str, torch.Tensor], data: ClientData, cfg: ExperimentConfig,
                       num_classes: int, device: torch.device) -> dict[str, Any]:
    """A new client's model from the pool, adapted with unlabeled data only (its local
    train split with labels unused), scored on its local test split. Reports the
    configured result and each adaptation on and off."""
    model = FedCoEModel(cfg, num_classes, list(range(cfg.num_experts)), with_private=False)
    model.load_shared(arrays)
    model.to(device).eval()
    unlabeled = data.train_x if len(data.train_x) else data.test_x
    uniform = torch.full((num_classes,), 1.0 / num_classes)
    train_prior = training_prior(arrays, cfg, num_classes)

    def gate_row() -> torch.Tensor:
        return predict_probs(model.gate_probs, unlabeled, cfg, device).mean(0)

    def scores(em_priors: dict[str, torch.Tensor | None]) -> dict[str, float]:
        """Accuracy of the model as it is now, with no EM and with EM from each training prior:
        the model's predictions are computed once, whatever the number of variants."""
        test_probs = predict_probs(lambda x: model.mixture(x)[0], data.test_x, cfg, device)
        pool_probs = predict_probs(lambda x: model.mixture(x)[0], unlabeled, cfg, device)
        out = {}
        for name, em_prior in em_priors.items():
            probs = test_probs if em_prior is None else prior_correct(
                test_probs, em_label_prior(pool_probs, em_prior), em_prior)
            out[name] = float((probs.argmax(1) == data.test_y).float().mean())
        return out

    row = gate_row()
    if cfg.coldstart_top_m and cfg.experts_per_client < cfg.num_experts:
        model.expert_ids = expert_set(row.numpy(), cfg.experts_per_client, cfg.num_experts)
    variants: dict[str, torch.Tensor | None] = {"plain": None, "em": train_prior}
    if not torch.equal(train_prior, uniform):
        variants["em_uniform"] = uniform
    adapted = scores(variants)
    adabn = reestimate_batchnorm(model, unlabeled, cfg, device)
    if adabn:
        adapted.update(scores({"adabn": None, "adabn_em": train_prior}))
    out: dict[str, Any] = {"coldstart_accuracy_" + name: acc for name, acc in adapted.items()}
    parts = (["adabn"] if cfg.coldstart_adabn and adabn else []) + (["em"] if cfg.coldstart_em else [])
    out["coldstart_accuracy"] = out["coldstart_accuracy_" + ("_".join(parts) or "plain")]
    out["routing_row"] = [float(v) for v in row]
    out["num_test"] = int(len(data.test_y))
    return out


# ============================================================== the method
class FedCoE(Algorithm):
    name = "fedcoe"
    has_global_model = True

    def init_state(self, cfg: ExperimentConfig, num_classes: int) -> ServerState:
        arrays = prefixed(GATE, state_of(seeded_init(lambda: build_gate(cfg, num_classes), cfg.seed)))
        part = "head" if cfg.shared_trunk else "all"
        if cfg.shared_trunk:
            trunk = seeded_init(lambda: build_expert(cfg, num_classes), cfg.seed * 1000)
            arrays.update(prefixed(TRUNK, network_part(trunk, "trunk")))
        for k in range(cfg.num_experts):
            # independent initialisations: the experts must be able to diverge
            expert = seeded_init(lambda: build_expert(cfg, num_classes), cfg.seed * 1000 + k + 1)
            arrays.update(prefixed(expert_prefix(k), network_part(expert, part)))
        extra = {
            "correlation": np.full((cfg.num_clients, cfg.num_experts), 1.0 / cfg.num_experts),
            "correlation_known": np.zeros(cfg.num_clients, dtype=bool),
            "train_prior": np.full(num_classes, 1.0 / num_classes),
        }
        return ServerState(arrays, extra)

    def client_experts(self, state: ServerState, cfg: ExperimentConfig, client_index: int) -> list[int]:
        known = 0 <= client_index < cfg.num_clients and bool(state.extra["correlation_known"][client_index])
        row = state.extra["correlation"][client_index] if known else None
        return expert_set(row, cfg.experts_per_client, cfg.num_experts)

    def _payload(self, state: ServerState, ids: list[int]) -> tuple[Arrays, dict[str, Any]]:
        """The gate and only the experts in ``ids``: a client never downloads the rest."""
        prefixes = (GATE, TRUNK) + tuple(expert_prefix(k) for k in ids)
        return {k: v for k, v in state.arrays.items() if k.startswith(prefixes)}, {"expert_ids": ids}

    def train_payload(self, state, cfg, client_index, server_round):
        arrays, config = self._payload(state, self.client_experts(state, cfg, client_index))
        return self._with_prior(arrays, state, cfg.local_prior_correction), config

    def coldstart_payload(self, state, cfg, client_parts=None):
        arrays, config = self._payload(state, list(range(cfg.num_experts)))
        return self._with_prior(arrays, state, cfg.coldstart_prior == "predicted"), config

    @staticmethod
    def _with_prior(arrays: Arrays, state: ServerState, wanted: bool) -> Arrays:
        """The federation's predicted training prior (num_classes floats), read-only for clients."""
        if wanted and "train_prior" in state.extra:
            arrays[TRAIN_PRIOR] = torch.as_tensor(state.extra["train_prior"], dtype=torch.float32)
        return arrays

    def expected_upload(self, payload, config, cfg):
        expected = super().expected_upload(payload, config, cfg)
        expected.pop(TRAIN_PRIOR, None)  # sent to the client, never returned
        expected[CORRELATION] = ((cfg.num_experts,), torch.float32)
        num_classes = next(v.shape[0] for k, v in payload.items() if k.endswith("classifier.bias"))
        expected[CLASS_MARGINAL] = ((num_classes,), torch.float32)
        return expected

    def aggregate(self, state: ServerState, replies: list[Reply], cfg, server_round):
        pool = [unprefixed(expert_prefix(k), state.arrays) for k in range(cfg.num_experts)]
        contributions = []
        correlation = state.extra["correlation"].copy()
        known = state.extra["correlation_known"].copy()
        for r in replies:
            row = r.arrays[CORRELATION].double().numpy()
            correlation[r.client_index], known[r.client_index] = row, True
            experts = {k: unprefixed(expert_prefix(k), r.arrays) for k in range(cfg.num_experts)
                       if any(key.startswith(expert_prefix(k)) for key in r.arrays)}
            contributions.append((experts, row, r.num_samples))
        new_pool, max_share = aggregate_pool(pool, contributions, cfg)
        n = [r.num_samples for r in replies]
        arrays = prefixed(GATE, weighted_average([unprefixed(GATE, r.arrays) for r in replies], n))
        if cfg.shared_trunk:  # every client trains the trunk: FedAvg (or the robust rule)
            arrays.update(prefixed(TRUNK, weighted_average([unprefixed(TRUNK, r.arrays) for r in replies], n,
                                                           cfg.robust_aggregation, cfg.trim_fraction)))
        for k, expert in enumerate(new_pool):
            arrays.update(prefixed(expert_prefix(k), expert))
        marginals = np.stack([r.arrays[CLASS_MARGINAL].double().numpy() for r in replies])
        train_prior = np.asarray(n, dtype=np.float64) @ marginals / sum(n)
        diagnostics = {"expert_max_client_share": [(-1.0 if s is None else s) for s in max_share],
                       **routing_diagnostics(correlation[known])}
        extra = {"correlation": correlation, "correlation_known": known, "train_prior": train_prior}
        return ServerState(arrays, extra), diagnostics

    def global_diagnostics(self, state, cfg, num_classes, device, x, y):
        """Each expert alone (with the trunk when shared) on the global test set."""
        model = FedCoEModel(cfg, num_classes, list(range(cfg.num_experts)), with_private=False)
        model.load_shared(state.arrays)
        model.to(device).eval()
        other = cfg.replace(global_balanced=not cfg.global_balanced)  # the global model's other variant
        key = "global_accuracy_" + ("raw" if cfg.global_balanced else "balanced")
        return {"expert_global_accuracy": [accuracy(model.expert_alone(k), x, y, cfg, device)
                                           for k in range(cfg.num_experts)],
                key: accuracy(self.global_predict(state, other, num_classes, device), x, y, cfg, device)}

    def global_predict(self, state, cfg, num_classes, device):
        model = FedCoEModel(cfg, num_classes, list(range(cfg.num_experts)), with_private=False)
        model.load_shared(state.arrays)
        model.to(device).eval()
        top = cfg.experts_per_client if cfg.experts_per_client < cfg.num_experts else None
        if not cfg.global_balanced:
            return lambda x: model.mixture(x, per_sample_top=top)[0]
        prior = as_prior(state.extra.get("train_prior", np.full(num_classes, 1.0 / num_classes))).to(device)
        uniform = torch.full_like(prior, 1.0 / num_classes)
        return lambda x: prior_correct(model.mixture(x, per_sample_top=top)[0], uniform, prior)

    # ---- client side
    def client_train(self, arrays, config, private, data, cfg, num_classes, device, seed):
        ids = [int(k) for k in config["expert_ids"]]
        model = build_client_model(cfg, num_classes, arrays, ids, private, device, private_seed=seed)
        if model.prior_correction:
            model.set_local_prior(data.train_y, num_classes)
        shared = model.shared_modules()
        anchors = [{k: v.detach().clone() for k, v in m.named_parameters()} for m in shared]
        has_local = model.local is not None

        def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            p, mix, local = model.parts(x)
            loss = nll_of_probs(p, y)
            if has_local and cfg.aux_weight > 0:
                loss = loss + cfg.aux_weight * nll_of_probs(mix, y)  # keeps the pool trained
            if local is not None and cfg.local_loss_weight > 0:  # the local part a classifier on its own
                loss = loss + cfg.local_loss_weight * nll_of_probs(local, y)
            if cfg.load_balance_weight > 0:
                loss = loss + cfg.load_balance_weight * model.load_balance_loss()
            if cfg.prox_mu > 0:
                loss = loss + cfg.prox_mu / 2 * proximal_term(shared, anchors)
            return loss

        loss = run_local_epochs(list(model.parameters()), [model], data, cfg, device, seed, loss_fn)
        model.eval()
        row = predict_probs(model.gate_probs, data.train_x, cfg, device).mean(0)
        upload = model.shared_state()
        upload[CORRELATION] = row.float()
        # mean predicted class probabilities of the global mixture (no labels): the server's
        # sample-weighted mean is the training prior the cold-start EM correction needs
        upload[CLASS_MARGINAL] = predict_probs(lambda x: model.mixture(x)[0], data.train_x, cfg, device
                                               ).mean(0).float()
        return upload, (model.private_state() or None), {"num_samples": data.num_train, "train_loss": loss}

    def client_predict(self, arrays, config, private, cfg, num_classes, device):
        ids = [int(k) for k in config["expert_ids"]]
        model = build_client_model(cfg, num_classes, arrays, ids, private, device, private_seed=0)
        model.eval()
        if not private:  # never trained here: no local part yet, the global mixture alone
            return lambda x: model.mixture(x)[0]
        return lambda x: model(x)[0]

    def client_coldstart(self, arrays, config, data, cfg, num_classes, device):
        return coldstart_evaluate(arrays, data, cfg, num_classes, device)

