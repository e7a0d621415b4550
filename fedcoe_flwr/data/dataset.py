"""The whole data set of a config, decoded once per source and process."""

from __future__ import annotations

import os
from functools import lru_cache
from pathlib import Path


from ..config import ExperimentConfig, from_dict, keys_of
from .cache import through_cache
from .sources import (TAR_SUFFIXES, TORCHVISION_FOLDERS, DataError, ImageData, MissingDataError, Mode, fingerprint,
                      is_image_folder_source, read_image_folder, scan_files, source_stamp, synthetic_data,
                      torchvision_data, with_hint)


def _data_root(cfg: ExperimentConfig) -> Path:
    return Path(os.path.expanduser(cfg.data_root or "data"))


@lru_cache(maxsize=4)
def _load_dataset_cached(cfg_key: tuple) -> ImageData:
    cfg = from_dict(dict(cfg_key))
    if cfg.dataset == "synthetic":
        return synthetic_data(cfg)
    root = _data_root(cfg)
    if not root.exists() and (cfg.data_root or cfg.dataset not in TORCHVISION_FOLDERS):
        # only an empty data_root (./data) is a place to download into; a named path is read
        raise MissingDataError(f"data_root '{root}' does not exist (it names a local path: read, never "
                               "downloaded to).")
    if root.is_file() and not root.name.endswith(TAR_SUFFIXES):
        raise DataError(f"data_root '{root}' is a file but not a {'/'.join(TAR_SUFFIXES)} archive; it must be "
                        "an image folder, an archive of one, or a torchvision root folder")
    settings = f"{cfg.dataset}|{cfg.image_size}|{cfg.class_names}"
    if cfg.dataset == "imagefolder" or is_image_folder_source(root):
        names = [c.strip() for c in cfg.class_names.split(",") if c.strip()] or None
        return through_cache(Path(cfg.cache_dir), cfg.dataset, root, settings,
                              lambda: source_stamp(root),
                              # labels in the federation's label space
                              lambda: read_image_folder(root, cfg.image_size, names))
    folder = root / TORCHVISION_FOLDERS[cfg.dataset]
    return through_cache(Path(cfg.cache_dir), cfg.dataset, root, settings,
                          lambda: fingerprint(folder, scan_files(folder, lambda rel: True) if folder.is_dir() else []),
                          lambda: torchvision_data(cfg, root))


def data_key(cfg: ExperimentConfig) -> tuple:
    """What the decoded data and the partitions depend on, as a hashable key: the seed and the
    storage and data sections whole (derived from the sections, never a hand-kept list)."""
    values = cfg.to_dict()
    return tuple((k, values[k]) for k in ("seed",) + keys_of("storage", "data"))


def dataset_of(cfg: ExperimentConfig) -> ImageData:
    return _load_dataset_cached(data_key(cfg))


def load_dataset(cfg: ExperimentConfig, mode: Mode = "simulation") -> ImageData:
    """The whole data set, decoded once per source and process (truly shared data).
    ``mode`` picks the remedies a MissingDataError names."""
    return with_hint(mode, "data set", lambda: dataset_of(cfg))


def federation_classes(cfg: ExperimentConfig, mode: Mode = "simulation") -> list[str]:
    """The federation's label space: ``class_names`` from the config when given (sites
    with their own data map their folders onto it), else the data set's classes."""
    if cfg.class_names:
        return [c.strip() for c in cfg.class_names.split(",") if c.strip()]
    return load_dataset(cfg, mode).class_names


def clear_cache() -> None:
    """Forget what this module memoised in this process."""
    _load_dataset_cached.cache_clear()
