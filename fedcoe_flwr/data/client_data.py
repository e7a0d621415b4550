"""What a client trains and is scored on, as tensors: its partition or a site's own
folder, the global test set, and the batch iterator."""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from ..config import ExperimentConfig, from_dict
from .cache import through_cache
from .dataset import data_key, dataset_of, federation_classes, load_dataset
from .partition import splits_of
from .sources import (DataError, ImageData, MissingDataError, Mode, check_mode, read_image_folder, source_stamp,
                      with_hint)


# --------------------------------------------------------------------------- tensors
@dataclass
class ClientData:
    """One client's local train and test split as uint8 NCHW tensors."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor

    @property
    def num_train(self) -> int:
        return int(self.train_y.shape[0])


def to_tensor_images(x: np.ndarray) -> torch.Tensor:
    """uint8 NHWC array -> uint8 NCHW tensor in its own (writable) memory, also from a
    read-only memory map."""
    return torch.from_numpy(np.array(x.transpose(0, 3, 1, 2), order="C"))


def normalize(x_uint8: torch.Tensor, pixel_scale: str = "centred") -> torch.Tensor:
    """uint8 NCHW -> float: "centred" in roughly [-2, 2] (fixed constants, so no client needs
    global statistics); "unit" in [0, 1], as NIID-Bench feeds its models."""
    x = x_uint8.float() / 255.0
    return x if pixel_scale == "unit" else (x - 0.5) / 0.25


@lru_cache(maxsize=64)
def _client_data_cached(cfg_key: tuple, partition_id: int) -> ClientData:
    cfg = from_dict(dict(cfg_key))
    data = load_dataset(cfg)
    train_idx, test_idx = splits_of(cfg)[partition_id]
    return ClientData(to_tensor_images(data.train_x[train_idx]), torch.from_numpy(data.train_y[train_idx]),
                      to_tensor_images(data.train_x[test_idx]), torch.from_numpy(data.train_y[test_idx]))


def load_client_data(cfg: ExperimentConfig, partition_id: int) -> ClientData:
    if not 0 <= partition_id < cfg.num_partitions:
        raise DataError(f"partition-id {partition_id} is outside 0..{cfg.num_partitions - 1} "
                        f"(num_clients + num_coldstart_clients)")
    return _client_data_cached(data_key(cfg), partition_id)


def load_global_test(cfg: ExperimentConfig, source: str = "", mode: Mode = "simulation"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The official test set: from ``source`` (a SuperNode's node config global-test-dir)
    or ``cfg.global_test_dir`` when set (an image folder / .tar.gz with ``test/<class>/*``,
    for a server or site that does not hold the data set), else the data set's own test
    split. ``mode`` picks the remedies a MissingDataError names."""
    check_mode(mode)
    origin = "node config global-test-dir" if source else "run config global_test_dir"
    source = source or cfg.global_test_dir
    if source:
        if not cfg.class_names:
            raise DataError(f"global test set '{source}' ({origin}) needs class_names in the run config (the "
                            "federation's label space, comma-separated) to label its test/<class>/ folders")
        path = Path(os.path.expanduser(source))
        names = tuple(federation_classes(cfg))

        def read() -> ImageData:
            if not path.exists():
                raise MissingDataError(f"global test set '{path}' ({origin}) does not exist.")
            return _read_folder_cached(str(path), source_stamp(path), cfg.image_size, names, False)

        data = with_hint(mode, "global test set", read)
    else:  # a deployed node that lacks the data set needs a global test set, not the data set
        data = with_hint(mode, "data set" if mode == "simulation" else "global test set", lambda: dataset_of(cfg))
    idx = np.arange(len(data.test_y))
    if cfg.global_test_subset and cfg.global_test_subset < len(idx):
        idx = np.sort(np.random.default_rng(cfg.seed + 1).permutation(idx)[: cfg.global_test_subset])
    return to_tensor_images(data.test_x[idx]), torch.from_numpy(data.test_y[idx])


# --------------------------------------------------------------------------- site data
# A deployed SuperNode started with --node-config 'data-dir="/data/site-a"' reads only its
# own images: train/<class>/* for training, test/<class>/* as its local test split,
# labelled in the federation's label space (class_names from the run config).
@lru_cache(maxsize=8)
def _read_folder_cached(path: str, stamp: str, size: int, class_names: tuple[str, ...],
                        need_train: bool) -> ImageData:
    """In-process memo of read_image_folder; ``stamp`` (the folder's fingerprint) is in the
    key so that a folder changed since is read again."""
    return read_image_folder(path, size, class_names, need_train)


def load_site_images(data_dir: str | os.PathLike, cfg: ExperimentConfig, need_train: bool = True,
                     cache_dir: str | os.PathLike | None = None) -> ImageData:
    """A site's own image folder / archive mapped onto the federation's label space.
    With ``cache_dir`` the decoded arrays are cached there (a deployed ClientApp is a new
    process per message, so this saves decoding the images every round)."""
    path = Path(os.path.expanduser(str(data_dir)))
    if not path.exists():
        raise MissingDataError(f"site data folder '{path}' (node config data-dir) does not exist; it must "
                               "hold train/<class>/* and test/<class>/* images (or be a .tar.gz of that layout)")
    if not cfg.class_names:
        raise DataError(f"site data '{path}' needs class_names in the run config: the federation's label "
                        "space (comma-separated) that every site's class folders are mapped onto")
    names = tuple(federation_classes(cfg))
    if cache_dir is None:
        return _read_folder_cached(str(path), source_stamp(path), cfg.image_size, names, need_train)
    return through_cache(Path(cache_dir), "site", path, f"{cfg.image_size}|{','.join(names)}|{need_train}",
                          lambda: source_stamp(path),
                          lambda: read_image_folder(path, cfg.image_size, names, need_train))


def load_site_data(data_dir: str | os.PathLike, cfg: ExperimentConfig, need_train: bool = True,
                   cache_dir: str | os.PathLike | None = None) -> ClientData:
    """A site's local train split (its train/ images) and local test split (its test/ images)."""
    d = load_site_images(data_dir, cfg, need_train, cache_dir)
    return ClientData(to_tensor_images(d.train_x), torch.from_numpy(d.train_y),
                      to_tensor_images(d.test_x), torch.from_numpy(d.test_y))


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, device: torch.device,
            generator: torch.Generator | None = None, augment: bool = False, pixel_scale: str = "centred"
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised float batches; shuffled when a generator is given."""
    n = int(y.shape[0])
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        xb = normalize(x[idx].to(device, non_blocking=True), pixel_scale)
        if augment:
            xb = _augment(xb, generator)
        yield xb, y[idx].to(device, non_blocking=True)


def _augment(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Random horizontal flip and 4-pixel-padded random crop, each image its own (the usual
    CIFAR recipe, as torchvision's RandomCrop + RandomHorizontalFlip per image)."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(3), x)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4), mode="reflect")
    offsets = torch.randint(0, 9, (n, 2), generator=generator).tolist()
    # one slice per image: 100x faster on a CPU than one gather with index grids
    return torch.stack([padded[i, :, dy:dy + h, dx:dx + w] for i, (dy, dx) in enumerate(offsets)])


def clear_cache() -> None:
    """Forget what this module memoised in this process."""
    _client_data_cached.cache_clear()
    _read_folder_cached.cache_clear()
