"""Cold-start variants from a FedCoE run's checkpoint, offline, on the run's own cold-start
clients (their local train split unlabeled, scored on their local test split): EM on the
mixture (what the run reports), EM per expert with each expert's own predicted training prior,
the gate re-weighted toward the experts whose classes EM's prior holds (through the class map),
and routing by that prior alone. Needs a run with ``assignment_level=class_groups``.

    python scripts/coldstart_variants_of_run.py results/<run>/checkpoints/round-00015.pt"""
import argparse
import sys
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from fedcoe_flwr.config import from_dict
from fedcoe_flwr.data import load_client_data, federation_classes
from fedcoe_flwr.algorithms.fedcoe.coldstart import pool_model
from fedcoe_flwr.algorithms.fedcoe.model import split_pool_outputs, with_shared_expert
from fedcoe_flwr.algorithms.adaptation import em_label_prior, prior_correct, federation_prior
from fedcoe_flwr.algorithms.training import predict_probs
from fedcoe_flwr.server.onboarding import OnboardingError, load_served_checkpoint

parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
parser.add_argument("checkpoint", help="a FedCoE run's folder or one of its checkpoints/round-*.pt")
args = parser.parse_args()
try:
    payload, path, _ = load_served_checkpoint(args.checkpoint)
except OnboardingError as err:
    raise SystemExit(f"error: {err}") from None
if "class_expert" not in payload["extra"]:
    raise SystemExit(f"error: {path} has no class map (not a FedCoE run with assignment_level=class_groups)")
cfg = from_dict(payload["config"]); dev = torch.device("cpu")
C = len(federation_classes(cfg)); K = cfg.num_experts
model = pool_model(payload["arrays"], cfg, C, dev)
cmap = np.asarray(payload["extra"]["class_expert"])
M = torch.zeros(C, K); M[torch.arange(C), torch.as_tensor(cmap)] = 1.0
print(path.name, "map", cmap.tolist())

def outputs(x):
    """gate (n,K), experts (K,n,C), shared (n,C)"""
    g, experts, shared = split_pool_outputs(predict_probs(model.pool_outputs, x, cfg, dev), K, C)
    return g, torch.stack(experts), shared

def mix(g, e, s, w=None, gamma=1.0):
    if w is not None:
        g = g * w.clamp_min(1e-6) ** gamma
    g = g / g.sum(1, keepdim=True)
    return with_shared_expert(torch.einsum("nk,knc->nc", g, e), s, cfg.shared_expert_weight)

train_ids = range(cfg.num_clients); cold = range(cfg.num_clients, cfg.num_partitions)
rows, ns, erows = [], [], []
for i in train_ids:
    d = load_client_data(cfg, i); g, e, s = outputs(d.train_x)
    rows.append(mix(g, e, s).mean(0).tolist()); ns.append(d.num_train)
    erows.append(torch.cat([e, s[None]]).mean(1))  # (K+1, C)
tp = federation_prior(rows, ns).float()
w_n = torch.tensor(ns, dtype=torch.float32)
tpe = (torch.stack(erows) * w_n[:, None, None]).sum(0) / w_n.sum()  # each expert's own training prior
tpe = tpe / tpe.sum(1, keepdim=True)
def corrected(e, s, pi):
    e2 = torch.stack([prior_correct(e[k], pi, tpe[k]) for k in range(K)])
    return e2, prior_correct(s, pi, tpe[K])
res = {}
def score(name, probs, y):
    res.setdefault(name, [0, 0]); res[name][0] += int((probs.argmax(1) == y).sum()); res[name][1] += len(y)
for i in cold:
    d = load_client_data(cfg, i)
    gu, eu, su = outputs(d.train_x); gt, et, st = outputs(d.test_x)
    base_u, base_t = mix(gu, eu, su), mix(gt, et, st)
    score("plain", base_t, d.test_y)
    pi = em_label_prior(base_u, tp)
    score("em", prior_correct(base_t, pi, tp), d.test_y)
    w0 = pi @ M  # expert weights from the client's estimated labels
    for gamma in (0.5, 1.0, 2.0, 4.0):
        for iters in (1, 3):
            p, w = pi, w0
            for _ in range(iters):
                pu = mix(gu, eu, su, w, gamma); p = em_label_prior(pu, tp); w = p @ M
            score(f"gate x prior g{gamma} it{iters}", prior_correct(mix(gt, et, st, w, gamma), p, tp), d.test_y)
    score("em_per_expert", mix(gt, *corrected(et, st, pi)), d.test_y)
    p = pi
    for _ in range(3):  # EM on the per-expert-corrected mixture: pi <- mean posterior
        e2u, s2u = corrected(eu, su, p); p = mix(gu, e2u, s2u).mean(0)
    e2t, s2t = corrected(et, st, p)
    score("em_per_expert it3", mix(gt, e2t, s2t), d.test_y)
    for gamma in (0.5, 1.0, 2.0):
        score(f"em_per_expert + gate x prior g{gamma}", mix(gt, e2t, s2t, p @ M, gamma), d.test_y)
    # client-level routing only (no per-sample gate)
    p = em_label_prior(mix(torch.ones_like(gu), eu, su, w0), tp)
    score("client_route", prior_correct(mix(torch.ones_like(gt), et, st, w0), p, tp), d.test_y)
for k, (c, n) in res.items():
    print(f"{k:28s} {100 * c / n:6.2f}")
