"""Data layer: decode once, cache uint8 arrays, partition with flwr-datasets,
split each client 80/20 stratified, everything deterministic from one seed.

Sources: torchvision CIFAR-10/100 (downloaded only into ``./data`` or an existing
folder, when ``download`` is on), any image folder or ``.tar.gz`` with
``train/<class>/*`` and ``test/<class>/*`` (also how a real site's data looks), and a
small generated data set for tests.

Decoded images are cached on disk as one ``.npy`` per array, memory-mapped by every
process that reads them. A cache is named by the size and times of every file its
source's decoding reads (found by one directory walk, no image opened), so a changed,
added, removed or corrupt image is decoded again, never served stale.

Missing data is a :class:`MissingDataError` whose hint depends on ``mode``: ``"simulation"``
(and research-mode deployment: a partition of the data set the run config names) is
fixed through the run config, ``"deployment"`` (a site with its own images) through a
SuperNode's node config.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tarfile
import tempfile
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Callable, Iterator, Literal, NamedTuple, Sequence

import numpy as np
import torch

from .config import ExperimentConfig, from_dict
from .fileio import atomic_write

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".gif", ".webp")
TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")
# the folder under a torchvision root that holds each data set's files
TORCHVISION_FOLDERS = {"cifar10": "cifar-10-batches-py", "cifar100": "cifar-100-python"}

Mode = Literal["simulation", "deployment"]
MODES: tuple[str, ...] = ("simulation", "deployment")
_HINTS = {
    ("simulation", "data set"): (
        "Point the run at a local copy with --run-config \"data_root='/path/to/cifar10-jpg.tar.gz'\" "
        "(an image folder or .tar.gz holding train/<class>/* and test/<class>/*) or at a torchvision root "
        "that already holds the data set (a folder with cifar-10-batches-py/); torchvision downloads it only "
        "with download=true into ./data (data_root='') or an existing folder, on a machine that is online."),
    ("simulation", "global test set"): (
        "Point global_test_dir in the run config at an image folder or .tar.gz with test/<class>/*, or set "
        "it to '' to use the data set's own test split."),
    ("deployment", "data set"): (
        "A deployed site needs no data set: it reads its own images from --node-config 'data-dir=\"/path\"' "
        "(train/<class>/* and test/<class>/*) and labels them with class_names from the run config "
        "(the federation's classes, comma-separated)."),
    ("deployment", "global test set"): (
        "In a deployment the global test set is an image folder or .tar.gz with test/<class>/*: the server "
        "reads it from global_test_dir in the run config (a path on the SuperLink host), a SuperNode from "
        "--node-config 'global-test-dir=\"/path\"'."),
}


class DataError(RuntimeError):
    """Missing, corrupt or unusable data; the message names the file or folder."""


class MissingDataError(DataError):
    """The data is not where the configuration says (as opposed to present but unusable)."""


def _check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def _hinted(mode: str, what: str, load: Callable[[], ImageData]) -> ImageData:
    """``load()``, with the remedies for ``what`` in ``mode`` added to a MissingDataError."""
    _check_mode(mode)
    try:
        return load()
    except MissingDataError as err:
        raise MissingDataError(f"{err} {_HINTS[mode, what]}") from err.__cause__


@dataclass
class ImageData:
    """A whole data set as uint8 NHWC arrays (train split and official test split)."""

    train_x: np.ndarray
    train_y: np.ndarray
    test_x: np.ndarray
    test_y: np.ndarray
    class_names: list[str]

    @property
    def num_classes(self) -> int:
        return len(self.class_names)


# --------------------------------------------------------------------------- sources
def _synthetic(cfg: ExperimentConfig) -> ImageData:
    """Class-conditional smooth patterns plus noise: learnable, tiny, deterministic."""
    rng = np.random.default_rng(12345 + cfg.seed)
    c, s = cfg.synthetic_num_classes, cfg.image_size
    coarse = rng.uniform(0, 255, size=(c, 4, 4, 3))
    protos = coarse.repeat(s // 4 + 1, axis=1).repeat(s // 4 + 1, axis=2)[:, :s, :s]

    def draw(n: int) -> tuple[np.ndarray, np.ndarray]:
        y = np.arange(n) % c
        rng.shuffle(y)
        x = protos[y] + rng.normal(0, 60, size=(n, s, s, 3))
        return np.clip(x, 0, 255).astype(np.uint8), y.astype(np.int64)

    tx, ty = draw(cfg.synthetic_train_size)
    vx, vy = draw(cfg.synthetic_test_size)
    return ImageData(tx, ty, vx, vy, [f"class{i}" for i in range(c)])


def decode_image(blob: bytes, name: str, size: int) -> np.ndarray:
    from PIL import Image, UnidentifiedImageError

    try:
        img = Image.open(io.BytesIO(blob)).convert("RGB")
    except (UnidentifiedImageError, OSError) as err:
        raise DataError(f"cannot decode image '{name}': {err}") from err
    if img.size != (size, size):
        img = img.resize((size, size))
    return np.asarray(img, dtype=np.uint8)


def _split_member(path: str) -> tuple[str, str] | None:
    """'x/train/cat/1.jpg' -> ('train', 'cat'); None for non-image paths."""
    if not path.lower().endswith(IMAGE_SUFFIXES):
        return None
    parts = [p for p in path.split("/") if p not in ("", ".")]  # as PurePosixPath.parts, 10x faster
    if len(parts) < 3:
        return None
    split, cls = parts[-3], parts[-2]
    return (split, cls) if split in ("train", "test") else None


def _collect(items: Iterator[tuple[str, bytes]], source: str, size: int,
             class_names: Sequence[str] | None, need_train: bool = True) -> ImageData:
    images: dict[str, list[np.ndarray]] = {"train": [], "test": []}
    labels: dict[str, list[str]] = {"train": [], "test": []}
    folder_of: dict[str, str] = {}  # class -> the first folder it was found in (for errors)
    for name, blob in items:
        split, cls = _split_member(name)  # type: ignore[misc]
        folder_of.setdefault(cls, str(Path(name).parent))
        images[split].append(decode_image(blob, f"{source}:{name}", size))
        labels[split].append(cls)
    if need_train and not images["train"]:
        raise DataError(f"'{source}' holds no images under train/<class>/ (image-folder layout expected)")
    if not images["test"]:
        raise DataError(f"'{source}' holds no images under test/<class>/ (image-folder layout expected)")
    found = sorted(set(labels["train"]) | set(labels["test"]))
    names = list(class_names) if class_names else found
    unknown = sorted(set(found) - set(names))
    if unknown:
        folders = ", ".join(f"'{folder_of[c]}'" for c in unknown)
        raise DataError(f"'{source}' has class folder(s) {unknown} the federation does not know "
                        f"(found in {folders}; known: {names}, the run config's class_names)")
    index = {n: i for i, n in enumerate(names)}

    def stack(split: str) -> np.ndarray:
        return np.stack(images[split]) if images[split] else np.zeros((0, size, size, 3), dtype=np.uint8)

    return ImageData(
        stack("train"), np.array([index[c] for c in labels["train"]], dtype=np.int64),
        stack("test"), np.array([index[c] for c in labels["test"]], dtype=np.int64),
        names,
    )


class _FileStamp(NamedTuple):
    rel: str  # '/'-separated path relative to the source
    size: int
    mtime_ns: int
    ctime_ns: int  # also moves when a copy keeps the old mtime (cp -p, rsync -t)


def _scan(root: Path, keep: Callable[[str], bool]) -> list[_FileStamp]:
    """Every file under ``root`` whose relative path ``keep`` accepts, with its size and
    times, from one ``os.scandir`` walk; no file is opened. The order is Path.rglob's
    sorted order (the order images are decoded in), and like rglob the walk does not
    enter symlinked folders; an unreadable folder is an error, not silently skipped."""
    found: list[_FileStamp] = []

    def walk(folder: str, prefix: str) -> None:
        with os.scandir(folder) as it:
            entries = sorted(it, key=lambda e: e.name)
        for entry in entries:
            rel = prefix + entry.name
            if entry.is_dir(follow_symlinks=False):
                walk(entry.path, rel + "/")
            elif keep(rel) and entry.is_file():
                st = entry.stat()
                found.append(_FileStamp(rel, st.st_size, st.st_mtime_ns, st.st_ctime_ns))

    try:
        walk(str(root), "")
    except OSError as err:
        raise DataError(f"cannot list '{err.filename or root}': {err.strerror or err}") from err
    return found


def _source_files(path: Path) -> list[_FileStamp]:
    """The files decoding ``path`` reads: an archive itself, or a folder's
    train|test/<class>/ images."""
    if path.is_file():
        st = path.stat()
        return [_FileStamp(path.name, st.st_size, st.st_mtime_ns, st.st_ctime_ns)]
    return _scan(path, lambda rel: _split_member(rel) is not None)


def _fingerprint(path: Path, files: Sequence[_FileStamp]) -> str:
    h = hashlib.sha1(str(path.resolve()).encode())
    for f in files:
        h.update(f"\n{f.rel}|{f.size}|{f.mtime_ns}|{f.ctime_ns}".encode())
    return h.hexdigest()


def _source_stamp(path: Path) -> str:
    return _fingerprint(path, _source_files(path))


def _iter_tar(path: Path) -> Iterator[tuple[str, bytes]]:
    try:
        with tarfile.open(path) as tar:
            for member in tar:
                if member.isfile() and _split_member(member.name):
                    fh = tar.extractfile(member)
                    if fh is not None:
                        yield member.name, fh.read()
    except (tarfile.TarError, EOFError, OSError) as err:
        raise DataError(f"cannot read archive '{path}': {err}") from err


def _iter_folder(path: Path) -> Iterator[tuple[str, bytes]]:
    for f in _source_files(path):
        try:
            blob = (path / f.rel).read_bytes()
        except OSError as err:
            raise DataError(f"cannot read image '{path / f.rel}': {err.strerror or err}") from err
        yield f.rel, blob


def is_image_folder_source(path: Path) -> bool:
    if path.is_file():
        return path.name.endswith(TAR_SUFFIXES)
    return path.is_dir() and any(p.is_dir() for p in path.glob("**/train"))


def read_image_folder(path: str | Path, size: int = 32,
                      class_names: Sequence[str] | None = None, need_train: bool = True) -> ImageData:
    """An image folder or archive with ``train/<class>/*`` and ``test/<class>/*``; labels
    follow ``class_names`` when given (a class folder outside it is an error naming it).
    ``need_train=False`` accepts a folder with only ``test/`` (a global test set, a
    cold-start site)."""
    path = Path(path)
    if not path.exists():
        raise MissingDataError(f"image folder or archive '{path}' does not exist.")
    items = _iter_tar(path) if path.is_file() else _iter_folder(path)
    return _collect(items, str(path), size, class_names, need_train)


def _torchvision(cfg: ExperimentConfig, root: Path) -> ImageData:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if cfg.dataset == "cifar10" else torchvision.datasets.CIFAR100
    try:
        train = cls(str(root), train=True, download=cfg.download)
        test = cls(str(root), train=False, download=cfg.download)
    except Exception as err:  # offline download failure, missing files, corrupt batches
        raise MissingDataError(f"{cfg.dataset} not found or unreadable under '{root}' "
                               f"(download={cfg.download}; torchvision: {err}).") from err
    return ImageData(np.asarray(train.data), np.asarray(train.targets, dtype=np.int64),
                     np.asarray(test.data), np.asarray(test.targets, dtype=np.int64),
                     list(train.classes))


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


def _through_cache(cache_dir: Path, kind: str, source: Path, settings: str,
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


def _data_root(cfg: ExperimentConfig) -> Path:
    return Path(os.path.expanduser(cfg.data_root or "data"))


@lru_cache(maxsize=4)
def _load_dataset_cached(cfg_key: tuple) -> ImageData:
    cfg = from_dict(dict(cfg_key))
    if cfg.dataset == "synthetic":
        return _synthetic(cfg)
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
        return _through_cache(Path(cfg.cache_dir), cfg.dataset, root, settings,
                              lambda: _source_stamp(root),
                              # labels in the federation's label space
                              lambda: read_image_folder(root, cfg.image_size, names))
    folder = root / TORCHVISION_FOLDERS[cfg.dataset]
    return _through_cache(Path(cfg.cache_dir), cfg.dataset, root, settings,
                          lambda: _fingerprint(folder, _scan(folder, lambda rel: True) if folder.is_dir() else []),
                          lambda: _torchvision(cfg, root))


DATA_KEYS = ("dataset", "data_root", "download", "cache_dir", "seed", "image_size", "class_names",
             "synthetic_train_size", "synthetic_test_size", "synthetic_num_classes")


def _dataset(cfg: ExperimentConfig) -> ImageData:
    return _load_dataset_cached(tuple((k, getattr(cfg, k)) for k in DATA_KEYS))


def load_dataset(cfg: ExperimentConfig, mode: Mode = "simulation") -> ImageData:
    """The whole data set, decoded once per source and process (truly shared data).
    ``mode`` picks the remedies a MissingDataError names."""
    return _hinted(mode, "data set", lambda: _dataset(cfg))


def federation_classes(cfg: ExperimentConfig, mode: Mode = "simulation") -> list[str]:
    """The federation's label space: ``class_names`` from the config when given (sites
    with their own data map their folders onto it), else the data set's classes."""
    if cfg.class_names:
        return [c.strip() for c in cfg.class_names.split(",") if c.strip()]
    return load_dataset(cfg, mode).class_names


# --------------------------------------------------------------------------- partitions
def _partitioner(cfg: ExperimentConfig):
    from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner, PathologicalPartitioner

    n = cfg.num_partitions
    if cfg.partition == "dirichlet":
        return DirichletPartitioner(num_partitions=n, partition_by="label", alpha=cfg.dirichlet_alpha,
                                    min_partition_size=cfg.min_partition_size, self_balancing=False,
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


PARTITION_KEYS = DATA_KEYS + ("num_clients", "num_coldstart_clients", "partition", "dirichlet_alpha",
                              "classes_per_client", "min_partition_size", "test_fraction",
                              "train_subset")


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
        self._splits: dict[int, tuple[np.ndarray, np.ndarray]] = {}

    def __len__(self) -> int:
        return len(self.parts)

    def __getitem__(self, pid: int) -> tuple[np.ndarray, np.ndarray]:
        if pid not in self._splits:
            rng = np.random.default_rng([self.seed, pid])
            self._splits[pid] = stratified_split(self.parts[pid], self.labels, self.test_fraction, rng)
        return self._splits[pid]


@lru_cache(maxsize=4)
def _client_splits_cached(cfg_key: tuple) -> _Splits:
    return _Splits(from_dict(dict(cfg_key)))


def _splits(cfg: ExperimentConfig) -> _Splits:
    return _client_splits_cached(tuple((k, getattr(cfg, k)) for k in PARTITION_KEYS))


def client_splits(cfg: ExperimentConfig) -> tuple[tuple[np.ndarray, np.ndarray], ...]:
    """(train indices, test indices) into the training arrays for every partition id;
    ids >= num_clients are the cold-start clients."""
    splits = _splits(cfg)
    return tuple(splits[pid] for pid in range(len(splits)))


def is_coldstart(cfg: ExperimentConfig, partition_id: int) -> bool:
    return partition_id >= cfg.num_clients


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


def normalize(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> float in roughly [-2, 2]; fixed constants so no client needs global stats."""
    return (x_uint8.float() / 255.0 - 0.5) / 0.25


@lru_cache(maxsize=64)
def _client_data_cached(cfg_key: tuple, partition_id: int) -> ClientData:
    cfg = from_dict(dict(cfg_key))
    data = load_dataset(cfg)
    train_idx, test_idx = _splits(cfg)[partition_id]
    return ClientData(to_tensor_images(data.train_x[train_idx]), torch.from_numpy(data.train_y[train_idx]),
                      to_tensor_images(data.train_x[test_idx]), torch.from_numpy(data.train_y[test_idx]))


def load_client_data(cfg: ExperimentConfig, partition_id: int) -> ClientData:
    if not 0 <= partition_id < cfg.num_partitions:
        raise DataError(f"partition-id {partition_id} is outside 0..{cfg.num_partitions - 1} "
                        f"(num_clients + num_coldstart_clients)")
    return _client_data_cached(tuple((k, getattr(cfg, k)) for k in PARTITION_KEYS), partition_id)


def load_global_test(cfg: ExperimentConfig, source: str = "", mode: Mode = "simulation"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """The official test set: from ``source`` (a SuperNode's node config global-test-dir)
    or ``cfg.global_test_dir`` when set (an image folder / .tar.gz with ``test/<class>/*``,
    for a server or site that does not hold the data set), else the data set's own test
    split. ``mode`` picks the remedies a MissingDataError names."""
    _check_mode(mode)
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
            return _read_folder_cached(str(path), _source_stamp(path), cfg.image_size, names, False)

        data = _hinted(mode, "global test set", read)
    else:  # a deployed node that lacks the data set needs a global test set, not the data set
        data = _hinted(mode, "data set" if mode == "simulation" else "global test set", lambda: _dataset(cfg))
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
        return _read_folder_cached(str(path), _source_stamp(path), cfg.image_size, names, need_train)
    return _through_cache(Path(cache_dir), "site", path, f"{cfg.image_size}|{','.join(names)}|{need_train}",
                          lambda: _source_stamp(path),
                          lambda: read_image_folder(path, cfg.image_size, names, need_train))


def load_site_data(data_dir: str | os.PathLike, cfg: ExperimentConfig, need_train: bool = True,
                   cache_dir: str | os.PathLike | None = None) -> ClientData:
    """A site's local train split (its train/ images) and local test split (its test/ images)."""
    d = load_site_images(data_dir, cfg, need_train, cache_dir)
    return ClientData(to_tensor_images(d.train_x), torch.from_numpy(d.train_y),
                      to_tensor_images(d.test_x), torch.from_numpy(d.test_y))


def batches(x: torch.Tensor, y: torch.Tensor, batch_size: int, device: torch.device,
            generator: torch.Generator | None = None, augment: bool = False
            ) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Normalised float batches; shuffled when a generator is given."""
    n = int(y.shape[0])
    order = torch.randperm(n, generator=generator) if generator is not None else torch.arange(n)
    for start in range(0, n, batch_size):
        idx = order[start:start + batch_size]
        xb = normalize(x[idx].to(device, non_blocking=True))
        if augment:
            xb = _augment(xb, generator)
        yield xb, y[idx].to(device, non_blocking=True)


def _augment(x: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Random horizontal flip and 4-pixel-padded random crop (the usual CIFAR recipe)."""
    n, _, h, w = x.shape
    flip = torch.rand(n, generator=generator) < 0.5
    x = torch.where(flip.to(x.device)[:, None, None, None], x.flip(3), x)
    padded = torch.nn.functional.pad(x, (4, 4, 4, 4), mode="reflect")
    dx, dy = torch.randint(0, 9, (2,), generator=generator).tolist()
    return padded[:, :, dy:dy + h, dx:dx + w]
