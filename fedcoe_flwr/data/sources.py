"""Where images come from: image folders and archives in the train|test/<class>/ layout
(scanned without opening a file, decoded once), torchvision's CIFAR folders, a generated
data set for tests; the errors and the remedies each mode's hint names."""

from __future__ import annotations

import hashlib
import io
import os
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterator, Literal, NamedTuple, Sequence

import numpy as np

from ..config import ExperimentConfig


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


def check_mode(mode: str) -> None:
    if mode not in MODES:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def with_hint(mode: str, what: str, load: Callable[[], ImageData]) -> ImageData:
    """``load()``, with the remedies for ``what`` in ``mode`` added to a MissingDataError."""
    check_mode(mode)
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
def synthetic_data(cfg: ExperimentConfig) -> ImageData:
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


def scan_files(root: Path, keep: Callable[[str], bool]) -> list[_FileStamp]:
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
    return scan_files(path, lambda rel: _split_member(rel) is not None)


def fingerprint(path: Path, files: Sequence[_FileStamp]) -> str:
    h = hashlib.sha1(str(path.resolve()).encode())
    for f in files:
        h.update(f"\n{f.rel}|{f.size}|{f.mtime_ns}|{f.ctime_ns}".encode())
    return h.hexdigest()


def source_stamp(path: Path) -> str:
    return fingerprint(path, _source_files(path))


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


def torchvision_data(cfg: ExperimentConfig, root: Path) -> ImageData:
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
