"""Decoded images on disk, one ``.npy`` per array (memory-mapped by every process that
reads them), in a folder named by the fingerprint of every file the decoding read."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

import numpy as np

from ..fileio import atomic_write
from .sources import ImageData

log = logging.getLogger(__name__)

# --------------------------------------------------------------------------- caching
_CACHE_ARRAYS = ("train_x", "train_y", "test_x", "test_y")


def _write_cache(folder: Path, data: ImageData) -> None:
    """Write into a temporary folder, then rename it: a reader sees the whole cache or none."""
    folder.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{folder.name}.", dir=folder.parent))
    try:
        for name in _CACHE_ARRAYS:
            atomic_write(tmp / f"{name}.npy", lambda fh, a=getattr(data, name): np.save(fh, a, allow_pickle=False))
        atomic_write(tmp / "class_names.json", json.dumps(data.class_names))
        try:
            os.rename(tmp, folder)
        except OSError:
            if not folder.is_dir():
                raise  # else another process wrote the same cache first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _read_cache(folder: Path) -> ImageData:
    """Images as read-only memory maps: every process (each Ray actor) maps the same
    page-cache pages instead of holding its own copy, and touches only the images it
    indexes. Labels are small: read into memory."""
    arrays = {name: np.load(folder / f"{name}.npy", mmap_mode="r" if name.endswith("_x") else None,
                            allow_pickle=False) for name in _CACHE_ARRAYS}
    names = json.loads((folder / "class_names.json").read_text())
    for split in ("train", "test"):
        x, y = arrays[f"{split}_x"], arrays[f"{split}_y"]
        if x.ndim != 4 or len(x) != len(y):
            raise ValueError(f"{split} arrays do not match: images {x.shape}, labels {y.shape}")
    return ImageData(arrays["train_x"], arrays["train_y"], arrays["test_x"], arrays["test_y"],
                     [str(c) for c in names])


def through_cache(cache_dir: Path, kind: str, source: Path, settings: str,
                   stamp: Callable[[], str], decode: Callable[[], ImageData]) -> ImageData:
    """``decode()`` once per version of ``source``: the cache folder is named by
    ``settings`` and ``stamp()``, the fingerprint of every file decoding reads. A source
    that changed while it was decoded (or was just downloaded) is not cached."""
    before = stamp()
    key = hashlib.sha1(f"{settings}|{before}".encode()).hexdigest()[:16]
    folder = cache_dir / f"{kind}-{key}"
    if folder.is_dir():
        try:
            return _read_cache(folder)
        except Exception as err:  # corrupt cache: rebuild it rather than fail
            log.warning("data cache '%s' is unreadable (%s); decoding '%s' again", folder, err, source)
            shutil.rmtree(folder, ignore_errors=True)
    data = decode()
    if stamp() != before:
        log.warning("'%s' changed while it was read (or was just downloaded): not cached", source)
        return data
    try:
        _write_cache(folder, data)
        log.info("decoded %s once; cached as %s", source, folder)
    except OSError as err:
        log.warning("could not write data cache '%s': %s", folder, err)
    return data
