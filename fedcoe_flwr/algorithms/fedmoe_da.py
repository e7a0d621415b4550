"""FedMoE-DA (Zhan et al., Algorithm 1, Eqs. 5-11), as docs/algorithms/fedmoe_da.md describes it.

Model (Sec. III-B, V-A): the SmallCNN split into an embedding network Theta (the first
conv layer with its ReLU and max-pool), a gate Pi in R^{n x K} on the flattened embedding
(G(x) = softmax(x . Pi), Eq. 1, a bias-free linear map), and K experts, each the rest of
the CNN (conv2 + fc1 + classifier). Each sample is routed to its top-1 expert.

Round t (Algorithm 1):
1. every client trains Theta_i, Pi_i and its K experts for E local epochs;
2. uploads Theta_i; the server averages them plainly, 1/N sum_i Theta_i (Eq. 5; the
   ``robust_aggregation`` option replaces this mean when set);
3. if t mod I == 1 (we use (t - 1) mod I == 0, which is the same for I > 1 and means
   "every round" for I = 1) the client also uploads Pi_i; the server stacks all proxies
   (the K columns of every Pi_i, Eq. 6), computes their cosine similarities (Eq. 8),
   keeps for every expert its P + 1 most similar experts S_i (itself included, Eq. 9)
   and builds the sparse aggregation matrix a_ij = softmax_{S_i}(r_ij / tau) (Eq. 10);
4. every expert is replaced by sum_j a_ij expert_j (Eq. 11), with the latest matrix the
   clients hold: the historical (stale) matrix of Sec. IV-B. A matrix computed in
   round t is first used to aggregate round t + 1's experts, exactly as in the paper,
   where clients aggregate concurrently with the server computing the new matrix.

Peer-to-peer experts through the server (Flower clients cannot reach each other):
in round t the server tells each client which of its experts other clients' rows of the
current matrix request; the client uploads exactly those under ``relay.up.<k>.``. The
server keeps one copy of each requested expert (not N x K unless every expert is
requested) and, with the next message to each client (the next round's training
payload, and the evaluation payload in between), relays the peer experts that
client's K rows need under ``relay.<owner>.<k>.``, with its rows of the matrix in the
config. The client computes Eq. 11 itself, from its own experts and the relayed ones,
before training (or before predicting, at evaluation). The Strategy counts every byte
under ``relay.`` keys (uploaded once, relayed to every client that needs it, again with
each evaluation payload) as peer-to-peer traffic. The server never computes experts.

Our choices where the paper is silent:
- Top-1 routing and the gate's gradient: the output is the chosen expert's logits
  scaled by its gate score, y = G_k*(x) E_k*(x) with k* = argmax G(x) -- Eq. 2 with all
  but the top score zeroed, the standard gate-weighted top-1 (Switch Transformer) --
  trained with cross-entropy on softmax(y). No load-balancing loss (the paper has none).
  Only the selected expert is computed for each sample.
- Initialisation: the embedding, the gate and expert k (k = 0..K-1, each its own seed)
  start from one seeded initial model shared by all clients (the initial model
  broadcast once), so expert k of different clients share an origin.
- Ties in Eq. 9: exactly P + 1 experts are kept, the expert itself first, then by
  similarity, equal similarities by lower global index. With fewer than P + 1 experts
  known in total, S_i holds all of them.
- Before the first matrix exists (round 1) experts are not aggregated (A = identity).
- Proxies of clients that have not uploaded a gate yet are left out; a client that did
  not take part in a round keeps its last gate (stale) in the proxy set.
- A row entry whose expert never reached the server (its owner failed) is dropped and
  the row renormalised over what is available; a client sampled late receives the
  latest copy held of each expert it needs.
- Partial participation: requests follow the current matrix for all rows, so a client
  may upload an expert that only an unsampled client's row asks for (counted).
- Cold start (our evaluation protocol): the shared embedding with the sample-weighted
  average of the training clients' gates and of their expert k for each k, after
  their pending Eq. 11 aggregation; top-1 routing as in training.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..config import ExperimentConfig, require
from ..models import small_cnn
from .base import Algorithm, ClientStep, Predictor, Reply, ServerState
from .training import Arrays, common_seed, expert_prefix, prefixed, run_local_epochs, seeded_init, state_of, unprefixed, weighted_average
from .fedper import SmallCNNParams

EMBEDDING = "embedding."
GATE = "gate."
GATE_KEY = GATE + "weight"
UPLOAD = "relay.up."
STORE = "store."
SIMILARITY_BLOCK = 1024  # rows of the similarity matrix computed at once (server memory)



def upload_prefix(k: int) -> str:
    return f"{UPLOAD}{k}."


def relay_prefix(owner: int, k: int) -> str:
    return f"relay.{owner}.{k}."


def store_prefix(owner: int, k: int) -> str:
    return f"{STORE}{owner}.{k}."


# ============================================================== modules
class Embedding(nn.Module):
    """Theta: the SmallCNN's first conv layer, ReLU and 2x2 max-pool."""

    def __init__(self, cfg: ExperimentConfig, num_classes: int):
        super().__init__()
        self.conv1 = small_cnn(cfg, num_classes).conv1

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.max_pool2d(F.relu(self.conv1(x)), 2)


class Expert(nn.Module):
    """Phi: the rest of the SmallCNN (conv2, fc1, classifier) on the embedding."""

    def __init__(self, cfg: ExperimentConfig, num_classes: int):
        super().__init__()
        cnn = small_cnn(cfg, num_classes)
        self.conv2, self.fc1, self.classifier = cnn.conv2, cnn.fc1, cnn.classifier

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = F.max_pool2d(F.relu(self.conv2(h)), 2)
        return self.classifier(F.relu(self.fc1(h.flatten(1))))


def embedding_dim(cfg: ExperimentConfig) -> int:
    """n: length of the flattened embedding, the gate's input."""
    side = (cfg.image_size - 4) // 2
    return int(32 * cfg.width_multiplier) * side * side



def expert_shapes(cfg: ExperimentConfig, num_classes: int) -> dict[str, tuple[int, ...]]:
    with torch.device("meta"):
        expert = Expert(cfg, num_classes)
    return {k: tuple(v.shape) for k, v in expert.state_dict().items()}


class FedMoEDAModel(nn.Module):
    def __init__(self, cfg: ExperimentConfig, num_classes: int):
        super().__init__()
        self.embedding = Embedding(cfg, num_classes)
        self.gate = nn.Linear(embedding_dim(cfg), cfg.num_experts, bias=False)  # Pi^T: rows are proxies
        self.experts = nn.ModuleList([Expert(cfg, num_classes) for _ in range(cfg.num_experts)])

    def route(self, h: torch.Tensor) -> torch.Tensor:
        """G(h) = softmax(h . Pi) (Eq. 1) on the flattened embedding."""
        return F.softmax(self.gate(h.flatten(1)), dim=1)

    def forward_with_routing(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """-> (gate-weighted logits of each sample's top-1 expert, chosen expert ids)."""
        h = self.embedding(x)
        scores = self.route(h)
        top = scores.argmax(1)
        outs, order = [], []
        for k, expert in enumerate(self.experts):
            idx = (top == k).nonzero(as_tuple=True)[0]
            if idx.numel():
                outs.append(expert(h[idx]))
                order.append(idx)
        perm = torch.cat(order)
        inverse = torch.empty_like(perm)
        inverse[perm] = torch.arange(perm.numel(), device=perm.device)
        logits = torch.cat(outs)[inverse]
        return scores.gather(1, top[:, None]) * logits, top

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_with_routing(x)[0]

    # ---- state split: shared embedding vs private gate and experts
    def load_embedding(self, arrays: Mapping[str, torch.Tensor]) -> None:
        self.embedding.load_state_dict(unprefixed(EMBEDDING, arrays))

    def load_private(self, arrays: Mapping[str, torch.Tensor]) -> None:
        self.gate.load_state_dict(unprefixed(GATE, arrays))
        for k, expert in enumerate(self.experts):
            expert.load_state_dict(unprefixed(expert_prefix(k), arrays))

    def private_state(self) -> Arrays:
        out = prefixed(GATE, state_of(self.gate))
        for k, expert in enumerate(self.experts):
            out.update(prefixed(expert_prefix(k), state_of(expert)))
        return out


def initial_model(cfg: ExperimentConfig, num_classes: int) -> FedMoEDAModel:
    """The seeded initial model every client starts from; expert k has its own seed."""
    model = seeded_init(lambda: FedMoEDAModel(cfg, num_classes), common_seed("fedmoe_da", cfg.seed, "model"))
    for k in range(cfg.num_experts):
        expert = seeded_init(lambda: Expert(cfg, num_classes), common_seed("fedmoe_da", cfg.seed, f"expert/{k}"))
        model.experts[k].load_state_dict(expert.state_dict())
    return model


# ============================================================== pure server math (Eqs. 8-10)
def aggregation_rows(proxies: np.ndarray, top_p: int, tau: float) -> tuple[np.ndarray, np.ndarray]:
    """Sparse aggregation matrix over M stacked proxies [M, n].

    r_ij = cosine similarity of proxies i and j (Eq. 8); S_i = the P + 1 largest r_ij
    with i itself first (Eq. 9); a_ij = exp(r_ij/tau) / sum_{k in S_i} exp(r_ik/tau)
    (Eq. 10). Returns (index [M, S], weight [M, S]) with S = min(P + 1, M): row i's
    nonzero columns and their weights. Computed in blocks of rows, so memory is
    O(block x M), never a dense M x M float64 matrix of all similarities at once."""
    p = np.asarray(proxies, dtype=np.float64)
    m = p.shape[0]
    s = min(top_p + 1, m)
    unit = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), 1e-12)
    index = np.empty((m, s), dtype=np.int64)
    weight = np.empty((m, s), dtype=np.float64)
    for start in range(0, m, SIMILARITY_BLOCK):
        rows = np.arange(start, min(start + SIMILARITY_BLOCK, m))
        r = unit[rows] @ unit.T
        r[np.arange(len(rows)), rows] = 1.0  # a proxy's similarity with itself
        key = -np.round(r, 12)  # equal up to rounding noise counts as a tie
        key[np.arange(len(rows)), rows] = -np.inf  # itself first, whatever the ties
        top = np.argsort(key, axis=1, kind="stable")[:, :s]
        sims = np.take_along_axis(r, top, axis=1) / tau
        w = np.exp(sims - sims.max(1, keepdims=True))
        index[rows], weight[rows] = top, w / w.sum(1, keepdims=True)
    return index, weight


def dense_matrix(index: np.ndarray, weight: np.ndarray, size: int) -> np.ndarray:
    """A as a dense [size, size] matrix (tests and diagnostics; -1 entries are empty)."""
    a = np.zeros((size, size))
    for i in range(index.shape[0]):
        for j, w in zip(index[i], weight[i]):
            if j >= 0:
                a[i, j] += w
    return a


def build_matrix(gates: np.ndarray, known: np.ndarray, top_p: int, tau: float
                 ) -> tuple[np.ndarray, np.ndarray]:
    """The aggregation matrix over all N*K experts (global index owner*K + k) from the
    clients' gates [N, K, n]. Experts of clients with no known gate get identity rows
    and are nobody's candidates."""
    n_clients, k_experts, _ = gates.shape
    total = n_clients * k_experts
    s = min(top_p + 1, total)
    index = np.full((total, s), -1, dtype=np.int64)
    weight = np.zeros((total, s))
    index[:, 0] = np.arange(total)
    weight[:, 0] = 1.0
    clients = np.flatnonzero(known)
    if len(clients) == 0:
        return index, weight
    ids = (clients[:, None] * k_experts + np.arange(k_experts)[None]).reshape(-1)  # global ids, stacked order
    sub_index, sub_weight = aggregation_rows(gates[clients].reshape(len(ids), -1), top_p, tau)
    width = sub_index.shape[1]
    index[ids] = -1
    weight[ids] = 0.0
    index[ids, :width] = ids[sub_index]
    weight[ids, :width] = sub_weight
    return index, weight


def requested_experts(index: np.ndarray, client: int, num_experts: int) -> list[int]:
    """Which of ``client``'s experts appear in other clients' rows (must be sent)."""
    owners_of_rows = np.arange(index.shape[0]) // num_experts
    cols = index[owners_of_rows != client]
    cols = cols[cols >= 0]
    return sorted({int(c % num_experts) for c in cols if c // num_experts == client})


def aggregate_experts(own: list[Mapping[str, torch.Tensor]], relayed: Mapping[tuple[int, int], Mapping[str, torch.Tensor]],
                      client: int, index: list[int], weight: list[float], num_experts: int) -> list[Arrays]:
    """Eq. 11 for one client's K experts: expert_k <- sum_{j in S_k} a_kj expert_j, with
    its own experts (``own``) and peers' experts relayed by the server, all taken
    before this aggregation. ``index``/``weight``: K rows, flattened, -1 = empty."""
    width = len(index) // num_experts
    out = []
    for k in range(num_experts):
        acc: dict[str, torch.Tensor] = {}
        for j, w in zip(index[k * width:(k + 1) * width], weight[k * width:(k + 1) * width]):
            if j < 0:
                continue
            owner, kk = divmod(int(j), num_experts)
            src = own[kk] if owner == client else relayed[(owner, kk)]
            for key, v in src.items():
                acc[key] = acc.get(key, 0.0) + float(w) * v.to(torch.float64)
        out.append({key: v.to(own[k][key].dtype) for key, v in acc.items()})
    return out


# ============================================================== client helpers
def relayed_experts(arrays: Mapping[str, torch.Tensor]) -> dict[tuple[int, int], Arrays]:
    out: dict[tuple[int, int], Arrays] = {}
    for key, v in arrays.items():
        if key.startswith("relay.") and not key.startswith(UPLOAD):
            _, owner, k, name = key.split(".", 3)
            out.setdefault((int(owner), int(k)), {})[name] = v
    return out


def client_model(cfg: ExperimentConfig, num_classes: int, arrays: Mapping[str, torch.Tensor],
                 config: Mapping[str, Any], private: Mapping[str, torch.Tensor] | None,
                 device: torch.device) -> FedMoEDAModel:
    """Shared embedding + private gate and experts (the initial ones if none yet; the
    averaged ones a cold-start payload carries), with the pending Eq. 11 applied."""
    model = initial_model(cfg, num_classes)
    model.load_embedding(arrays)
    if private:
        model.load_private(private)
    elif GATE_KEY in arrays:  # cold start: averaged private parts in the payload
        model.load_private(arrays)
    if private and config.get("aggregate"):
        own = [state_of(e) for e in model.experts]
        new = aggregate_experts(own, relayed_experts(arrays), int(config["client_index"]),
                                list(config["agg_index"]), list(config["agg_weight"]), cfg.num_experts)
        for expert, state in zip(model.experts, new):
            expert.load_state_dict(state)
    return model.to(device)


# ============================================================== the method
@dataclass(frozen=True)
class FedMoEDAParams(SmallCNNParams):
    fedmoe_da_top_p: int = 5  # P: experts each expert aggregates with (besides itself)
    fedmoe_da_interval: int = 5  # I: rounds between gate uploads / aggregation-matrix updates
    fedmoe_da_tau: float = 1.0  # temperature of the aggregation softmax

    def check(self, cfg: ExperimentConfig) -> None:
        require(self, ge0=("fedmoe_da_top_p",), ge1=("fedmoe_da_interval",), gt0=("fedmoe_da_tau",))


class FedMoEDA(Algorithm):
    name = "fedmoe_da"
    Params = FedMoEDAParams
    has_global_model = False
    coldstart_needs_client_parts = True
    cohort_fallback = ("top-1 routing runs each expert only on the samples routed to it, a data-dependent split "
                       "of the batch that vmap cannot batch over clients; a dense form would run every expert on "
                       "every sample (K times the compute)")
    diagnostic_keys = ("expert_class_mi_bits",)  # its clients' own gates on the global test set

    # ---- server side
    def init_state(self, cfg: ExperimentConfig, num_classes: int) -> ServerState:
        model = initial_model(cfg, num_classes)
        n, k = cfg.num_clients, cfg.num_experts
        s = min(cfg.fedmoe_da_top_p + 1, n * k)
        index = np.full((n * k, s), -1, dtype=np.int64)
        index[:, 0] = np.arange(n * k)
        weight = np.zeros((n * k, s))
        weight[:, 0] = 1.0
        extra = {
            "num_classes": np.array([num_classes]),
            "gates": np.zeros((n, k, embedding_dim(cfg)), dtype=np.float32),
            "gate_known": np.zeros(n, dtype=bool),
            "agg_index": index, "agg_weight": weight,  # the current (latest) matrix A
            "agg_round": np.array([0]),  # round A was computed in; 0: none yet (identity)
            "pending_index": index.copy(), "pending_weight": weight.copy(),  # rows awaiting Eq. 11
            "pending": np.zeros(n, dtype=bool),
        }
        return ServerState(prefixed(EMBEDDING, state_of(model.embedding)), extra)

    @staticmethod
    def stored(state: ServerState, cfg: ExperimentConfig) -> set[tuple[int, int]]:
        return {(int(key.split(".")[1]), int(key.split(".")[2])) for key in state.arrays if key.startswith(STORE)}

    def _delivery(self, state: ServerState, cfg: ExperimentConfig, client: int) -> tuple[Arrays, dict[str, Any]]:
        """The peer experts and matrix rows client ``client`` needs for its pending Eq. 11."""
        k_experts = cfg.num_experts
        if not (0 <= client < cfg.num_clients) or not state.extra["pending"][client]:
            return {}, {"aggregate": False}
        rows = slice(client * k_experts, (client + 1) * k_experts)
        index = state.extra["pending_index"][rows].copy()
        weight = state.extra["pending_weight"][rows].copy()
        available = self.stored(state, cfg)
        arrays: Arrays = {}
        for r in range(k_experts):
            for c in range(index.shape[1]):
                j = int(index[r, c])
                if j < 0:
                    continue
                owner, kk = divmod(j, k_experts)
                if owner == client:
                    continue
                if (owner, kk) not in available:  # never reached the server: dropped
                    index[r, c], weight[r, c] = -1, 0.0
                    continue
                if not any(key.startswith(relay_prefix(owner, kk)) for key in arrays):
                    arrays.update(prefixed(relay_prefix(owner, kk), unprefixed(store_prefix(owner, kk), state.arrays)))
            weight[r] = weight[r] / weight[r].sum()  # own entry is always there
        return arrays, {"aggregate": True, "agg_index": [int(v) for v in index.reshape(-1)],
                        "agg_weight": [float(v) for v in weight.reshape(-1)]}

    def _base(self, state: ServerState, client: int) -> tuple[Arrays, dict[str, Any]]:
        return ({k: v for k, v in state.arrays.items() if k.startswith(EMBEDDING)},
                {"client_index": client, "num_classes": int(state.extra["num_classes"][0])})

    def train_payload(self, state, cfg, client_index, server_round):
        arrays, config = self._base(state, client_index)
        relay, agg = self._delivery(state, cfg, client_index)
        upload_gate = (server_round - 1) % cfg.fedmoe_da_interval == 0
        requested = requested_experts(state.extra["agg_index"], client_index, cfg.num_experts) \
            if 0 <= client_index < cfg.num_clients else []
        return {**arrays, **relay}, {**config, **agg, "upload_gate": upload_gate, "upload_experts": requested}

    def eval_payload(self, state, cfg, client_index):
        arrays, config = self._base(state, client_index)
        relay, agg = self._delivery(state, cfg, client_index)
        return {**arrays, **relay}, {**config, **agg}

    def expected_upload(self, payload, config, cfg):
        expected = {k: (tuple(v.shape), v.dtype) for k, v in payload.items() if k.startswith(EMBEDDING)}
        if config.get("upload_gate"):
            expected[GATE_KEY] = ((cfg.num_experts, embedding_dim(cfg)), torch.float32)
        shapes = expert_shapes(cfg, int(config["num_classes"]))
        for k in config.get("upload_experts", []):
            for name, shape in shapes.items():
                expected[upload_prefix(int(k)) + name] = (shape, torch.float32)
        return expected

    def aggregate(self, state: ServerState, replies: list[Reply], cfg, server_round):
        k_experts = cfg.num_experts
        extra = {key: value.copy() for key, value in state.extra.items()}
        # Eq. 5: plain average of the embeddings
        embedding = weighted_average([unprefixed(EMBEDDING, r.arrays) for r in replies], [1.0] * len(replies),
                                     cfg.robust_aggregation, cfg.trim_fraction)
        arrays = prefixed(EMBEDDING, embedding)
        # the matrix these experts are aggregated with: the one the clients held this round
        for r in replies:
            rows = slice(r.client_index * k_experts, (r.client_index + 1) * k_experts)
            extra["pending_index"][rows] = state.extra["agg_index"][rows]
            extra["pending_weight"][rows] = state.extra["agg_weight"][rows]
            extra["pending"][r.client_index] = True
            if GATE_KEY in r.arrays:
                extra["gates"][r.client_index] = r.arrays[GATE_KEY].float().numpy()
                extra["gate_known"][r.client_index] = True
        # relay store: one copy of every expert a pending row still needs, newest first
        needed: set[tuple[int, int]] = set()
        for client in np.flatnonzero(extra["pending"]):
            rows = extra["pending_index"][client * k_experts:(client + 1) * k_experts]
            for j in rows[rows >= 0]:
                owner, kk = divmod(int(j), k_experts)
                if owner != client:
                    needed.add((owner, kk))
        uploads = {(r.client_index, k): unprefixed(upload_prefix(k), r.arrays)
                   for r in replies for k in range(k_experts)
                   if any(key.startswith(upload_prefix(k)) for key in r.arrays)}
        for owner, kk in sorted(needed):
            if (owner, kk) in uploads:
                arrays.update(prefixed(store_prefix(owner, kk), uploads[(owner, kk)]))
            else:
                old = unprefixed(store_prefix(owner, kk), state.arrays)
                if old:
                    arrays.update(prefixed(store_prefix(owner, kk), old))
        # every I rounds: a new aggregation matrix from all known proxies (Eqs. 8-10)
        if (server_round - 1) % cfg.fedmoe_da_interval == 0:
            extra["agg_index"], extra["agg_weight"] = build_matrix(
                extra["gates"], extra["gate_known"], cfg.fedmoe_da_top_p, cfg.fedmoe_da_tau)
            extra["agg_round"] = np.array([server_round])
        loads = [r.metrics["routing_load"] for r in replies if "routing_load" in r.metrics]
        diagnostics = {
            "aggregation_matrix_round": int(extra["agg_round"][0]),
            "relay_store_experts": len({tuple(key.split(".")[1:3]) for key in arrays if key.startswith(STORE)}),
            "routing_load": np.mean(np.array(loads, dtype=float), axis=0).tolist() if loads else [],
        }
        return ServerState(arrays, extra), diagnostics

    def coldstart_payload(self, state, cfg, client_parts=None):
        """Shared embedding + sample-weighted average of the clients' gates and experts."""
        arrays = {k: v for k, v in state.arrays.items() if k.startswith(EMBEDDING)}
        parts = [(p, n) for p, n in (client_parts or []) if p]
        if parts:
            arrays.update(weighted_average([p for p, _ in parts], [n for _, n in parts]))
        return arrays, {"client_index": -1, "num_classes": int(state.extra["num_classes"][0]),
                        "num_parts_averaged": len(parts)}

    # ---- client side
    def client_train(self, step: ClientStep) -> tuple[Arrays, Arrays | None, dict[str, Any]]:
        arrays, config, private, data, cfg, num_classes, device, seed = (
            step.arrays, step.config, step.private, step.data, step.cfg, step.num_classes, step.device, step.seed)
        model = client_model(cfg, num_classes, arrays, config, private, device)  # pending Eq. 11 first
        load = torch.zeros(cfg.num_experts)

        def loss_fn(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
            logits, top = model.forward_with_routing(x)
            load.add_(torch.bincount(top.detach().cpu(), minlength=cfg.num_experts).float())
            return F.cross_entropy(logits, y)

        loss = run_local_epochs(list(model.parameters()), [model], data, cfg, device, seed, loss_fn)
        upload = prefixed(EMBEDDING, state_of(model.embedding))
        if config.get("upload_gate"):
            upload[GATE_KEY] = state_of(model.gate)["weight"]
        for k in config.get("upload_experts", []):
            upload.update(prefixed(upload_prefix(int(k)), state_of(model.experts[int(k)])))
        metrics = {"num_samples": data.num_train, "train_loss": loss,
                   "routing_load": (load / load.sum().clamp_min(1)).tolist()}
        return upload, model.private_state(), metrics

    def client_predict(self, step: ClientStep) -> Predictor:
        model = self.evaluated_model(step)
        return lambda x: F.softmax(model(x), dim=1)

    def client_gate(self, step: ClientStep) -> Predictor | None:
        model = self.evaluated_model(step)
        return lambda x: model.route(model.embedding(x))

    @staticmethod
    def evaluated_model(step: ClientStep) -> FedMoEDAModel:
        """The model this client evaluates (pending Eq. 11 applied), in eval mode."""
        return client_model(step.cfg, step.num_classes, step.arrays, step.config, step.private, step.device).eval()

    def client_eval_upload(self, step: ClientStep) -> Arrays | None:
        arrays, config, private, cfg = step.arrays, step.config, step.private, step.cfg
        """Gate and experts as evaluated (pending Eq. 11 applied), for the cold-start average."""
        if not private:
            return None
        num_classes = int(config["num_classes"])
        return client_model(cfg, num_classes, arrays, config, private, torch.device("cpu")).private_state()
