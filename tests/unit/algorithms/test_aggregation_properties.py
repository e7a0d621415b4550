"""Properties of the aggregation rules (hypothesis): robust rules ignore an outlier, identical
updates average to themselves in any order, correlation shares sum to one under the cap."""

from __future__ import annotations

import numpy as np
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from fedcoe_flwr.algorithms.training import weighted_average


# ------------------------------------------------------------------ robust aggregation
def test_robust_median_and_trimmed_mean_ignore_an_outlier():
    states = [{"w": torch.tensor([1.0, 2.0])}, {"w": torch.tensor([1.2, 2.2])},
              {"w": torch.tensor([0.8, 1.8])}, {"w": torch.tensor([1e6, -1e6])}, {"w": torch.tensor([1.0, 2.0])}]
    median = weighted_average(states, [1] * 5, "median")["w"]
    trimmed = weighted_average(states, [1] * 5, "trimmed_mean", 0.2)["w"]
    assert torch.allclose(median, torch.tensor([1.0, 2.0]))
    assert torch.allclose(trimmed, torch.tensor([(1.0 + 1.2 + 1.0) / 3, (2.0 + 2.0 + 1.8) / 3]))
    assert weighted_average(states, [1] * 5)["w"][0] > 1e5  # the plain mean is not robust


@settings(max_examples=40, deadline=None)
@given(weights=st.lists(st.floats(0.1, 100), min_size=1, max_size=6), seed=st.integers(0, 1000))
def test_aggregation_properties_identical_updates_and_permutation(weights, seed):
    gen = torch.Generator().manual_seed(seed)
    base = {"w": torch.randn(4, generator=gen), "n": torch.tensor(3)}
    # identical updates leave the model unchanged, whatever the weights
    same = weighted_average([base] * len(weights), weights)
    assert torch.allclose(same["w"], base["w"], atol=1e-6) and same["n"] == 3
    states = [{"w": torch.randn(4, generator=gen), "n": torch.tensor(i)} for i in range(len(weights))]
    order = np.random.default_rng(seed).permutation(len(weights))
    a = weighted_average(states, weights)
    b = weighted_average([states[i] for i in order], [weights[i] for i in order])
    assert torch.allclose(a["w"], b["w"], atol=1e-6)
    for method in ("median", "trimmed_mean"):
        m1 = weighted_average(states, weights, method, 0.2)["w"]
        m2 = weighted_average([states[i] for i in order], [weights[i] for i in order], method, 0.2)["w"]
        assert torch.allclose(m1, m2, atol=1e-6)


@settings(max_examples=60, deadline=None)
@given(num_samples=st.lists(st.integers(1, 500), min_size=1, max_size=8), seed=st.integers(0, 10_000),
       smoothing=st.floats(0.0, 1.0), cap=st.floats(0.05, 1.0), weighting=st.booleans())
def test_correlation_shares_sum_to_one_respect_the_cap_and_ignore_order(num_samples, seed, smoothing, cap,
                                                                        weighting):
    from fedcoe_flwr.algorithms.fedcoe.aggregation import expert_weights
    from fedcoe_flwr.config import from_dict

    cfg = from_dict({"correlation_weighting": weighting, "correlation_smoothing": smoothing,
                     "correlation_cap": cap, "num_experts": 3})
    rng = np.random.default_rng(seed)
    corr = rng.dirichlet(np.ones(3), size=len(num_samples))
    n = np.array(num_samples)
    for k in range(3):
        shares = expert_weights(n, corr, k, cfg)
        assert np.all(shares >= 0) and abs(shares.sum() - 1.0) < 1e-9
        if weighting:
            assert shares.max() <= max(cap, 1.0 / len(n)) + 1e-9  # no client owns an expert
        order = rng.permutation(len(n))
        np.testing.assert_allclose(expert_weights(n[order], corr[order], k, cfg), shares[order], atol=1e-9)
