"""Clients' partitions with flwr-datasets' partitioners and each client's stratified
train/test split, deterministic from the seed."""

from __future__ import annotations

import warnings
from functools import lru_cache

import numpy as np

from ..config import ExperimentConfig, from_dict
from .dataset import data_key, load_dataset
from .sources import DataError


# --------------------------------------------------------------------------- partitions
def _partitioner(cfg: ExperimentConfig):
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    n = cfg.num_partitions
    if cfg.partition == "dirichlet":
        return DirichletPartitioner(num_partitions=n, partition_by="label", alpha=cfg.dirichlet_alpha,
                                    min_partition_size=cfg.min_partition_size,
                                    self_balancing=cfg.dirichlet_self_balancing,
                                    shuffle=True, seed=cfg.seed)
    if cfg.partition == "pathological":
        return PathologicalPartitioner(num_partitions=n, partition_by="label",
                                       num_classes_per_partition=cfg.classes_per_client,
                                       class_assignment_mode="random", shuffle=True, seed=cfg.seed)
    return IidPartitioner(num_partitions=n)


def stratified_split(indices: np.ndarray, labels: np.ndarray, test_fraction: float,
                     rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """Per class, a seeded shuffle; round(test_fraction * count) go to test."""
    train, test = [], []
    for cls in np.unique(labels[indices]):
        members = indices[labels[indices] == cls]
        members = members[rng.permutation(len(members))]
        n_test = int(round(test_fraction * len(members)))
        test.append(members[:n_test])
        train.append(members[n_test:])
    return np.sort(np.concatenate(train)), np.sort(np.concatenate(test))


def _shard_bounds(n: int, num_shards: int, index: int) -> tuple[int, int]:
    """Rows of contiguous shard ``index`` of ``n`` rows, exactly as Hugging Face's
    ``Dataset.shard(num_shards, index, contiguous=True)`` (what IidPartitioner calls)."""
    div, mod = divmod(n, num_shards)
    start = div * index + min(index, mod)
    return start, start + div + (1 if index < mod else 0)


def _partition_rows(cfg: ExperimentConfig, labels: np.ndarray) -> list[np.ndarray]:
    """Every partition's row indices into ``labels`` (the pool), in flwr-datasets' order.
    IID shards are computed directly (no data set built, no per-partition ``select``);
    Dirichlet and pathological partitions are determined once by the partitioner and
    read from its index table instead of materialising 1000 ``select()`` data sets."""
    n = cfg.num_partitions
    if cfg.partition not in ("dirichlet", "pathological"):
        return [np.arange(*_shard_bounds(len(labels), n, pid), dtype=np.int64) for pid in range(n)]
    from datasets import Dataset

    partitioner = _partitioner(cfg)
    partitioner.dataset = Dataset.from_dict({"label": labels.tolist()})
    with warnings.catch_warnings():
        # the Dirichlet partitioner warns on every resampling until min_partition_size holds
        warnings.filterwarnings("ignore", message=".*min_partition_size.*", category=UserWarning)
        try:
            partitioner.load_partition(0)
        except ValueError as err:  # flwr-datasets gives up resampling: say which keys to change
            raise DataError(
                f"partition '{cfg.partition}' of {len(labels)} samples into {n} clients failed ({err}). "
                f"Lower min_partition_size ({cfg.min_partition_size}), raise dirichlet_alpha "
                f"({cfg.dirichlet_alpha}), use fewer clients or more data (train_subset={cfg.train_subset}).") from err
    table = getattr(partitioner, "_partition_id_to_indices", None)
    if isinstance(table, dict) and len(table) == n:
        return [np.asarray(table[pid], dtype=np.int64) for pid in range(n)]
    # another flwr-datasets version: the public (slower) way
    partitioner.dataset = Dataset.from_dict({"label": labels.tolist(), "row": list(range(len(labels)))})
    return [np.asarray(partitioner.load_partition(pid)["row"], dtype=np.int64) for pid in range(n)]


class _Splits:
    """The partitions of one federation, determined once per process; each client's
    80/20 split is computed the first time that client asks (a Ray actor serving 50 of
    1000 clients splits 50, not 1000)."""

    def __init__(self, cfg: ExperimentConfig):
        data = load_dataset(cfg)
        pool = np.arange(len(data.train_y))
        if cfg.train_subset and cfg.train_subset < len(pool):
            pool = np.sort(np.random.default_rng(cfg.seed).permutation(pool)[: cfg.train_subset])
        self.labels, self.seed, self.test_fraction = data.train_y, cfg.seed, cfg.test_fraction
        self.parts = [pool[rows] for rows in _partition_rows(cfg, data.train_y[pool])]
        for pid, part in enumerate(self.parts):
            if len(part) < 2:
                raise DataError(f"partition {pid} got {len(part)} images; use fewer clients, a larger "
                                f"data set or a larger dirichlet_alpha ({cfg.dirichlet_alpha})")
        self.splits_of: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.parts)

    def __getitem__(self, pid: int) -> tuple[np.ndarray, np.ndarray]:
        if pid not in self.splits_of:
            rng = np.random.default_rng([self.seed, pid])
            self.splits_of[pid] = stratified_split(self.parts[pid], self.labels, self.test_fraction, rng)
        return self.splits_of[pid]


@lru_cache(maxsize=4)
def _client_splits_cached(cfg_key: tuple) -> _Splits:
    return _Splits(from_dict(dict(cfg_key)))


def splits_of(cfg: ExperimentConfig) -> _Splits:
    return _client_splits_cached(data_key(cfg))


def client_splits(cfg: ExperimentConfig) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """(train indices, test indices) into the training arrays for every partition id;
    ids >= num_clients are the cold-start clients."""
    splits = splits_of(cfg)
    return tuple(splits[pid] for pid in range(len(splits)))


def is_coldstart(cfg: ExperimentConfig, partition_id: int) -> bool:
    return partition_id >= cfg.num_clients


def clear_cache() -> None:
    """Forget what this module memoised in this process."""
    _client_splits_cached.cache_clear()
