"""FedCoE (Dai et al. 2026) as the server and client see it: the hooks of ``Algorithm``.

Level 1 (global): the server's expert pool {theta_k} and one shared gate phi;
y(x) = sum_k g_k(x) softmax(f_k(x)) over the client's expert set.
Level 2 (local): a private local part l_i and local gate beta_i(x);
p_i(y|x) = (1 - beta_i(x)) y(x) + beta_i(x) softmax(l_i(x)).
Clients upload their trained experts, gate and correlation row (mean gate
probabilities over their training data); the server aggregates each expert with
smoothed, capped correlation weights and the gate with sample weights.
With ``shared_trunk`` the experts share one trunk (the convolutions, averaged with
sample weights like FedAvg) and differ in their heads (the rest of the network).
The levers behind each config key, and the choices where the paper is silent, are in
docs/algorithms/fedcoe.md."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F

from ...config import ExperimentConfig
from ..base import Algorithm, ClientStep, Predictor, Reply, ServerState
from ..training import (Arrays, LocalTask, Trained, module_anchors, nll_of_probs, predict_probs, prefixed,
                        proximal_term, seeded_init, state_of, unprefixed, weighted_average)
from .aggregation import aggregate_pool, class_groups, expert_set, routing_diagnostics
from ...data import DataError, load_global_test
from ..adaptation import calibration_of, prior_of
from ..specialisation import KEYS as SPECIALISATION_KEYS
from ..specialisation import plot_specialisation, specialisation
from .coldstart import NewClientModel, adapt_new_client, coldstart_evaluate, pool_model
from .model import (CLASS_COOCCURRENCE, CLASS_MARGINAL, CORRELATION, GATE, TRAIN_PRIOR, TRUNK, FedCoEModel, build_client_model,
                    build_gate, expert_prefix, network_part, pool_network, routed_mixture, split_pool_outputs,
                    trunk_part)
from .params import FedCoEParams, experts_per_client
from .plots import plot_correlation


def local_loss(model: FedCoEModel, x: torch.Tensor, y: torch.Tensor, start: Mapping[str, torch.Tensor], *,
               cfg: ExperimentConfig, assigned: int | None = None, class_expert: tuple[int, ...] = ()
               ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """NLL of the personalised prediction, plus (docs/algorithms/fedcoe.md) the global
    mixture's own NLL, the local part's own NLL, the routers' load balance, the proximal
    term of the shared parts to where they started and, with ``assignment_weight``, the gate's
    routing target: the client's ``assigned`` expert, or each image's (``routing_targets``;
    ``class_expert``: the server's class -> expert map of ``class_groups``)."""
    p, mix, local, gate = model.parts(x)
    loss = nll_of_probs(p, y)
    if model.local is not None and cfg.aux_weight > 0:
        loss = loss + cfg.aux_weight * nll_of_probs(mix, y)  # keeps the pool trained
    if local is not None and cfg.local_loss_weight > 0:  # the local part a classifier on its own
        loss = loss + cfg.local_loss_weight * nll_of_probs(local, y)
    if cfg.load_balance_weight > 0:
        loss = loss + cfg.load_balance_weight * model.load_balance_loss()
    if cfg.prox_mu > 0:
        shared = model.shared_modules()
        loss = loss + cfg.prox_mu / 2 * proximal_term(shared, module_anchors(model, shared, start))
    if assigned is not None:  # route this client's images to its assigned expert
        loss = loss + cfg.assignment_weight * nll_of_probs(gate, torch.full_like(y, assigned))
    elif cfg.assignment_weight > 0 and cfg.assignment_level != "client":  # a target per image
        targets = routing_targets(model, x, y, cfg.assignment_level, class_expert)
        loss = loss + cfg.assignment_weight * nll_of_probs(gate, targets)
    return loss, {}


class FedCoE(Algorithm):
    name = "fedcoe"
    Params = FedCoEParams
    has_global_model = True
    can_join_training = True  # add_client gives the new client its own correlation row
    diagnostic_keys = ("expert_usage_entropy", "correlation_row_entropy", "correlation_spread",
                       "expert_max_client_share", "expert_global_accuracy") + SPECIALISATION_KEYS

    def init_state(self, cfg: ExperimentConfig, num_classes: int) -> ServerState:
        arrays = prefixed(GATE, state_of(seeded_init(lambda: build_gate(cfg, num_classes), cfg.seed)))
        part = "head" if cfg.shared_trunk else "all"
        if cfg.shared_trunk:
            trunk = seeded_init(lambda: pool_network(cfg, num_classes), cfg.seed * 1000)
            arrays.update(prefixed(TRUNK, network_part(trunk, trunk_part(cfg))))
        for k in range(cfg.num_experts):
            # independent initialisations: the experts must be able to diverge
            expert = seeded_init(lambda: pool_network(cfg, num_classes), cfg.seed * 1000 + k + 1)
            arrays.update(prefixed(expert_prefix(k), network_part(expert, part)))
        extra = {
            "correlation": np.full((cfg.num_clients, cfg.num_experts), 1.0 / cfg.num_experts),
            "correlation_known": np.zeros(cfg.num_clients, dtype=bool),
            "train_prior": np.full(num_classes, 1.0 / num_classes),
        }
        if uses_class_groups(cfg):  # until the first aggregation: class c to expert c mod K
            extra["class_expert"] = np.arange(num_classes) % cfg.num_experts
        return ServerState(arrays, extra)

    def client_experts(self, state: ServerState, cfg: ExperimentConfig, client_index: int) -> list[int]:
        known = 0 <= client_index < cfg.num_clients and bool(state.extra["correlation_known"][client_index])
        row = state.extra["correlation"][client_index] if known else None
        return expert_set(row, experts_per_client(cfg), cfg.num_experts)

    def _payload(self, state: ServerState, ids: list[int]) -> tuple[Arrays, dict[str, Any]]:
        """The gate and only the experts in ``ids``: a client never downloads the rest."""
        prefixes = (GATE, TRUNK) + tuple(expert_prefix(k) for k in ids)
        return {k: v for k, v in state.arrays.items() if k.startswith(prefixes)}, {"expert_ids": ids}

    def train_payload(self, state, cfg, client_index, server_round):
        arrays, config = self._payload(state, self.client_experts(state, cfg, client_index))
        if uses_class_groups(cfg):
            config["class_expert"] = [int(k) for k in state.extra["class_expert"]]
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
        if uses_class_groups(cfg):
            expected[CLASS_COOCCURRENCE] = ((num_classes, num_classes), torch.float32)
        return expected

    def validate_upload(self, arrays: Arrays, cfg: ExperimentConfig) -> str | None:
        for key in (CORRELATION, CLASS_MARGINAL, CLASS_COOCCURRENCE):
            row = arrays.get(key)
            if row is not None and ((row < 0).any() or abs(float(row.sum()) - 1.0) > 1e-3):
                return f"{key} row is not a probability vector (sum {float(row.sum()):.4f})"
        return None

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
        if uses_class_groups(cfg):
            joint = sum(w * r.arrays[CLASS_COOCCURRENCE].double().numpy() for w, r in zip(n, replies)) / sum(n)
            before = state.extra.get("class_expert")
            extra["class_expert"] = class_groups(joint, cfg.num_experts, before, cfg.class_groups_restarts)
            # the map each round, and how many classes changed expert (churn the gate must relearn)
            diagnostics["class_expert"] = [int(k) for k in extra["class_expert"]]
            diagnostics["class_groups_moved"] = int((np.asarray(before) != extra["class_expert"]).sum()) \
                if before is not None and len(before) == len(extra["class_expert"]) else 0
        return ServerState(arrays, extra), diagnostics

    def add_client(self, state: ServerState, client_index: int, cfg: ExperimentConfig) -> ServerState:
        """Correlation rows for clients up to ``client_index`` (uniform and unknown until it trains)."""
        corr, known = state.extra["correlation"], state.extra["correlation_known"]
        add = client_index + 1 - len(corr)
        if add <= 0:
            return state
        k = cfg.num_experts
        extra = {**state.extra, "correlation": np.concatenate([corr, np.full((add, k), 1.0 / k)]),
                 "correlation_known": np.concatenate([known, np.zeros(add, dtype=bool)])}
        return ServerState(state.arrays, extra)

    def write_plots(self, state: ServerState, cfg: ExperimentConfig, run_dir: Path) -> list[Path]:
        paths = [plot_correlation(state.extra["correlation"], state.extra["correlation_known"],
                                  run_dir / "correlation.png")]
        try:
            x, y = load_global_test(cfg)
        except DataError:  # a server without the global test set: no specialisation picture
            return paths
        num_classes = int(state.extra["train_prior"].shape[0])
        found = self.specialisation_of(state, cfg, num_classes, torch.device("cpu"), x, y)
        return paths + [plot_specialisation(found, run_dir / "specialisation.png")]

    def specialisation_of(self, state: ServerState, cfg: ExperimentConfig, num_classes: int, device: torch.device,
                          x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
        """The pool's specialisation on (x, y) (``algorithms.specialisation``): the gate's top
        expert against the class, each expert alone per class, expert against client (the rows
        of C of the clients that trained), and each expert's accuracy alone."""
        model = FedCoEModel(cfg, num_classes, list(range(cfg.num_experts)), with_private=False)
        model.load_shared(state.arrays)
        model.to(device).eval()
        gate, experts, shared = split_pool_outputs(predict_probs(model.pool_outputs, x, cfg, device),
                                                   cfg.num_experts, num_classes)
        rows = state.extra["correlation"][state.extra["correlation_known"]]
        out = {"expert_global_accuracy": [float((p.argmax(1) == y).float().mean()) for p in experts],
               **specialisation(gate, experts, y, num_classes, rows)}
        if uses_class_groups(cfg) and "class_expert" in state.extra:
            out.update(class_map_routing(state.extra["class_expert"], gate, experts, y, cfg.shared_expert_weight,
                                         shared))
        return out

    def describe(self, cfg: ExperimentConfig) -> str:
        return f"model={cfg.model} experts={cfg.num_experts} per client={experts_per_client(cfg)}"

    def routing_row_size(self, cfg: ExperimentConfig) -> int | None:
        return cfg.num_experts

    def onboard(self, step: ClientStep, unlabeled: torch.Tensor) -> tuple[dict[str, Any], list[float] | None]:
        new = adapt_new_client(step.arrays, unlabeled, step.cfg, step.num_classes, step.device, prior_of(step.config),
                               calibration_of(step.config))
        bundle = {"expert_ids": list(new.model.expert_ids),
                  "arrays": {k: v.detach().cpu().clone() for k, v in new.model.shared_state().items()},
                  "adabn": new.adabn, "prior": None if new.prior is None else new.prior.cpu(),
                  "train_prior": new.train_prior, "temperature": new.temperature}
        return bundle, [float(v) for v in new.row]

    def bundle_predictor(self, bundle: Mapping[str, Any], cfg: ExperimentConfig, num_classes: int,
                         device: torch.device) -> Predictor:
        model = FedCoEModel(cfg, num_classes, [int(k) for k in bundle["expert_ids"]], with_private=False)
        model.load_shared(bundle["arrays"])
        model.to(device).eval()
        return NewClientModel(model, torch.zeros(0), bool(bundle.get("adabn")), bundle.get("prior"),
                              bundle["train_prior"], float(bundle.get("temperature", 1.0))).predict

    def global_diagnostics(self, state, cfg, num_classes, device, x, y):
        """Each expert alone (with the trunk when shared) on the global test set and the pool's
        specialisation."""
        return self.specialisation_of(state, cfg, num_classes, device, x, y)

    def global_predict(self, state, cfg, num_classes, device):
        """The mixture over all K experts (each image's top m when m < K), unadapted: the
        balanced variant is the evaluator's, with the federation's predicted prior of this very
        model, as for every method with a global model."""
        model = FedCoEModel(cfg, num_classes, list(range(cfg.num_experts)), with_private=False)
        model.load_shared(state.arrays)
        model.to(device).eval()
        top = experts_per_client(cfg) if experts_per_client(cfg) < cfg.num_experts else None
        return lambda x: model.mixture(x, per_sample_top=top)[0]

    # ---- client side
    def local_task(self, step: ClientStep) -> LocalTask:
        config, private, data, cfg, num_classes, device = (
            step.config, step.private, step.data, step.cfg, step.num_classes, step.device)
        ids = [int(k) for k in config["expert_ids"]]
        model = build_client_model(cfg, num_classes, step.arrays, ids, private, device, private_seed=step.seed)
        if model.prior_correction:
            model.set_local_prior(data.train_y, num_classes)
        received = None  # the pool's confusions, before local training moves the mixture
        if uses_class_groups(cfg) and cfg.class_groups_from == "received":
            received = cooccurrence(predicted_mixture(model, data.train_x, cfg, device))

        def finish(model: FedCoEModel, trained: Trained) -> tuple[Arrays, Arrays | None, dict[str, Any]]:
            model.eval()
            row = predict_probs(model.gate_probs, data.train_x, cfg, device).mean(0)
            upload = model.shared_state()
            upload[CORRELATION] = row.float()
            # mean predicted class probabilities of the global mixture (no labels): the server's
            # sample-weighted mean is the training prior the cold-start EM correction needs
            probs = predicted_mixture(model, data.train_x, cfg, device)
            upload[CLASS_MARGINAL] = probs.mean(0).float()
            if uses_class_groups(cfg):
                upload[CLASS_COOCCURRENCE] = cooccurrence(probs) if received is None else received
            return upload, (model.private_state() or None), {"num_samples": data.num_train,
                                                             "train_loss": trained.mean_loss}

        assigned = assigned_expert(model, data, cfg, device) \
            if cfg.assignment_weight > 0 and cfg.assignment_level == "client" else None
        class_expert = tuple(int(k) for k in config["class_expert"]) if uses_class_groups(cfg) else ()
        # the expert set names the parameters (expert.<k>.*) and picks the gate's columns
        return LocalTask(model, partial(local_loss, cfg=cfg, assigned=assigned, class_expert=class_expert),
                         finish, data, step.seed,
                         signature=tuple(ids), uses_start=cfg.prox_mu > 0)

    def client_predict(self, step: ClientStep) -> Predictor:
        arrays, config, private, cfg, num_classes, device = (
            step.arrays, step.config, step.private, step.cfg, step.num_classes, step.device)
        ids = [int(k) for k in config["expert_ids"]]
        model = build_client_model(cfg, num_classes, arrays, ids, private, device, private_seed=0)
        model.eval()
        if not private:  # never trained here: no local part yet, the global mixture alone
            return lambda x: model.mixture(x)[0]
        return lambda x: model(x)[0]

    def new_client_model(self, step: ClientStep) -> tuple[Predictor, list[torch.nn.Module]]:
        model = pool_model(step.arrays, step.cfg, step.num_classes, step.device)
        return (lambda x: model.mixture(x)[0]), [model]

    def client_coldstart(self, step: ClientStep) -> dict[str, Any]:
        arrays, data, cfg, num_classes, device = step.arrays, step.data, step.cfg, step.num_classes, step.device
        return coldstart_evaluate(arrays, data, cfg, num_classes, device, prior_of(step.config),
                                  calibration_of(step.config))


@torch.no_grad()
def predicted_mixture(model: FedCoEModel, x: torch.Tensor, cfg: ExperimentConfig, device: torch.device) -> torch.Tensor:
    """The global mixture's class probabilities on ``x`` (eval mode; the model is left as it was)."""
    was_training = model.training
    model.eval()
    probs = predict_probs(lambda b: model.mixture(b)[0], x, cfg, device)
    model.train(was_training)
    return probs


def cooccurrence(probs: torch.Tensor) -> torch.Tensor:
    """E[p p^T] over the images: which classes the predictions confuse (no labels; C x C)."""
    return (probs.T @ probs / max(len(probs), 1)).float()


@torch.no_grad()
def assigned_expert(model: FedCoEModel, data: Any, cfg: ExperimentConfig, device: torch.device) -> int:
    """IFCA's cluster identity (Ghosh et al. 2020): the expert of the client's set whose own
    prediction has the lowest cross-entropy on the client's training data."""
    model.eval()
    losses = {k: float(nll_of_probs(predict_probs(model.expert_alone(k), data.train_x, cfg, device), data.train_y))
              for k in model.expert_ids}
    return min(losses, key=losses.__getitem__)


def class_map_routing(class_expert: Any, gate: torch.Tensor, experts: list[torch.Tensor], y: torch.Tensor,
                      shared_weight: float, shared: torch.Tensor | None) -> dict[str, float]:
    """How far the gate's routing holds the mixture back: ``gate_routing_accuracy``, the share
    of test images whose top expert is their class's expert in the server's class map, and
    ``oracle_routing_global_accuracy``, the unadapted global mixture with every image sent to
    that expert alone (its label used: an upper bound for a better gate, never a model). With a
    shared expert also ``shared_expert_global_accuracy`` (it alone: what the routed experts add
    to it) and ``shared_routing_global_accuracy``, the mixture routed label-free by the shared
    expert's class probabilities summed over each expert's classes in the map (a gate that is
    the pool's own classifier)."""
    class_expert = torch.as_tensor(np.asarray(class_expert), dtype=torch.long)
    y = y.long().cpu()
    target = class_expert[y]
    experts = [p.cpu() for p in experts]
    shared = None if shared is None else shared.cpu()

    def mixture_accuracy(weights: torch.Tensor) -> float:  # weights: images x K
        return float((routed_mixture(weights, experts, shared, shared_weight).argmax(1) == y).float().mean())

    out = {"gate_routing_accuracy": float((gate.cpu().argmax(1) == target).float().mean()),
           "oracle_routing_global_accuracy": mixture_accuracy(F.one_hot(target, len(experts)).float())}
    if shared is not None:
        out["shared_expert_global_accuracy"] = float((shared.argmax(1) == y).float().mean())
        out["shared_routing_global_accuracy"] = mixture_accuracy(shared @ F.one_hot(class_expert, len(experts)).float())
    return out


def uses_class_groups(cfg: ExperimentConfig) -> bool:
    return cfg.assignment_weight > 0 and cfg.assignment_level == "class_groups"


@torch.no_grad()
def routing_targets(model: FedCoEModel, x: torch.Tensor, y: torch.Tensor, level: str = "sample",
                    class_expert: tuple[int, ...] = ()) -> torch.Tensor:
    """Each image's routing target for the gate, among the client's experts. ``sample`` (hard
    EM): the expert whose own prediction gives the image's label the highest probability.
    ``class``: every image of a class goes to one expert, chosen by the class's mean
    log-probability in the batch, each expert taking at most its equal share of the batch's
    classes (expert capacity), so that an expert better at everything cannot take every class.
    ``label_split``: class c to expert c mod E, a fixed split of the label space, the same on
    every client and round. ``class_groups``: class c to ``class_expert[c]`` (of the pool, which
    the gate spans whatever the client's set), the server's grouping of confusable classes."""
    if level == "class_groups":
        return torch.as_tensor(class_expert, device=y.device)[y]
    ids = torch.as_tensor(model.expert_ids, device=x.device)
    if level == "label_split":
        return ids[y % len(ids)]
    probs, _ = model.experts_alone(x)
    label_logp = torch.stack([p.gather(1, y[:, None]).squeeze(1) for p in probs], 1).clamp_min(1e-12).log()
    if level == "sample":
        return ids[label_logp.argmax(1)]
    return ids[balanced_class_assignment(label_logp, y, probs[0].shape[1])[y]]


def balanced_class_assignment(label_logp: torch.Tensor, y: torch.Tensor, num_classes: int) -> torch.Tensor:
    """Greedy capacity-limited assignment of the batch's classes to experts: repeatedly the open
    (class, expert) pair of highest mean log-probability (``label_logp``: images x experts),
    each expert taking at most ceil(classes present / experts). Tensor operations only, no branch
    on values, so it runs per client under ``torch.func.vmap``. Returns each class's expert
    index; a class absent from the batch gets one too, unused."""
    num_experts = label_logp.shape[1]
    classes = torch.arange(num_classes, device=y.device)
    experts = torch.arange(num_experts, device=y.device)
    onehot = (y[:, None] == classes).to(label_logp.dtype)
    present = onehot.sum(0) > 0
    # (classes, experts) mean log-probability, <= 0 where present
    score = (onehot.T @ label_logp) / onehot.sum(0).clamp_min(1)[:, None]
    lowest = torch.finfo(score.dtype).min
    # absent classes last: below every present class, above the pairs a step rules out
    score = torch.where(present[:, None], score, torch.full_like(score, lowest / 2))
    capacity = torch.ceil(present.sum() / num_experts)
    taken = torch.zeros(num_experts, device=y.device)
    is_open = torch.ones(num_classes, dtype=torch.bool, device=y.device)
    choice = torch.zeros(num_classes, dtype=torch.long, device=y.device)
    for _ in range(num_classes):
        room = (taken < capacity) | ~(is_open & present).any()  # once only absent classes are left: any
        allowed = is_open[:, None] & room[None, :]
        masked = torch.where(allowed, score, torch.full_like(score, lowest))
        flat = masked.flatten().argmax()
        pick = classes == flat // num_experts
        choice = torch.where(pick, flat % num_experts, choice)
        taken = taken + ((experts == flat % num_experts) & (pick & present).any()).to(taken.dtype)
        is_open = is_open & ~pick
    return choice
