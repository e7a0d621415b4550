"""FedCoE's server math: expert sets, capped shares, smoothed correlation weights, experts
aggregated by those weights with BatchNorm statistics by samples, routing diagnostics."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from harness import assert_same, clone

from fedcoe_flwr.algorithms.fedcoe.aggregation import (GROUPS_SWITCH_MARGIN, _climb, _likeness, _renumbered, aggregate_expert,
                                                       aggregate_pool, cap_shares, class_groups, expert_set,
                                                       expert_weights, routing_diagnostics)


# ============================================================== expert sets
def test_expert_set_is_top_m_of_the_row_sorted():
    row = np.array([0.1, 0.5, 0.05, 0.35])
    assert expert_set(row, 2, 4) == [1, 3]
    assert expert_set(row, 1, 4) == [1]
    assert expert_set(row, 3, 4) == [0, 1, 3]


def test_expert_set_is_everything_when_unknown_or_m_is_k():
    assert expert_set(None, 2, 4) == [0, 1, 2, 3]
    assert expert_set(np.array([0.7, 0.1, 0.1, 0.1]), 4, 4) == [0, 1, 2, 3]


def test_expert_set_ties_are_deterministic():
    assert expert_set(np.full(4, 0.25), 2, 4) == [0, 1]


# ============================================================== cap_shares
@pytest.mark.parametrize("shares,cap,expected", [
    ([0.7, 0.2, 0.1], 0.5, [0.5, 1 / 3, 1 / 6]),  # excess handed out in proportion
    ([0.6, 0.35, 0.05], 0.4, [0.4, 0.4, 0.2]),  # the hand-out pushes a second one over: cap it too
    ([0.2, 0.3, 0.5], 0.5, [0.2, 0.3, 0.5]),  # at the cap: unchanged
    ([0.9, 0.1], 0.3, [0.5, 0.5]),  # infeasible (2 contributors, cap 0.3): cap raised to 1/2
    ([5.0], 0.5, [1.0]),  # one contributor takes it all
    ([7.0, 2.0, 1.0], 0.5, [0.5, 1 / 3, 1 / 6]),  # unnormalised input
])
def test_cap_shares_by_hand(shares, cap, expected):
    np.testing.assert_allclose(cap_shares(np.array(shares), cap), expected, rtol=1e-9)


@pytest.mark.parametrize("seed", range(20))
@pytest.mark.parametrize("cap", [0.15, 0.3, 0.5, 1.0])
def test_cap_shares_properties(seed, cap):
    rng = np.random.default_rng(seed)
    n = int(rng.integers(1, 9))
    raw = rng.dirichlet(np.full(n, 0.3)) * rng.uniform(0.5, 100)
    out = cap_shares(raw, cap)
    assert out.shape == raw.shape
    assert out.sum() == pytest.approx(1.0, abs=1e-9)
    assert (out >= 0).all()
    assert out.max() <= max(cap, 1 / n) + 1e-9
    # order preserved: a larger raw share never ends up with less
    order = np.argsort(raw, kind="stable")
    assert np.all(np.diff(out[order]) >= -1e-12)
    # shares already under the cap are untouched up to a common scale
    if (raw / raw.sum()).max() <= max(cap, 1 / n):
        np.testing.assert_allclose(out, raw / raw.sum(), rtol=1e-9)


def test_cap_shares_with_zero_shares_still_sums_to_one():
    out = cap_shares(np.array([1.0, 0.0, 0.0]), 0.5)
    assert out.sum() == pytest.approx(1.0)
    assert out.max() == pytest.approx(0.5)


# ============================================================== expert_weights
def test_expert_weights_smoothing_and_cap_by_hand(make_cfg):
    n = np.array([100, 300])
    rows = np.array([[0.9, 0.1], [0.2, 0.8]])
    cfg = make_cfg(correlation_smoothing=0.5, correlation_cap=1.0)
    # expert 0: 100 * (0.45 + 0.25) = 70, 300 * (0.10 + 0.25) = 105
    np.testing.assert_allclose(expert_weights(n, rows, 0, cfg), [0.4, 0.6])
    # expert 1: 100 * 0.30 = 30, 300 * 0.65 = 195
    np.testing.assert_allclose(expert_weights(n, rows, 1, cfg), [30 / 225, 195 / 225])
    np.testing.assert_allclose(expert_weights(n, rows, 1, cfg.replace(correlation_cap=0.7)), [0.3, 0.7])
    # pure correlation weighting: 90 vs 60, 10 vs 240
    pure = cfg.replace(correlation_smoothing=0.0)
    np.testing.assert_allclose(expert_weights(n, rows, 0, pure), [0.6, 0.4])
    np.testing.assert_allclose(expert_weights(n, rows, 1, pure), [0.04, 0.96])
    # full smoothing: plain sample weights
    np.testing.assert_allclose(expert_weights(n, rows, 1, cfg.replace(correlation_smoothing=1.0)), [0.25, 0.75])
    # correlation weighting off: sample weights, no cap
    off = cfg.replace(correlation_weighting=False, correlation_cap=0.5)
    np.testing.assert_allclose(expert_weights(n, rows, 1, off), [0.25, 0.75])


def test_expert_weights_default_cap_stops_a_takeover(make_cfg):
    cfg = make_cfg()  # defaults: smoothing 0.5, cap 0.5
    n = np.array([1000, 50, 50, 50])
    rows = np.array([[1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [0.0, 1.0]])
    w = expert_weights(n, rows, 0, cfg)
    assert w.sum() == pytest.approx(1.0) and w.max() == pytest.approx(0.5)


# ============================================================== aggregate_expert / aggregate_pool
def scalar_expert(w: float, bn_mean: float, batches: int) -> dict[str, torch.Tensor]:
    return {"conv.weight": torch.tensor([w, -w], dtype=torch.float32),
            "bn.weight": torch.tensor([w]),
            "bn.running_mean": torch.tensor([bn_mean]),
            "bn.running_var": torch.tensor([bn_mean * 2]),
            "bn.num_batches_tracked": torch.tensor(batches)}


def test_aggregate_expert_batchnorm_by_samples_not_correlation():
    states = [scalar_expert(1.0, 10.0, 4), scalar_expert(2.0, 20.0, 8)]
    out = aggregate_expert(states, np.array([0.9, 0.1]), np.array([100.0, 300.0]))
    torch.testing.assert_close(out["conv.weight"], torch.tensor([1.1, -1.1]))  # correlation shares
    torch.testing.assert_close(out["bn.weight"], torch.tensor([1.1]))  # affine BN params are parameters
    torch.testing.assert_close(out["bn.running_mean"], torch.tensor([17.5]))  # samples 1:3
    torch.testing.assert_close(out["bn.running_var"], torch.tensor([35.0]))
    assert out["bn.num_batches_tracked"].dtype == torch.int64 and int(out["bn.num_batches_tracked"]) == 7


@pytest.mark.parametrize("smoothing,cap,expected0,expected1,max_share", [
    (0.5, 1.0, 1.6, 28 / 15, [0.6, 13 / 15]),
    (0.5, 0.5, 1.5, 1.5, [0.5, 0.5]),
    (0.5, 0.7, 1.6, 1.7, [0.6, 0.7]),
    (0.0, 1.0, 1.4, 1.96, [0.6, 0.96]),
])
def test_aggregate_pool_two_clients_by_hand(make_cfg, smoothing, cap, expected0, expected1, max_share):
    """Client A: n=100, row (0.9, 0.1), experts hold w=1; client B: n=300, row (0.2, 0.8), w=2."""
    cfg = make_cfg(correlation_smoothing=smoothing, correlation_cap=cap)
    pool = [scalar_expert(0.0, 0.0, 0), scalar_expert(0.0, 0.0, 0)]
    a, b = scalar_expert(1.0, 10.0, 4), scalar_expert(2.0, 20.0, 8)
    contributions = [({0: a, 1: a}, np.array([0.9, 0.1]), 100), ({0: b, 1: b}, np.array([0.2, 0.8]), 300)]
    new_pool, shares = aggregate_pool(pool, contributions, cfg)
    assert new_pool[0]["conv.weight"][0].item() == pytest.approx(expected0, rel=1e-6)
    assert new_pool[1]["conv.weight"][0].item() == pytest.approx(expected1, rel=1e-6)
    assert shares == pytest.approx(max_share, rel=1e-9)
    for expert in new_pool:  # BN statistics: samples only, whatever the correlation
        assert expert["bn.running_mean"].item() == pytest.approx(17.5)
        assert int(expert["bn.num_batches_tracked"]) == 7


def test_expert_nobody_received_stays_as_it_was(make_cfg):
    cfg = make_cfg()
    pool = [scalar_expert(float(k), float(k), k) for k in range(3)]
    before = [clone(e) for e in pool]
    a, b = scalar_expert(5.0, 5.0, 5), scalar_expert(7.0, 7.0, 7)
    contributions = [({0: a}, np.array([0.8, 0.1, 0.1]), 10), ({0: b, 1: b}, np.array([0.1, 0.8, 0.1]), 30)]
    new_pool, shares = aggregate_pool(pool, contributions, cfg)
    assert_same(new_pool[2], before[2])
    assert shares[2] is None
    assert_same(new_pool[1], b)  # a single contributor is the expert (cap raised to 1)
    assert shares[1] == pytest.approx(1.0)
    assert 5.0 < new_pool[0]["conv.weight"][0].item() < 7.0


def test_no_contributions_leave_the_pool_unchanged(make_cfg):
    pool = [scalar_expert(1.0, 1.0, 1), scalar_expert(2.0, 2.0, 2)]
    new_pool, shares = aggregate_pool(pool, [], make_cfg())
    for new, old in zip(new_pool, pool):
        assert_same(new, old)
    assert shares == [None, None]


@pytest.mark.parametrize("smoothing,cap", [(0.5, 0.5), (0.0, 1.0), (0.9, 0.3)])
def test_identical_states_average_to_themselves(make_cfg, smoothing, cap):
    """Shares sum to one: averaging copies of one state returns that state."""
    cfg = make_cfg(correlation_smoothing=smoothing, correlation_cap=cap)
    torch.manual_seed(0)
    state = {"w": torch.randn(4, 3), "bn.running_var": torch.rand(3) + 0.5,
             "bn.num_batches_tracked": torch.tensor(12)}
    rng = np.random.default_rng(0)
    contributions = [({0: clone(state)}, rng.dirichlet(np.ones(2)), int(rng.integers(1, 500))) for _ in range(5)]
    new_pool, _ = aggregate_pool([{k: torch.zeros_like(v) for k, v in state.items()}, state], contributions, cfg)
    torch.testing.assert_close(new_pool[0]["w"], state["w"], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(new_pool[0]["bn.running_var"], state["bn.running_var"], rtol=1e-6, atol=1e-6)
    assert int(new_pool[0]["bn.num_batches_tracked"]) == 12


def test_routing_diagnostics_by_hand():
    same = routing_diagnostics(np.array([[0.5, 0.5], [0.5, 0.5]]))
    assert same["expert_usage_entropy"] == pytest.approx(1.0)
    assert same["correlation_row_entropy"] == pytest.approx(1.0)
    assert same["correlation_spread"] == pytest.approx(0.0)
    split = routing_diagnostics(np.array([[1.0, 0.0], [0.0, 1.0]]))
    assert split["expert_usage_entropy"] == pytest.approx(1.0)  # both experts used ...
    assert split["correlation_row_entropy"] == pytest.approx(0.0, abs=1e-9)  # ... each by one client
    assert split["correlation_spread"] == pytest.approx(0.5)
    collapsed = routing_diagnostics(np.array([[1.0, 0.0], [1.0, 0.0]]))
    assert collapsed["expert_usage_entropy"] == pytest.approx(0.0, abs=1e-9)
    assert routing_diagnostics(np.zeros((0, 3))) == {"expert_usage": []}


def cooccurrence_of(clusters: np.ndarray, seed: int) -> np.ndarray:
    """E[p p^T] of predictions that confuse a class with the others of its cluster."""
    rng = np.random.default_rng(seed)
    probs = []
    for c in rng.integers(len(clusters), size=2000):
        p = np.full(len(clusters), 0.01)
        p[clusters == clusters[c]] += 0.3
        p[c] += 0.5
        probs.append(p / p.sum())
    probs = np.array(probs)
    return probs.T @ probs / len(probs)


@pytest.mark.parametrize("seed", range(4))
def test_class_groups_put_confusable_classes_on_one_expert(seed):
    clusters = np.random.default_rng(seed).permutation([0, 0, 0, 1, 1, 1, 2, 2, 3, 3])
    group = class_groups(cooccurrence_of(clusters, seed), 4)
    assert sorted(np.bincount(group, minlength=4)) == [2, 2, 3, 3]
    for c in range(4):  # each cluster whole on one expert
        assert len(set(group[clusters == c].tolist())) == 1


def test_class_groups_start_from_the_previous_map_and_change_it_only_where_the_predictions_say():
    clusters = np.array([0, 0, 0, 1, 1, 1, 2, 2, 3, 3])
    joint = cooccurrence_of(clusters, 0)
    best = np.array([3, 3, 3, 2, 2, 2, 1, 1, 0, 0])
    assert class_groups(joint, 4, best).tolist() == best.tolist()  # the experts keep their classes
    one_off = best.copy()
    one_off[[0, 9]] = one_off[[9, 0]]
    assert class_groups(joint, 4, one_off).tolist() == best.tolist()
    # nothing alike: any balanced map is as good, so the previous one stays
    assert class_groups(np.full((10, 10), 0.01), 4, one_off).tolist() == one_off.tolist()


def colocated_cooccurrence(seed: int) -> np.ndarray:
    """E[p p^T] of predictions that stay on the two classes of each of 20 clients: likeness with
    no structure but the partition's, where the search has local optima."""
    rng = np.random.default_rng(seed)
    probs = []
    for _ in range(20):
        classes = rng.choice(10, size=2, replace=False)
        for _ in range(50):
            p = np.full(10, 0.02)
            p[classes] += rng.dirichlet([1, 1])
            probs.append(p / p.sum())
    probs = np.array(probs)
    return probs.T @ probs / len(probs)


def decoy_cooccurrence(cluster_lift: float = 1.4, decoy_lift: float = 1.0) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """E[p p^T] (uniform marginals) where the classes of four clusters are alike, and the classes
    of a ``decoy`` map, one class of each cluster per group, a little less alike: every swap or
    move from the decoy loses more than it gains, so the search from it stays there, at 1/1.4 of
    the clusters' likeness. -> (joint, clusters, decoy)."""
    clusters = np.array([0, 0, 0, 1, 1, 1, 2, 2, 3, 3])
    decoy = np.array([0, 1, 2, 0, 1, 3, 0, 2, 1, 3])
    off = sum(w * ((g[:, None] == g[None, :]) & ~np.eye(10, dtype=bool))
              for w, g in ((cluster_lift, clusters), (decoy_lift, decoy)))
    joint = off.astype(np.float64)
    np.fill_diagonal(joint, 10 - off.sum(1))
    return joint / joint.sum(), clusters, decoy


def test_class_groups_restarts_leave_a_local_optimum_and_keep_the_experts_classes_where_they_can():
    joint, clusters, decoy = decoy_cooccurrence()
    lift = joint / np.outer(joint.sum(1), joint.sum(1))
    np.fill_diagonal(lift, 0.0)
    assert class_groups(joint, 4, decoy).tolist() == decoy.tolist()  # a local optimum: the search stays
    moved = class_groups(joint, 4, decoy, restarts=8)
    assert _likeness(lift, moved) > _likeness(lift, decoy) * (1 + GROUPS_SWITCH_MARGIN)
    assert len(set(zip(moved.tolist(), clusters.tolist()))) == 4  # the clusters, one per expert
    # the groups keep the expert they share most classes with: no renaming makes more classes stay
    import itertools
    kept = int((moved == decoy).sum())
    assert kept == max(int((np.array(perm)[moved] == decoy).sum()) for perm in itertools.permutations(range(4)))
    assert class_groups(joint, 4, moved, restarts=8).tolist() == moved.tolist()


def test_class_groups_restarts_keep_a_map_only_a_little_less_alike(monkeypatch):
    """Noisy early confusions give maps a few % apart: switching would move classes between experts
    every round. Here the restarts find a map about 10% alike-er, under the margin."""
    from fedcoe_flwr.algorithms.fedcoe import aggregation

    joint = colocated_cooccurrence(10)
    marginal = joint.sum(1)
    lift = joint / np.outer(marginal, marginal)
    np.fill_diagonal(lift, 0.0)
    stuck = class_groups(joint, 4, np.arange(10) % 4)
    assert class_groups(joint, 4, stuck).tolist() == stuck.tolist()  # a local optimum
    assert class_groups(joint, 4, stuck, restarts=8).tolist() == stuck.tolist()
    monkeypatch.setattr(aggregation, "GROUPS_SWITCH_MARGIN", 0.0)
    better = class_groups(joint, 4, stuck, restarts=8)  # what the restarts found
    assert _likeness(lift, stuck) < _likeness(lift, better) <= _likeness(lift, stuck) * (1 + GROUPS_SWITCH_MARGIN)


def test_renumbering_a_relabelled_map_gives_the_previous_map_back():
    previous = np.array([0, 0, 0, 1, 1, 1, 2, 2, 3, 3])
    relabelled = np.array([2, 3, 0, 1])[previous]
    assert _renumbered(relabelled, previous, 4).tolist() == previous.tolist()


def test_class_groups_stay_balanced_when_nothing_is_alike():
    assert sorted(np.bincount(class_groups(np.eye(100) / 100, 4))) == [25] * 4
    assert sorted(np.bincount(class_groups(np.full((10, 10), 0.01), 3))) == [3, 3, 4]


def climb_class_by_class(lift: np.ndarray, num_experts: int, start: np.ndarray) -> np.ndarray:
    """The grouping search written out one candidate at a time: in class order, each class's moves
    to a group one smaller, then its swaps with later classes; the best strict gain is taken."""
    num_classes, group = len(lift), np.array(start)

    def gain_of_move(c: int, g: int) -> float:
        return lift[c, group == g].sum() - lift[c, (group == group[c]) & (np.arange(num_classes) != c)].sum()

    while True:
        best, step = 1e-9, None
        size = np.bincount(group, minlength=num_experts)
        for a in range(num_classes):
            for g in range(num_experts):
                if size[group[a]] == size[g] + 1 and gain_of_move(a, g) > best:
                    best, step = gain_of_move(a, g), (a, None, g)
            for b in range(a + 1, num_classes):
                if group[a] != group[b]:
                    gain = gain_of_move(a, group[b]) + gain_of_move(b, group[a]) - 2 * lift[a, b]
                    if gain > best:
                        best, step = gain, (a, b, None)
        if step is None:
            return group
        a, b, g = step
        if b is None:
            group[a] = g
        else:
            group[a], group[b] = group[b], group[a]


def test_class_groups_search_takes_the_steps_of_the_class_by_class_search():
    """The search scores every move and swap at once (100 classes take milliseconds, not tens of
    seconds); it must take the same steps as the search written out one candidate at a time."""
    rng = np.random.default_rng(1)
    for _ in range(60):
        num_classes = int(rng.integers(4, 16))
        num_experts = int(rng.integers(2, min(num_classes, 6) + 1))
        probs = rng.dirichlet(np.full(num_classes, 0.3), size=200)
        joint = probs.T @ probs / 200
        lift = joint / np.outer(joint.sum(1), joint.sum(1))
        np.fill_diagonal(lift, 0.0)
        start = rng.permutation(np.arange(num_classes) % num_experts)
        np.testing.assert_array_equal(_climb(lift, num_experts, start),
                                      climb_class_by_class(lift, num_experts, start))
