"""The generic config sections (run, storage, data, model, training, onboarding): their
keys, defaults and checks. Each method's own section is its ``Params`` under ``algorithms/``."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping

from .. import algorithms

if TYPE_CHECKING:  # annotations only: the sections are defined before the config that holds them
    from . import ExperimentConfig

DATASETS = ("cifar10", "cifar100", "imagefolder", "synthetic")
PARTITIONS = ("dirichlet", "pathological", "iid")
PIXEL_SCALES = ("centred", "unit")
MODELS = ("cnn", "lenet", "resnet_moe")  # lenet: NIID-Bench's simple CNN (6/16 conv, 120/84 FC)
NORMS = ("batch", "group", "none")
DEVICES = ("auto", "cpu", "cuda")
ROBUST_RULES = ("mean", "median", "trimmed_mean")
SIMULATION_TRAINING = ("auto", "cohort", "per_client")

# The run-config value that means "not overridden: keep the YAML / default value".
# Flower fuses pyproject defaults with overrides before the ServerApp sees them, so
# an explicit sentinel is the only way to tell "user asked for X" from "default".
UNSET = "<yaml>"
RUN_NAME = re.compile(r"[A-Za-z0-9_.-]+")


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the key and the value
    (``key``: the key, when one is to blame, so a loader can add where it was set)."""

    def __init__(self, message: str, key: str | None = None):
        super().__init__(message)
        self.key = key


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
    return ConfigError(f"config key '{key}' = {value!r} is not allowed: {allowed}", key)


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
    node_restart_grace: float = 60.0  # seconds a SuperNode that went offline mid-round is waited for (deployment)
    max_update_norm_ratio: float = 100.0  # reject ||update|| > ratio * (||global|| + 1); 0 = off
    robust_aggregation: str = "mean"  # mean | median | trimmed_mean (experts / FedAvg model)
    trim_fraction: float = 0.1  # share trimmed at each end by trimmed_mean
    resume: bool = False  # continue from the last checkpoint of this run name
    resume_from: str = ""  # or from this checkpoint file
    keep_checkpoints: int = 3

    def check(self, cfg: "ExperimentConfig") -> None:
        require(self, ge0=("eval_every", "seed", "max_update_norm_ratio", "wait_for_nodes", "node_restart_grace"),
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
    state_dir: str = ""  # private parts of partition-mode nodes without node config state-dir; "" -> <cache_dir>/state


@dataclass(frozen=True)
class DataSection(Section):
    """Which data, how it is split among clients: defines the partitions."""

    dataset: str = "cifar10"
    class_names: str = ""  # comma-separated label space; "" -> the data set's own classes
    num_clients: int = 20  # N training clients
    num_coldstart_clients: int = 5  # M cold-start clients (never train)
    partition: str = "dirichlet"
    dirichlet_alpha: float = 0.1
    # NIID-Bench's draw: a client holding more than its equal share gets no more of later classes
    dirichlet_self_balancing: bool = False
    classes_per_client: int = 2  # pathological partition
    min_partition_size: int = 10
    test_fraction: float = 0.2  # local train/test split of each client; 0: train on the whole partition
    train_subset: int = 0  # >0: partition only this many training images
    global_test_subset: int = 0  # >0: global test set limited to this many
    synthetic_train_size: int = 2000
    synthetic_test_size: int = 500
    synthetic_num_classes: int = 10
    image_size: int = 32  # images are resized to image_size x image_size
    augment: bool = False
    pixel_scale: str = "centred"  # model inputs: "centred" (x/255 - 0.5)/0.25, or "unit" x/255

    def check(self, cfg: "ExperimentConfig") -> None:
        require(self, ge0=("num_coldstart_clients", "train_subset", "global_test_subset", "min_partition_size"),
                ge1=("num_clients", "synthetic_train_size", "synthetic_test_size", "classes_per_client"),
                gt0=("dirichlet_alpha",), choices={"dataset": DATASETS, "partition": PARTITIONS,
                                                  "pixel_scale": PIXEL_SCALES})
        if self.num_coldstart_clients > self.num_clients:
            raise bad_value("num_coldstart_clients", self.num_coldstart_clients,
                            f"must not exceed num_clients ({self.num_clients})")
        if not 0 <= self.test_fraction < 1:
            raise bad_value("test_fraction", self.test_fraction, "must be in [0, 1)")
        if self.test_fraction == 0 and self.num_coldstart_clients:
            raise bad_value("test_fraction", self.test_fraction, "0 leaves the cold-start clients nothing to be "
                            f"scored on (num_coldstart_clients={self.num_coldstart_clients})")
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
    # how a simulation trains a round's clients: "cohort" (one vectorised pass, docs/COHORT.md),
    # "per_client" (one by one in Ray actors), "auto" (cohort with a GPU; per_client on CPU,
    # where cohorts measured slower). Deployments always train one by one
    simulation_training: str = "auto"
    cohort_chunk_size: int = 64  # clients stacked at once by the cohort executor (memory bound)

    def check(self, cfg: "ExperimentConfig") -> None:
        require(self, ge0=("momentum", "weight_decay", "load_balance_weight"),
                ge1=("local_epochs", "batch_size", "eval_batch_size", "cohort_chunk_size"), gt0=("lr",),
                choices={"simulation_training": SIMULATION_TRAINING})


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
