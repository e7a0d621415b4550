"""The experiment config in typed sections, loaded from YAML, overridden from
``--run-config`` and validated once before any training starts.

YAML files and ``--run-config`` use flat keys (``lr: 0.05``); every key belongs to
exactly one generic section (run, storage, data, model -- the attribute ``network`` --,
training, onboarding) or to the parameter sections of the methods that read it
(``cfg.methods[name]``; the running method's is ``cfg.params``; each method declares its
``Params`` in its own module under ``algorithms/``; the generic ones are in ``sections``).
Keys are unique across the generic sections, so a flat read ``cfg.lr`` is the same as
``cfg.training.lr``. Every key list (all keys, those that define a checkpoint, those a
method ignores) is derived from the sections."""

from __future__ import annotations

import dataclasses
import difflib
import os
from dataclasses import dataclass, field, fields
from functools import lru_cache
from pathlib import Path
from typing import Any, Mapping

import yaml

from .. import algorithms
from .sections import (UNSET, ConfigError, DataSection, ModelSection, OnboardingSection, RunSection, Section,
                       StorageSection, TrainingSection, bad_value, require)

# what method modules and tests import from here
__all__ = ["UNSET", "ConfigError", "ExperimentConfig", "Section", "bad_value", "require", "checkpoint_keys",
           "config_from_run_config", "field_types", "from_dict", "key_sections", "keys_of", "load_config", "load_yaml",
           "make_config", "method_only_keys", "method_sections", "saved_config"]

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
    raise ConfigError(f"config key '{key}' must be a {want.__name__}, got {value!r} ({type(value).__name__})", key)


def unknown_key_error(key: str, where: str = "") -> ConfigError:
    close = difflib.get_close_matches(key, list(field_types()), n=1)
    hint = f"; did you mean '{close[0]}'?" if close else "; the keys are listed in pyproject.toml [tool.flwr.app.config]"
    return ConfigError(f"unknown config key '{key}'{where}{hint}", key)


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


# Keys a saved config may hold that no longer exist, and why dropping them changes nothing it
# trained: an old checkpoint or bundle still loads.
RETIRED_KEYS: dict[str, str] = {
    "global_balanced": "FedCoE's own balanced global model; the evaluator balances every global model alike"}


def saved_config(saved: Mapping[str, Any]) -> dict[str, Any]:
    """A saved config's values with every key it lacks filled in as it ran: the value the
    code had before the key existed, else the default; retired keys dropped."""
    before = {k: v for k, v in VALUE_BEFORE_KEY.items() if k not in saved}
    kept = {k: v for k, v in saved.items() if k not in RETIRED_KEYS}
    return {**ExperimentConfig().to_dict(), **before, **kept}


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
            raise unknown_key_error(str(key), f" at {key_location(p, str(key))}")
    base = data.pop("base", None)
    if base:
        return {**load_yaml(p.parent / str(base), _seen + (p.resolve(),)), **data}
    return data


def key_location(path: Path, key: str) -> str:
    """``file:line`` where ``key`` is set in the YAML file ``path`` (or its ``base`` chain)."""
    try:
        node = yaml.compose(path.read_text())
    except (OSError, yaml.YAMLError):
        return str(path)
    pairs = node.value if isinstance(node, yaml.MappingNode) else []
    for key_node, value_node in pairs:
        if key_node.value == key:
            return f"{path}:{key_node.start_mark.line + 1}"
    base = next((v.value for k, v in pairs if k.value == "base"), None)
    return key_location(path.parent / str(base), key) if base else str(path)


def load_config(
    path: str | os.PathLike | None = None, overrides: Mapping[str, Any] | None = None
) -> ExperimentConfig:
    """Defaults < YAML file < overrides. Overrides equal to UNSET are ignored. An error
    about one key says where that key was set (file and line, or the overrides)."""
    values: dict[str, Any] = {}
    if path:
        values.update(load_yaml(path))
        values["config_path"] = str(path)
    given = {k: v for k, v in (overrides or {}).items() if v != UNSET}
    values.update(given)
    try:
        return from_dict(values)
    except ConfigError as err:
        if err.key is None or str(err).startswith("unknown config key") and " at " in str(err):
            raise
        where = "set by --run-config / --set" if err.key in given else \
            f"set at {key_location(Path(path), err.key)}" if path and err.key in values else "the default"
        raise ConfigError(f"{err} ({where})", err.key) from None


def config_from_run_config(run_config: Mapping[str, Any], base_dir: str | None = None) -> ExperimentConfig:
    """Flower run config -> ExperimentConfig. ``config`` names the YAML (relative paths
    resolve against ``base_dir``, default the working directory)."""
    run_config = dict(run_config)
    path = str(run_config.pop("config", "") or "")
    if path and base_dir and not os.path.isabs(path):
        path = os.path.join(base_dir, path)
    return load_config(path or None, run_config)
