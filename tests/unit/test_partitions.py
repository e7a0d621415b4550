"""Partitions are disjoint and deterministic; an impossible one is refused before round 1."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st


# ------------------------------------------------------------------ properties: partitioner and correlation shares
@settings(max_examples=15, deadline=None)
@given(partition=st.sampled_from(["dirichlet", "iid", "pathological"]), alpha=st.floats(0.05, 5.0),
       num_clients=st.integers(2, 6), num_coldstart=st.integers(1, 3), seed=st.integers(0, 10_000))
def test_partitioner_properties_disjoint_deterministic_split(partition, alpha, num_clients, num_coldstart, seed):
    """Whatever the partition, skew, client count and seed: clients never share an index, the
    same seed gives the same partition, and every client's local split is disjoint and non-empty."""
    from fedcoe_flwr import data as data_mod
    from fedcoe_flwr.config import from_dict

    num_coldstart = min(num_coldstart, num_clients)  # more cold-start clients than clients is a config error
    cfg = from_dict({"dataset": "synthetic", "synthetic_train_size": 400, "synthetic_test_size": 40,
                     "synthetic_num_classes": 4, "image_size": 8, "num_clients": num_clients,
                     "num_coldstart_clients": num_coldstart, "partition": partition, "dirichlet_alpha": alpha,
                     "classes_per_client": 2, "min_partition_size": 10, "seed": seed, "model": "cnn"})
    try:
        splits = data_mod.client_splits(cfg)
    except data_mod.DataError as err:  # an impossible draw must be refused by name, never hang or overlap
        assert "min_partition_size" in str(err) or "client" in str(err), err
        return
    everything = np.concatenate([np.concatenate([tr, te]) for tr, te in splits])
    assert len(splits) == num_clients + num_coldstart
    assert len(np.unique(everything)) == len(everything) and everything.max() < 400
    for tr, te in splits:
        assert len(tr) > 0 and not set(tr.tolist()) & set(te.tolist())
    data_mod.clear_caches()
    again = data_mod.client_splits(cfg)
    assert all(np.array_equal(a[0], b[0]) and np.array_equal(a[1], b[1]) for a, b in zip(splits, again))


def test_invalid_partition_is_refused_before_training_with_the_keys_to_change(tmp_path):
    """flwr-datasets gives up on an impossible Dirichlet draw; the server finds that out
    before round 1 (check_partitions) and names the keys, instead of every client failing."""
    from fedcoe_flwr.config import from_dict
    from fedcoe_flwr.data import DataError
    from fedcoe_flwr.server.run import check_partitions

    cfg = from_dict({"dataset": "synthetic", "synthetic_train_size": 300, "synthetic_num_classes": 4,
                     "image_size": 8, "num_clients": 8, "num_coldstart_clients": 2, "partition": "dirichlet",
                     "dirichlet_alpha": 0.05, "min_partition_size": 25, "cache_dir": str(tmp_path)})
    with pytest.raises(DataError, match=r"min_partition_size \(25\).*dirichlet_alpha \(0.05\)"):
        check_partitions(cfg)
    check_partitions(cfg.replace(min_partition_size=5, dirichlet_alpha=1.0))  # a possible one passes
