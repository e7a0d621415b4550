"""One typed experiment config: loaded from YAML, overridden from ``--run-config``,
validated once before any training starts."""

from __future__ import annotations

import dataclasses
import os
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Mapping

import yaml

ALGORITHMS = ("fedcoe", "fedavg", "fedprox", "fedper", "pfedmoe", "fedmoe_da", "local")
DATASETS = ("cifar10", "cifar100", "imagefolder", "synthetic")
PARTITIONS = ("dirichlet", "pathological", "iid")
MODELS = ("cnn", "resnet_moe")
NORMS = ("batch", "group", "none")
LOCAL_PARTS = ("head", "expert_head", "expert", "none")
GATE_INPUTS = ("image", "trunk")
DEVICES = ("auto", "cpu", "cuda")

# The run-config value that means "not overridden: keep the YAML / default value".
# Flower fuses pyproject defaults with overrides before the ServerApp sees them, so
# an explicit sentinel is the only way to tell "user asked for X" from "default".
UNSET = "<yaml>"


class ConfigError(ValueError):
    """A config value that cannot be used; the message names the key and the value."""


@dataclass(frozen=True)
class ExperimentConfig:
    # ---- run -------------------------------------------------------------
    run_name: str = ""  # "" -> "<config stem>-<algorithm>-s<seed>"
    results_dir: str = "results"
    seed: int = 0
    algorithm: str = "fedcoe"
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
    # ---- data ------------------------------------------------------------
    dataset: str = "cifar10"
    data_root: str = ""  # image folder / .tar.gz / torchvision root; "" -> ./data
    download: bool = True  # torchvision download when data_root has no copy
    cache_dir: str = ".cache/fedcoe_flwr"
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
    global_test_dir: str = ""  # image folder / .tar.gz with test/<class>/* for global accuracy (deployment)
    synthetic_train_size: int = 2000
    synthetic_test_size: int = 500
    synthetic_num_classes: int = 10
    image_size: int = 32  # images are resized to image_size x image_size
    augment: bool = False
    # ---- models ----------------------------------------------------------
    model: str = "cnn"  # expert architecture (and the single model of FedAvg/FedProx)
    width_multiplier: float = 1.0  # >1 for capacity-matched FedAvg
    cnn_hidden: int = 0  # units of the small CNN's first FC layer; 0 = 512 x width_multiplier
    resnet_depth: int = 8  # CIFAR ResNet, 6n+2
    resnet_width: int = 16
    inner_experts: int = 2  # E_in: MoE experts inside each ResNet-MoE convolution
    inner_top_k: int = 2
    norm: str = "batch"
    gate_width: int = 16
    # ---- FedCoE ------------------------------------------------------------
    num_experts: int = 4  # K global experts
    top_m: int = 0  # experts per client; 0 -> all K
    aux_weight: float = 2.0  # weight of the global mixture's own loss (2 chosen over 1 and 3, README issue-8 section)
    load_balance_weight: float = 0.01  # lambda
    prox_mu: float = 0.01  # mu (FedProx, FedCoE)
    local_part: str = "head"
    shared_trunk: bool = True  # experts share one trunk (averaged like FedAvg) and differ in their heads
    gate_input: str = "trunk"  # FedCoE gate over the shared trunk's features or the raw image ("image")
    gate_temperature: float = 1.0  # softmax temperature of the shared gate (< 1: sharper routing)
    local_loss_weight: float = 1.0  # cross-entropy of the local part alone, added to the client's loss
    local_prior_correction: bool = True  # the client's model re-weights the pool by its own label prior
    global_balanced: bool = True  # the global model divides out the federation's predicted training prior
    local_gate: bool = True
    correlation_weighting: bool = True
    correlation_smoothing: float = 0.5
    correlation_cap: float = 0.5
    coldstart_adabn: bool = True
    coldstart_em: bool = True
    coldstart_top_m: bool = False
    coldstart_prior: str = "predicted"  # EM's training prior: "predicted" (clients' mean predictions) | "uniform"
    # ---- onboarding new sites (fedcoe_flwr/onboard.py, docs/DEPLOYMENT.md) ---
    onboard_new_nodes: bool = True  # a SuperNode joining a running federation gets the cold-start package
    coldstart_join_training: bool = False  # ... and trains like any client from the next round on
    serve_from: str = ""  # serving mode: a finished run's folder or checkpoint; onboard nodes, no training
    serve_max_nodes: int = 0  # serving mode stops after onboarding this many nodes (0: no limit)
    serve_timeout: float = 3600.0  # serving mode stops after this many seconds
    # ---- baselines -----------------------------------------------------------
    pfedmoe_local_widths: str = "1.0"  # width multipliers of local extractors, cycled over clients
    fedmoe_da_top_p: int = 5  # P: experts each expert aggregates with (besides itself)
    fedmoe_da_interval: int = 5  # I: rounds between gate uploads / aggregation-matrix updates
    fedmoe_da_tau: float = 1.0  # temperature of the aggregation softmax
    # ---- local training ----------------------------------------------------
    local_epochs: int = 2
    batch_size: int = 32
    lr: float = 0.01
    momentum: float = 0.9
    weight_decay: float = 0.0
    eval_batch_size: int = 512
    # ---- where the config came from (not a YAML key) -----------------------
    config_path: str = ""

    # -------------------------------------------------------------------------
    @property
    def num_partitions(self) -> int:
        return self.num_clients + self.num_coldstart_clients

    @property
    def experts_per_client(self) -> int:
        return self.top_m or self.num_experts

    @property
    def resolved_run_name(self) -> str:
        if self.run_name:
            return self.run_name
        stem = Path(self.config_path).stem if self.config_path else "default"
        return f"{stem}-{self.algorithm}-s{self.seed}"

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    def replace(self, **changes: Any) -> "ExperimentConfig":
        return from_dict({**self.to_dict(), **changes})


FIELD_TYPES: dict[str, type] = {
    f.name: {"str": str, "int": int, "float": float, "bool": bool}[f.type]  # type: ignore[index]
    for f in fields(ExperimentConfig)
}
CHOICES = {
    "algorithm": ALGORITHMS,
    "dataset": DATASETS,
    "partition": PARTITIONS,
    "model": MODELS,
    "norm": NORMS,
    "local_part": LOCAL_PARTS,
    "gate_input": GATE_INPUTS,
    "device": DEVICES,
    "robust_aggregation": ("mean", "median", "trimmed_mean"),
    "coldstart_prior": ("predicted", "uniform"),
}


def _coerce(key: str, value: Any) -> Any:
    want = FIELD_TYPES[key]
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
    raise ConfigError(
        f"config key '{key}' must be a {want.__name__}, got {value!r} ({type(value).__name__})"
    )


def _check(cfg: ExperimentConfig) -> None:
    def bad(key: str, allowed: str) -> None:
        raise ConfigError(f"config key '{key}' = {getattr(cfg, key)!r} is not allowed: {allowed}")

    for key, choices in CHOICES.items():
        if getattr(cfg, key) not in choices:
            bad(key, f"choose one of {', '.join(choices)}")
    positive = (
        "num_rounds", "num_clients", "num_experts", "local_epochs",
        "batch_size", "eval_batch_size", "resnet_width", "gate_width", "inner_experts",
        "inner_top_k", "synthetic_train_size", "synthetic_test_size", "keep_checkpoints",
        "fedmoe_da_interval",
    )
    for key in positive:
        if getattr(cfg, key) < 1:
            bad(key, "must be >= 1")
    for key in ("eval_every", "num_coldstart_clients", "top_m", "train_subset", "global_test_subset",
                "min_partition_size", "seed", "fedmoe_da_top_p", "cnn_hidden"):
        if getattr(cfg, key) < 0:
            bad(key, "must be >= 0")
    for key in ("lr", "round_timeout", "fedmoe_da_tau", "serve_timeout", "gate_temperature"):
        if not getattr(cfg, key) > 0:
            bad(key, "must be > 0")
    for key in ("momentum", "weight_decay", "aux_weight", "local_loss_weight", "load_balance_weight", "prox_mu",
                "max_update_norm_ratio", "wait_for_nodes", "serve_max_nodes"):
        if getattr(cfg, key) < 0:
            bad(key, "must be >= 0")
    if cfg.algorithm in ("fedper", "pfedmoe", "fedmoe_da", "local") and cfg.model != "cnn":
        bad("model", f"algorithm '{cfg.algorithm}' splits the small CNN as its paper does: use model 'cnn'")
    if cfg.local_part == "expert_head" and not cfg.shared_trunk:
        bad("local_part", "'expert_head' sits on the shared trunk: set shared_trunk=true (or use 'head')")
    if cfg.gate_input == "trunk" and not cfg.shared_trunk:
        bad("gate_input", "'trunk' routes on the shared trunk's features: set shared_trunk=true (or use 'image')")
    if cfg.top_m > cfg.num_experts:
        bad("top_m", f"must be <= num_experts ({cfg.num_experts}); 0 means all experts")
    if cfg.inner_top_k > cfg.inner_experts:
        bad("inner_top_k", f"must be <= inner_experts ({cfg.inner_experts})")
    if not cfg.dirichlet_alpha > 0:
        bad("dirichlet_alpha", "must be > 0")
    if cfg.num_coldstart_clients > cfg.num_clients:
        bad("num_coldstart_clients", f"must not exceed num_clients ({cfg.num_clients})")
    for key in ("fraction_train", "min_reply_fraction"):
        if not 0 < getattr(cfg, key) <= 1:
            bad(key, "must be in (0, 1]")
    if not 0 < cfg.test_fraction < 1:
        bad("test_fraction", "must be in (0, 1)")
    if not 0 <= cfg.trim_fraction < 0.5:
        bad("trim_fraction", "must be in [0, 0.5)")
    if not 0 <= cfg.correlation_smoothing <= 1:
        bad("correlation_smoothing", "must be in [0, 1]")
    if not 0 < cfg.correlation_cap <= 1:
        bad("correlation_cap", "must be in (0, 1]")
    if not cfg.width_multiplier > 0:
        bad("width_multiplier", "must be > 0")
    if cfg.model == "resnet_moe" and cfg.resnet_depth != 18 and (cfg.resnet_depth < 8 or (cfg.resnet_depth - 2) % 6):
        bad("resnet_depth", "must be 18 (ResNet-18 layout) or 6n+2 with n >= 1 (8, 14, 20, ...)")
    if cfg.classes_per_client < 1:
        bad("classes_per_client", "must be >= 1")
    if cfg.dataset == "imagefolder" and not cfg.data_root:
        bad("data_root", "dataset 'imagefolder' needs data_root (a folder or .tar.gz)")
    try:
        widths = [float(w) for w in cfg.pfedmoe_local_widths.split(",")]
    except ValueError:
        widths = []
    if not widths or min(widths) <= 0:
        bad("pfedmoe_local_widths", "must be comma-separated positive numbers, e.g. '1.0,2.0'")
    if cfg.image_size < 8:
        bad("image_size", "must be >= 8")


# Keys that define the model and its label space: a checkpoint only fits a run that shares them.
MODEL_KEYS = ("algorithm", "model", "num_experts", "resnet_depth", "resnet_width", "inner_experts", "inner_top_k",
              "width_multiplier", "cnn_hidden", "local_part", "shared_trunk", "gate_temperature", "gate_width",
              "gate_input", "norm", "image_size", "class_names", "dataset", "synthetic_num_classes")


# Keys only FedCoE reads: every other method runs the same whatever their values.
FEDCOE_ONLY_KEYS = frozenset({
    "top_m", "aux_weight", "local_part", "shared_trunk", "gate_temperature", "gate_input", "gate_width",
    "local_loss_weight", "local_prior_correction", "global_balanced", "local_gate", "correlation_weighting",
    "correlation_smoothing", "correlation_cap", "coldstart_adabn", "coldstart_em", "coldstart_top_m",
    "coldstart_prior"})


# What a saved config (checkpoint, summary) that lacks a key meant: the behaviour the code
# had before the key existed, where that is not the key's default today.
VALUE_BEFORE_KEY: dict[str, Any] = {"gate_input": "image"}


def saved_config(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A saved config's values with every key it lacks filled in as it ran: the value the
    code had before the key existed, else the default."""
    before = {k: v for k, v in VALUE_BEFORE_KEY.items() if k not in saved}
    return {**ExperimentConfig().to_dict(), **before, **saved}


def from_dict(values: Mapping[str, Any]) -> ExperimentConfig:
    """Build and validate a config; unknown keys and wrong types raise ConfigError."""
    unknown = sorted(set(values) - set(FIELD_TYPES))
    if unknown:
        raise ConfigError(
            f"unknown config key(s): {', '.join(unknown)}; known keys: {', '.join(sorted(FIELD_TYPES))}"
        )
    cfg = ExperimentConfig(**{k: _coerce(k, v) for k, v in values.items()})
    _check(cfg)
    return cfg


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
