"""The experiment config in typed sections, loaded from YAML, overridden from
``--run-config`` and validated once before any training starts.

YAML files and ``--run-config`` use flat keys (``lr: 0.05``); every key belongs to
exactly one generic section (run, storage, data, model -- the attribute ``network`` --,
training, onboarding) or to the parameter sections of the methods that read it
(``cfg.methods[name]``; the running method's is ``cfg.params``; each method declares its
``Params`` in its own module under ``algorithms/``). Keys are unique across the generic sections, so a flat read ``cfg.lr`` is the same as
``cfg.training.lr``. Every key list (all keys, those that define a checkpoint, those a
method ignores) is derived from the sections."""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import yaml

from . import algorithms

DATASETS = ("cifar10", "cifar100", "imagefolder", "synthetic")
PARTITIONS = ("dirichlet", "pathological", "iid")
MODELS = ("cnn", "resnet_moe")
NORMS = ("batch", "group", "none")
DEVICES = ("auto", "cpu", "cuda")
ROBUST_RULES = ("mean", "median", "trimmed_mean")

# The run-config value that means "not overridden: keep the YAML / default value".
# Flower fuses pyproject defaults with overrides before the ServerApp sees them, so
# an explicit sentinel is the only way to tell "user asked for X" from "default".
UNSET = "<yaml>"
RUN_NAME = re.compile(r"[A-Za-z0-9_.-]+")


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the key and the value."""


class Section:
    """Base of every config section: ``check`` raises ConfigError for a bad value."""

    # a method's keys that a serving run may set anew (how a new site adapts, not what was trained)
    adaptation_keys: tuple[str, ...] = ()

    def check(self, cfg: "ExperimentConfig") -> None:
        """The section's own values (every section, whichever method runs)."""
        return None

    def check_selected(self, cfg: "ExperimentConfig") -> None:
        """A method's demands on the rest of the config, checked only when it is the one that runs."""
        return None


def bad_value(key: str, value: Any, allowed: str) -> ConfigError:
    return ConfigError(f"config key '{key}' = {value!r} is not allowed: {allowed}")


def require(section: Any, ge0: tuple[str, ...] = (), ge1: tuple[str, ...] = (), gt0: tuple[str, ...] = (),
            choices: Mapping[str, tuple[str, ...]] | None = None) -> None:
    """The common range checks of a section's keys."""
    for key, options in (choices or {}).items():
        if getattr(section, key) not in options:
            raise bad_value(key, getattr(section, key), f"choose one of {', '.join(options)}")
    for keys, ok, allowed in ((ge0, lambda v: v >= 0, "must be >= 0"), (ge1, lambda v: v >= 1, "must be >= 1"),
                              (gt0, lambda v: v > 0, "must be > 0")):
        for key in keys:
            if not ok(getattr(section, key)):
                raise bad_value(key, getattr(section, key), allowed)


@dataclass(frozen=True)
class RunSection(Section):
    run_name: str = ""  # "" -> "<config stem>-<algorithm>-s<seed>"
    seed: int = 0
    algorithm: str = algorithms.DEFAULT
    num_rounds: int = 30
    eval_every: int = 5  # 0: never evaluate (training-only runs, e.g. benchmarks)
    fraction_train: float = 1.0  # share of training clients sampled each round
    min_reply_fraction: float = 0.5  # a round fails below this share of replies
    device: str = "auto"
    round_timeout: float = 3600.0  # seconds to wait for replies in one round
    wait_for_nodes: float = 0.0  # seconds to wait for all SuperNodes to connect (deployment)
    max_update_norm_ratio: float = 100.0  # reject ||update|| > ratio * (||global|| + 1); 0 = off
    robust_aggregation: str = "mean"  # mean | median | trimmed_mean (experts / FedAvg model)
    trim_fraction: float = 0.1  # share trimmed at each end by trimmed_mean
    resume: bool = False  # continue from the last checkpoint of this run name
    resume_from: str = ""  # or from this checkpoint file
    keep_checkpoints: int = 3

    def check(self, cfg: "ExperimentConfig") -> None:
        require(self, ge0=("eval_every", "seed", "max_update_norm_ratio", "wait_for_nodes"),
                ge1=("num_rounds", "keep_checkpoints"), gt0=("round_timeout",),
                choices={"algorithm": tuple(algorithms.REGISTRY), "device": DEVICES,
                         "robust_aggregation": ROBUST_RULES})
        for key in ("fraction_train", "min_reply_fraction"):
            if not 0 < getattr(self, key) <= 1:
                raise bad_value(key, getattr(self, key), "must be in (0, 1]")
        if not 0 <= self.trim_fraction < 0.5:
            raise bad_value("trim_fraction", self.trim_fraction, "must be in [0, 0.5)")
        if self.run_name and (not RUN_NAME.fullmatch(self.run_name) or self.run_name in (".", "..")):
            raise bad_value("run_name", self.run_name, "a plain name: letters, digits, '-', '_', '.' "
                                                       "(not '.' or '..', no path separators)")


@dataclass(frozen=True)
class StorageSection(Section):
    """Where things are on this host: never part of what a checkpoint must match."""

    results_dir: str = "results"
    data_root: str = ""  # image folder / .tar.gz / torchvision root; "" -> ./data
    download: bool = True  # torchvision download when data_root is a folder without a copy
    cache_dir: str = ".cache/fedcoe_flwr"
    global_test_dir: str = ""  # image folder / .tar.gz with test/<class>/* for global accuracy (deployment)


@dataclass(frozen=True)
class DataSection(Section):
    """Which data, how it is split among clients: defines the partitions."""

    dataset: str = "cifar10"
    class_names: str = ""  # comma-separated label space; "" -> the data set's own classes
    num_clients: int = 20  # N training clients
    num_coldstart_clients: int = 5  # M cold-start clients (never train)
    partition: str = "dirichlet"
    dirichlet_alpha: float = 0.1
    classes_per_client: int = 2  # pathological partition
    min_partition_size: int = 10
    test_fraction: float = 0.2  # local train/test split of each client
    train_subset: int = 0  # >0: partition only this many training images
    global_test_subset: int = 0  # >0: global test set limited to this many
    synthetic_train_size: int = 2000
    synthetic_test_size: int = 500
    synthetic_num_classes: int = 10
    image_size: int = 32  # images are resized to image_size x image_size
    augment: bool = False

    def check(self, cfg: "ExperimentConfig") -> None:
        require(self, ge0=("num_coldstart_clients", "train_subset", "global_test_subset", "min_partition_size"),
                ge1=("num_clients", "synthetic_train_size", "synthetic_test_size", "classes_per_client"),
                gt0=("dirichlet_alpha",), choices={"dataset": DATASETS, "partition": PARTITIONS})
        if self.num_coldstart_clients > self.num_clients:
            raise bad_value("num_coldstart_clients", self.num_coldstart_clients,
                            f"must not exceed num_clients ({self.num_clients})")
        if not 0 < self.test_fraction < 1:
            raise bad_value("test_fraction", self.test_fraction, "must be in (0, 1)")
        if self.image_size < 8:
            raise bad_value("image_size", self.image_size, "must be >= 8")
        names = [n.strip() for n in self.class_names.split(",")] if self.class_names.strip() else []
        if any(not n for n in names):
            raise bad_value("class_names", self.class_names, "class names must not be empty")
        duplicates = sorted({n for n in names if names.count(n) > 1})
        if duplicates:
            raise bad_value("class_names", self.class_names, f"{', '.join(duplicates)} appear(s) more than once")
        if self.dataset == "imagefolder" and not cfg.storage.data_root:
            raise bad_value("data_root", cfg.storage.data_root,
                            "dataset 'imagefolder' needs data_root (a folder or .tar.gz)")


@dataclass(frozen=True)
class ModelSection(Section):
    model: str = "cnn"  # expert architecture (and the single model of FedAvg/FedProx)
    width_multiplier: float = 1.0  # >1 for capacity-matched FedAvg
    cnn_hidden: int = 0  # units of the small CNN's first FC layer; 0 = 512 x width_multiplier
    resnet_depth: int = 8  # CIFAR ResNet, 6n+2
    resnet_width: int = 16
    inner_experts: int = 2  # E_in: MoE experts inside each ResNet-MoE convolution
    inner_top_k: int = 2
    norm: str = "batch"
    num_experts: int = 4  # K experts of a mixture method (FedCoE's pool, FedMoE-DA's per client)

    def check(self, cfg: "ExperimentConfig") -> None:
        require(self, ge0=("cnn_hidden",), ge1=("resnet_width", "inner_experts", "inner_top_k", "num_experts"),
                gt0=("width_multiplier",), choices={"model": MODELS, "norm": NORMS})
        if self.inner_top_k > self.inner_experts:
            raise bad_value("inner_top_k", self.inner_top_k, f"must be <= inner_experts ({self.inner_experts})")
        if self.model == "resnet_moe" and self.resnet_depth != 18 and (
                self.resnet_depth < 8 or (self.resnet_depth - 2) % 6):
            raise bad_value("resnet_depth", self.resnet_depth,
                            "must be 18 (ResNet-18 layout) or 6n+2 with n >= 1 (8, 14, 20, ...)")


@dataclass(frozen=True)
class TrainingSection(Section):
    local_epochs: int = 2
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    load_balance_weight: float = 0.01  # weight of the ResNet-MoE / expert load-balancing loss
    eval_batch_size: int = 512

    def check(self, cfg: "ExperimentConfig") -> None:
        require(self, ge0=("momentum", "weight_decay", "load_balance_weight"),
                ge1=("local_epochs", "batch_size", "eval_batch_size"), gt0=("lr",))


@dataclass(frozen=True)
class OnboardingSection(Section):
    """New sites joining a trained federation (docs/DEPLOYMENT.md, "Onboarding a new site")."""

    onboard_new_nodes: bool = True  # a SuperNode joining a running federation gets the cold-start package
    coldstart_join_training: bool = False  # ... and trains like any client from the next round on
    serve_from: str = ""  # serving mode: a finished run's folder or checkpoint; onboard nodes, no training
    serve_max_nodes: int = 0  # serving mode stops after onboarding this many nodes (0: no limit)
    serve_timeout: float = 3600.0  # serving mode stops after this many seconds

    def check(self, cfg: "ExperimentConfig") -> None:
        require(self, ge0=("serve_max_nodes",), gt0=("serve_timeout",))


# the model section is the attribute ``network``: ``model`` is one of its keys (the architecture)
GENERIC_SECTIONS: dict[str, type] = {"run": RunSection, "storage": StorageSection, "data": DataSection,
                                     "network": ModelSection, "training": TrainingSection,
                                     "onboarding": OnboardingSection}


@lru_cache(maxsize=1)
def method_sections() -> dict[str, type]:
    """Each method's own parameter section (its ``Params``), by method name."""
    return {name: algorithms.algorithm_class(name).Params for name in algorithms.REGISTRY}


def _section_types() -> dict[str, type]:
    return {**GENERIC_SECTIONS, **method_sections()}


@lru_cache(maxsize=1)
def key_sections() -> dict[str, tuple[str, ...]]:
    """Flat key -> the sections that hold it (one generic section, or every method that reads it)."""
    out: dict[str, tuple[str, ...]] = {}
    for name, cls in _section_types().items():
        for f in fields(cls):
            out[f.name] = out.get(f.name, ()) + (name,)
    clash = {k: v for k, v in out.items() if len(v) > 1 and set(v) & set(GENERIC_SECTIONS)}
    if clash:
        raise TypeError(f"config keys declared by a generic section and another section: {clash}")
    return out


def keys_of(*section_names: str) -> tuple[str, ...]:
    types = _section_types()
    return tuple(f.name for name in section_names for f in fields(types[name]))


@lru_cache(maxsize=1)
def field_types() -> dict[str, type]:
    """Every flat key and its Python type."""
    types = {"str": str, "int": int, "float": float, "bool": bool}
    return {f.name: types[f.type] for cls in _section_types().values() for f in fields(cls)}  # type: ignore[index]


def method_only_keys(algorithm: str) -> frozenset[str]:
    """Keys no section of ``algorithm`` reads: the method runs the same whatever their values."""
    own = set(keys_of(algorithm))
    return frozenset(k for name in method_sections() if name != algorithm for k in keys_of(name)) - own


@dataclass(frozen=True)
class ExperimentConfig:
    run: RunSection = field(default_factory=RunSection)
    storage: StorageSection = field(default_factory=StorageSection)
    data: DataSection = field(default_factory=DataSection)
    network: ModelSection = field(default_factory=ModelSection)
    training: TrainingSection = field(default_factory=TrainingSection)
    onboarding: OnboardingSection = field(default_factory=OnboardingSection)
    methods: Mapping[str, Any] = field(default_factory=lambda: {n: c() for n, c in method_sections().items()})
    config_path: str = ""  # where the config came from (not a YAML key)

    def __getattr__(self, key: str) -> Any:
        # flat reads (cfg.lr): only reached when normal lookup fails
        holders = key_sections().get(key)
        if not holders:
            raise AttributeError(key)
        first = holders[0]
        section = object.__getattribute__(self, first) if first in GENERIC_SECTIONS else \
            object.__getattribute__(self, "methods")[first]
        return getattr(section, key)

    def __hash__(self) -> int:
        return hash(tuple(sorted((k, v) for k, v in self.to_dict().items())))

    def __eq__(self, other: object) -> bool:
        return isinstance(other, ExperimentConfig) and self.to_dict() == other.to_dict()

    @property
    def params(self) -> Any:
        """The selected method's own parameters."""
        return self.methods[self.run.algorithm]

    @property
    def num_partitions(self) -> int:
        return self.data.num_clients + self.data.num_coldstart_clients

    @property
    def resolved_run_name(self) -> str:
        if self.run.run_name:
            return self.run.run_name
        stem = Path(self.config_path).stem if self.config_path else "default"
        return f"{stem}-{self.run.algorithm}-s{self.run.seed}"

    def to_dict(self) -> dict[str, Any]:
        """Flat keys -> values (what YAML, run configs and saved configs hold)."""
        out: dict[str, Any] = {}
        for name in GENERIC_SECTIONS:
            out.update(dataclasses.asdict(object.__getattribute__(self, name)))
        for params in self.methods.values():
            out.update(dataclasses.asdict(params))
        out["config_path"] = self.config_path
        return out

    def section_dict(self, name: str) -> dict[str, Any]:
        section = self.methods[name] if name in self.methods else object.__getattribute__(self, name)
        return dataclasses.asdict(section)

    def replace(self, **changes: Any) -> "ExperimentConfig":
        return from_dict({**self.to_dict(), **changes})


def _coerce(key: str, value: Any) -> Any:
    want = field_types()[key]
    if want is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false"):
            return value.lower() == "true"
    elif want is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif want is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif want is str:
        if isinstance(value, str):
            return value
    raise ConfigError(f"config key '{key}' must be a {want.__name__}, got {value!r} ({type(value).__name__})")


def unknown_key_error(key: str, where: str = "") -> ConfigError:
    close = difflib.get_close_matches(key, list(field_types()), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else "; the keys are listed in pyproject.toml [tool.flwr.app.config]"
    return ConfigError(f"unknown config key '{key}'{where}{hint}")


def make_config(**values: Any) -> ExperimentConfig:
    """A validated config from flat keys: ``make_config(dataset="synthetic", lr=0.1)``."""
    return from_dict(values)


def from_dict(values: Mapping[str, Any]) -> ExperimentConfig:
    """Build and validate a config; unknown keys and wrong types raise ConfigError."""
    values = dict(values)
    config_path = str(values.pop("config_path", "") or "")
    for key in values:
        if key not in field_types():
            raise unknown_key_error(key)
    coerced = {k: _coerce(k, v) for k, v in values.items()}

    def build(cls: type) -> Any:
        return cls(**{f.name: coerced[f.name] for f in fields(cls) if f.name in coerced})

    cfg = ExperimentConfig(**{name: build(cls) for name, cls in GENERIC_SECTIONS.items()},
                           methods={name: build(cls) for name, cls in method_sections().items()},
                           config_path=config_path)
    for name in GENERIC_SECTIONS:
        object.__getattribute__(cfg, name).check(cfg)
    for params in cfg.methods.values():
        params.check(cfg)
    cfg.params.check_selected(cfg)
    return cfg


# What a saved config (checkpoint, summary) that lacks a key meant: the behaviour the code
# had before the key existed, where that is not the key's default today.
VALUE_BEFORE_KEY: dict[str, Any] = {"gate_input": "image"}


def saved_config(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A saved config's values with every key it lacks filled in as it ran: the value the
    code had before the key existed, else the default."""
    before = {k: v for k, v in VALUE_BEFORE_KEY.items() if k not in saved}
    return {**ExperimentConfig().to_dict(), **before, **saved}


def checkpoint_keys(algorithm: str) -> tuple[str, ...]:
    """What a checkpoint must share with the run that resumes or serves it: the method and
    seed, the data and model sections whole, and the method's own parameters."""
    return ("algorithm", "seed") + keys_of("data", "network", algorithm)


def load_yaml(path: str | os.PathLike, _seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A YAML mapping; ``base: other.yaml`` (relative to this file) is loaded first and
    overridden key by key, so variants state only what differs."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config file '{path}' not found (looked in {p.resolve()})")
    if p.resolve() in _seen:
        raise ConfigError(f"config file '{path}' includes itself through 'base'")
    try:
        with open(p) as fh:
            data = yaml.safe_load(fh) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file '{path}' is not valid YAML: {err}") from err
    if not isinstance(data, dict):
        raise ConfigError(f"config file '{path}' must hold a mapping of keys to values")
    for key in data:
        if key != "base" and key not in field_types():
            raise unknown_key_error(str(key), f" in {path}")
    base = data.pop("base", None)
    if base:
        return {**load_yaml(p.parent / str(base), _seen + (p.resolve(),)), **data}
    return data


def load_config(
    path: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None
) -> ExperimentConfig:
    """Defaults < YAML file < overrides. Overrides equal to UNSET are ignored."""
    values: dict[str, Any] = {}
    if path:
        values.update(load_yaml(path))
        values["config_path"] = str(path)
    for key, value in (overrides or {}).items():
        if value != UNSET:
            values[key] = value
    return from_dict(values)


def config_from_run_config(run_config: Mapping[str, Any], base_dir: str | None = None) -> ExperimentConfig:
    """Flower run config -> ExperimentConfig. ``config`` names the YAML (relative paths
    resolve against ``base_dir``, default the working directory)."""
    run_config = dict(run_config)
    path = str(run_config.pop("config", "") or "")
    if path and base_dir and not os.path.isabs(path):
        path = os.path.join(base_dir, path)
    return load_config(path or None, run_config)
