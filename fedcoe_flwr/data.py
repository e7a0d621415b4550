"""Data layer: decode once, cache uint8 arrays, partition with flwr-datasets,
split each client 80/20 stratified, everything deterministic from one seed.

Sources: torchvision CIFAR-10/100 (downloaded when online), any image folder or
``.tar.gz`` with ``train/<class>/*`` and ``test/<class>/*`` (also how a real site's
data looks), and a small generated data set for tests.
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import tarfile
import warnings
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterator, Sequence

import numpy as np
import torch

from .config import ExperimentConfig, from_dict

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".ppm", ".gif", ".webp")
TAR_SUFFIXES = (".tar.gz", ".tgz", ".tar")
MISSING_DATA_HINT = (
    "This machine may be offline: point the run at a local copy with "
    "--run-config \"data_root='/path/to/cifar10-jpg.tar.gz'\" (an image folder or .tar.gz "
    "holding train/<class>/* and test/<class>/*), or at a torchvision root that already "
    "holds the data set (e.g. cifar-10-batches-py/)."
)


class DataError(RuntimeError):
    """Missing, corrupt or unusable data; the message names the file or folder."""


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
    parts = Path(path).parts
    if len(parts) < 3 or not path.lower().endswith(IMAGE_SUFFIXES):
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
    for file in sorted(path.rglob("*")):
        rel = str(file.relative_to(path))
        if file.is_file() and _split_member(rel):
            yield rel, file.read_bytes()


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
        raise DataError(f"data '{path}' does not exist. {MISSING_DATA_HINT}")
    items = _iter_tar(path) if path.is_file() else _iter_folder(path)
    return _collect(items, str(path), size, class_names, need_train)


def _torchvision(cfg: ExperimentConfig, root: Path) -> ImageData:
    import torchvision

    cls = torchvision.datasets.CIFAR10 if cfg.dataset == "cifar10" else torchvision.datasets.CIFAR100
    try:
        train = cls(str(root), train=True, download=cfg.download)
        test = cls(str(root), train=False, download=cfg.download)
    except Exception as err:  # offline download failure, missing files, corrupt batches
        raise DataError(f"{cfg.dataset} not found or unreadable under '{root}' ({err}). "
                        f"{MISSING_DATA_HINT}") from err
    return ImageData(np.asarray(train.data), np.asarray(train.targets, dtype=np.int64),
                     np.asarray(test.data), np.asarray(test.targets, dtype=np.int64),
                     list(train.classes))


# --------------------------------------------------------------------------- caching
def _source_key(cfg: ExperimentConfig, path: Path) -> str:
    stat = path.stat() if path.exists() else None
    raw = f"{cfg.dataset}|{path.resolve()}|{stat.st_size if stat else 0}|" \
          f"{stat.st_mtime_ns if stat else 0}|{cfg.image_size}"
    if cfg.class_names:  # labels depend on the label space (existing cache names stay valid)
        raw += f"|{cfg.class_names}"
    return hashlib.sha1(raw.encode()).hexdigest()[:16]


def _write_npz_atomic(path: Path, data: ImageData) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}.npz")
    np.savez(tmp, train_x=data.train_x, train_y=data.train_y, test_x=data.test_x,
             test_y=data.test_y, class_names=np.array(data.class_names))
    os.replace(tmp, path)


def _mmap_npz(path: Path) -> dict[str, np.ndarray] | None:
    """The members of an uncompressed .npz (what ``np.savez`` writes) as read-only memory
    maps: every process (each Ray actor) maps the same page-cache pages instead of reading
    and holding its own copy of the whole data set, and touches only the images it
    indexes. None when a member is compressed or not a plain array (then np.load)."""
    import zipfile

    out: dict[str, np.ndarray] = {}
    with zipfile.ZipFile(path) as zf, open(path, "rb") as fh:
        for info in zf.infolist():
            if info.compress_type != zipfile.ZIP_STORED or not info.filename.endswith(".npy"):
                return None
            fh.seek(info.header_offset)
            local = fh.read(30)
            if local[:4] != b"PK\x03\x04":
                return None
            name_len, extra_len = int.from_bytes(local[26:28], "little"), int.from_bytes(local[28:30], "little")
            fh.seek(info.header_offset + 30 + name_len + extra_len)
            version = np.lib.format.read_magic(fh)
            shape, fortran, dtype = (np.lib.format.read_array_header_1_0(fh) if version == (1, 0)
                                     else np.lib.format.read_array_header_2_0(fh))
            if dtype.hasobject:
                return None
            name = info.filename[:-4]
            if int(np.prod(shape)) == 0:
                out[name] = np.zeros(shape, dtype=dtype)
                continue
            out[name] = np.memmap(path, dtype=dtype, mode="r", offset=fh.tell(), shape=shape,
                                  order="F" if fortran else "C")
    return out


def _read_npz(path: Path) -> ImageData:
    arrays = _mmap_npz(path)
    if arrays is None:
        with np.load(path) as z:
            arrays = {k: z[k] for k in z.files}
    return ImageData(arrays["train_x"], np.asarray(arrays["train_y"]), arrays["test_x"],
                     np.asarray(arrays["test_y"]), [str(c) for c in arrays["class_names"]])


def _data_root(cfg: ExperimentConfig) -> Path:
    return Path(os.path.expanduser(cfg.data_root or "data"))


@lru_cache(maxsize=4)
def _load_dataset_cached(cfg_key: tuple) -> ImageData:
    cfg = from_dict(dict(cfg_key))
    if cfg.dataset == "synthetic":
        return _synthetic(cfg)
    root = _data_root(cfg)
    cache = Path(cfg.cache_dir) / f"{cfg.dataset}-{_source_key(cfg, root)}.npz"
    if cache.is_file():
        try:
            return _read_npz(cache)  # memory-mapped: shared by every process on the machine
        except Exception as err:  # corrupt cache: rebuild it rather than fail
            log.warning("cache '%s' is unreadable (%s); decoding the source again", cache, err)
    if cfg.dataset == "imagefolder" or is_image_folder_source(root):
        names = [c.strip() for c in cfg.class_names.split(",") if c.strip()] or None
        data = read_image_folder(root, cfg.image_size, names)  # labels in the federation's label space
    elif cfg.dataset in ("cifar10", "cifar100"):
        data = _torchvision(cfg, root)
    else:
        raise DataError(f"data_root '{root}' is not an image folder or .tar.gz. {MISSING_DATA_HINT}")
    try:
        _write_npz_atomic(cache, data)
        log.info("decoded %s once; cached as %s", root, cache)
    except OSError as err:
        log.warning("could not write data cache '%s': %s", cache, err)
    return data


DATA_KEYS = ("dataset", "data_root", "download", "cache_dir", "seed", "image_size", "class_names",
             "synthetic_train_size", "synthetic_test_size", "synthetic_num_classes")


def load_dataset(cfg: ExperimentConfig) -> ImageData:
    """The whole data set, decoded once per source and process (truly shared data)."""
    return _load_dataset_cached(tuple((k, getattr(cfg, k)) for k in DATA_KEYS))


def federation_classes(cfg: ExperimentConfig) -> list[str]:
    """The federation's label space: ``class_names`` from the config when given (sites
    with their own data map their folders onto it), else the data set's classes."""
    if cfg.class_names:
        return [c.strip() for c in cfg.class_names.split(",") if c.strip()]
    return load_dataset(cfg).class_names


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


def client_split(cfg: ExperimentConfig, partition_id: int) -> tuple[np.ndarray, np.ndarray]:
    """One client's (train indices, test indices); only this client's split is computed."""
    return _splits(cfg)[partition_id]


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
    return torch.from_numpy(np.ascontiguousarray(x)).permute(0, 3, 1, 2).contiguous()


def normalize(x_uint8: torch.Tensor) -> torch.Tensor:
    """uint8 NCHW -> float in roughly [-2, 2]; fixed constants so no client needs global stats."""
    return (x_uint8.float() / 255.0 - 0.5) / 0.25


@lru_cache(maxsize=64)
def _client_data_cached(cfg_key: tuple, partition_id: int) -> ClientData:
    cfg = from_dict(dict(cfg_key))
    data = load_dataset(cfg)
    train_idx, test_idx = client_split(cfg, partition_id)
    return ClientData(to_tensor_images(data.train_x[train_idx]), torch.from_numpy(data.train_y[train_idx]),
                      to_tensor_images(data.train_x[test_idx]), torch.from_numpy(data.train_y[test_idx]))


def load_client_data(cfg: ExperimentConfig, partition_id: int) -> ClientData:
    if not 0 <= partition_id < cfg.num_partitions:
        raise DataError(f"partition-id {partition_id} is outside 0..{cfg.num_partitions - 1} "
                        f"(num_clients + num_coldstart_clients)")
    return _client_data_cached(tuple((k, getattr(cfg, k)) for k in PARTITION_KEYS), partition_id)


def load_global_test(cfg: ExperimentConfig, source: str = "") -> tuple[torch.Tensor, torch.Tensor]:
    """The official test set: from ``source`` or ``cfg.global_test_dir`` when set (an image
    folder / .tar.gz with ``test/<class>/*``, for a server or site that does not hold the
    data set), else the data set's own test split."""
    source = source or cfg.global_test_dir
    if source:
        if not cfg.class_names:
            raise DataError(f"global_test_dir '{source}' needs class_names in the config (the "
                            "federation's label space, comma-separated) to label its test/<class>/ folders")
        data = _read_folder_cached(str(Path(os.path.expanduser(source))), cfg.image_size,
                                   tuple(federation_classes(cfg)), False)
    else:
        data = load_dataset(cfg)
    idx = np.arange(len(data.test_y))
    if cfg.global_test_subset and cfg.global_test_subset < len(idx):
        idx = np.sort(np.random.default_rng(cfg.seed + 1).permutation(idx)[: cfg.global_test_subset])
    return to_tensor_images(data.test_x[idx]), torch.from_numpy(data.test_y[idx])


# --------------------------------------------------------------------------- site data
# A deployed SuperNode started with --node-config 'data-dir="/data/site-a"' reads only its
# own images: train/<class>/* for training, test/<class>/* as its local test split,
# labelled in the federation's label space (class_names from the run config).
@lru_cache(maxsize=8)
def _read_folder_cached(path: str, size: int, class_names: tuple[str, ...], need_train: bool) -> ImageData:
    return read_image_folder(path, size, class_names, need_train)


def _folder_fingerprint(path: Path) -> str:
    """Changes when any image of the folder/archive is added, removed or rewritten."""
    h = hashlib.sha1(str(path.resolve()).encode())
    files = [path] if path.is_file() else sorted(f for f in path.rglob("*") if f.is_file())
    for f in files:
        st = f.stat()
        h.update(f"{f.relative_to(path) if f != path else f.name}|{st.st_size}|{st.st_mtime_ns}".encode())
    return h.hexdigest()[:16]


def load_site_images(data_dir: str | os.PathLike, cfg: ExperimentConfig, need_train: bool = True,
                     cache_dir: str | os.PathLike | None = None) -> ImageData:
    """A site's own image folder / archive mapped onto the federation's label space.
    With ``cache_dir`` the decoded arrays are kept as .npz there (a deployed ClientApp is a
    new process per message, so this saves decoding the images every round)."""
    path = Path(os.path.expanduser(str(data_dir)))
    if not path.exists():
        raise DataError(f"site data folder '{path}' (node config data-dir) does not exist; it must hold "
                        "train/<class>/* and test/<class>/* images (or be a .tar.gz of that layout)")
    if not cfg.class_names:
        raise DataError(f"site data '{path}' needs class_names in the run config: the federation's label "
                        "space (comma-separated) that every site's class folders are mapped onto")
    names = tuple(federation_classes(cfg))
    if cache_dir is None:
        return _read_folder_cached(str(path), cfg.image_size, names, need_train)
    key = hashlib.sha1(f"{_folder_fingerprint(path)}|{cfg.image_size}|{','.join(names)}|{need_train}"
                       .encode()).hexdigest()[:16]
    cache = Path(cache_dir) / f"site-{key}.npz"
    if cache.is_file():
        try:
            with np.load(cache) as z:
                return ImageData(z["train_x"], z["train_y"], z["test_x"], z["test_y"],
                                 [str(c) for c in z["class_names"]])
        except Exception as err:  # corrupt cache: decode again
            log.warning("site data cache '%s' is unreadable (%s); decoding the images again", cache, err)
    data = _read_folder_cached(str(path), cfg.image_size, names, need_train)
    try:
        _write_npz_atomic(cache, data)
    except OSError as err:
        log.warning("could not write site data cache '%s': %s", cache, err)
    return data


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
