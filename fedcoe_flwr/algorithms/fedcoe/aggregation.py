"""FedCoE's server math: each client's expert set, each expert aggregated with the
contributors' smoothed, capped correlation weights, and routing diagnostics."""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np
import torch

from ...config import ExperimentConfig
from ..training import Arrays, BN_BUFFER_SUFFIXES, weighted_average

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


# a restart's map replaces the last round's only when 25% alike-er: early rounds' noisy confusions
# give maps a few % apart, and switching among them moves classes between experts every round;
# the maps measured far from the pool's own confusions were 34-77% less alike
GROUPS_SWITCH_MARGIN = 0.25


def class_groups(cooccurrence: np.ndarray, num_experts: int, previous: np.ndarray | None = None,
                 restarts: int = 0) -> np.ndarray:
    """Each class's expert: the classes split into ``num_experts`` groups of sizes equal to within
    one, confusable classes together, so that the gate's decision (which group) is the easy one
    and each expert learns the fine distinctions within its group.

    ``cooccurrence``: C x C, E[p p^T] of the mixture's predicted class probabilities over the
    clients' training images (no labels); classes are alike in proportion to their lift
    E[p_i p_j] / (E[p_i] E[p_j]). The search starts from ``previous`` (the last round's map) when
    given, else from a greedy split (each group seeded with the class least like the others left,
    filled with its most alike), and swaps two classes, or moves one to a group one smaller, while
    that raises the within-group likeness: a class changes expert only when the clients'
    predictions say so, and experts keep their classes from round to round.

    That search stops at a local optimum, which can hold on to a group the gate cannot tell apart
    (e.g. the first round's map, drawn before the predictions meant anything). With ``restarts``
    the same search also runs from the greedy split and ``restarts - 1`` random balanced splits;
    the alike-est map replaces the last round's when it is more than ``GROUPS_SWITCH_MARGIN``
    alike-er, its groups renumbered to keep each expert as many of its classes as they can."""
    joint = np.asarray(cooccurrence, dtype=np.float64)
    marginal = joint.sum(1)
    lift = (joint + joint.T) / 2 / np.maximum(np.outer(marginal, marginal), 1e-12)
    np.fill_diagonal(lift, 0.0)
    valid = previous is not None and len(previous) == len(lift)
    greedy = _greedy_groups(lift, num_experts)
    kept = _climb(lift, num_experts, np.asarray(previous, dtype=np.int64) if valid else greedy)
    if restarts < 1:
        return kept
    rng = np.random.default_rng(0)
    starts = [greedy] + [rng.permutation(greedy) for _ in range(restarts - 1)]
    best = max((_climb(lift, num_experts, start) for start in starts), key=lambda g: _likeness(lift, g))
    if _likeness(lift, best) <= _likeness(lift, kept) * (1 + GROUPS_SWITCH_MARGIN):
        return kept
    return _renumbered(best, kept, num_experts)


def _likeness(lift: np.ndarray, group: np.ndarray) -> float:
    """The search's objective: the lift summed over pairs of classes on one expert."""
    return float(lift[group[:, None] == group[None, :]].sum())


def _climb(lift: np.ndarray, num_experts: int, start: np.ndarray) -> np.ndarray:
    """Hill-climb from ``start``: each step takes the best move of one class to a group one
    smaller or swap of two classes of different groups (the first in class order on a tie),
    until none raises the likeness. Every candidate's gain is computed at once per step."""
    num_classes = len(lift)
    group = np.array(start, dtype=np.int64)
    classes = np.arange(num_classes)
    for _ in range(num_classes * num_classes):
        to_group = lift @ np.eye(num_experts)[group]  # C x K: each class's lift to each group
        # moving class c to group g gains its lift to g less its lift to its own group
        move = to_group - to_group[classes, group][:, None]
        size = np.bincount(group, minlength=num_experts)
        moves = np.where(size[group][:, None] == size[None, :] + 1, move, -np.inf)
        across = move[:, group]  # [a, b]: a's gain from moving to b's group
        swaps = across + across.T - 2 * lift
        swaps[~((group[:, None] != group[None, :]) & (classes[:, None] < classes[None, :]))] = -np.inf
        gains = np.concatenate([moves, swaps], axis=1)  # row a: its moves, then its swaps (search order)
        best = int(np.argmax(gains))
        if not gains.flat[best] > 1e-9:
            break
        a, column = divmod(best, num_experts + num_classes)
        if column < num_experts:
            group[a] = column
        else:
            b = column - num_experts
            group[a], group[b] = group[b], group[a]
    return group


def _renumbered(group: np.ndarray, previous: np.ndarray, num_experts: int) -> np.ndarray:
    """``group`` with its groups renamed so that each expert keeps most of its classes of
    ``previous`` (greedy on the overlap counts, largest first)."""
    overlap = np.zeros((num_experts, num_experts), dtype=np.int64)
    np.add.at(overlap, (group, previous), 1)
    name = np.full(num_experts, -1)
    taken = np.zeros(num_experts, dtype=bool)
    for flat in np.argsort(-overlap, axis=None, kind="stable"):
        g, k = divmod(int(flat), num_experts)
        if name[g] < 0 and not taken[k]:
            name[g], taken[k] = k, True
    return name[group]


def _greedy_groups(lift: np.ndarray, num_experts: int) -> np.ndarray:
    num_classes = len(lift)
    sizes = [num_classes // num_experts + (g < num_classes % num_experts) for g in range(num_experts)]
    group = np.full(num_classes, -1)
    for g, size in enumerate(sizes):
        free = np.flatnonzero(group < 0)
        group[free[np.argmin(lift[np.ix_(free, free)].sum(1))]] = g
        for _ in range(size - 1):
            free = np.flatnonzero(group < 0)
            group[free[np.argmax(lift[np.ix_(free, np.flatnonzero(group == g))].sum(1))]] = g
    return group
