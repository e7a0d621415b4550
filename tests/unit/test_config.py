"""Config: precedence (defaults < YAML < overrides), type checks, validation messages
that name the key and the value, and pyproject.toml / configs/ kept in step."""

from __future__ import annotations

import ast
import dataclasses
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from fedcoe_flwr.algorithms.fedcoe.params import experts_per_client
from fedcoe_flwr.config import (UNSET, ConfigError, ExperimentConfig, config_from_run_config, field_types, from_dict, make_config,
                                load_config, load_yaml, saved_config)

REPO_ROOT = Path(__file__).resolve().parents[2]
FIELDS = list(field_types())


def _pyproject_config() -> dict:
    with open(REPO_ROOT / "pyproject.toml", "rb") as fh:
        return tomllib.load(fh)["tool"]["flwr"]["app"]["config"]


# ------------------------------------------------------------------ defaults and types
def test_empty_dict_gives_the_defaults():
    assert from_dict({}) == ExperimentConfig()


def test_types_are_coerced_where_safe():
    cfg = from_dict({"lr": 1, "resume": "true", "augment": "False", "num_rounds": 7})
    assert cfg.lr == 1.0 and isinstance(cfg.lr, float)
    assert cfg.resume is True and cfg.augment is False
    assert cfg.num_rounds == 7


@pytest.mark.parametrize("key,value", [
    ("num_rounds", "ten"),
    ("num_rounds", 3.5),
    ("num_rounds", True),  # a bool is not an int here
    ("lr", "fast"),
    ("resume", "yes"),
    ("resume", 1),
    ("dataset", 10),
])
def test_wrong_type_names_key_and_value(key, value):
    with pytest.raises(ConfigError) as err:
        from_dict({key: value})
    msg = str(err.value)
    assert f"'{key}'" in msg and repr(value) in msg


def test_unknown_key_is_named():
    with pytest.raises(ConfigError, match="num_roundz"):
        from_dict({"num_roundz": 3})


def test_a_saved_config_with_a_retired_key_still_loads():
    # a checkpoint or bundle saved before global_balanced was retired; a live config refuses the key
    saved = {**ExperimentConfig().to_dict(), "algorithm": "fedcoe", "global_balanced": False}
    assert from_dict(saved_config(saved)).algorithm == "fedcoe"
    with pytest.raises(ConfigError, match="global_balanced"):
        from_dict(saved)


def test_config_is_frozen_and_replace_validates():
    cfg = ExperimentConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.seed = 3  # type: ignore[misc]
    assert cfg.replace(seed=3).seed == 3 and cfg.seed == 0
    with pytest.raises(ConfigError, match="num_experts"):
        cfg.replace(num_experts=0)


def test_derived_properties():
    cfg = from_dict({"num_clients": 8, "num_coldstart_clients": 2, "num_experts": 5})
    assert cfg.num_partitions == 10
    assert experts_per_client(cfg) == 5
    assert experts_per_client(cfg.replace(top_m=2)) == 2
    assert cfg.resolved_run_name == "default-fedcoe-s0"
    assert cfg.replace(config_path="configs/x.yaml", seed=2, algorithm="fedavg").resolved_run_name == "x-fedavg-s2"
    assert cfg.replace(run_name="mine").resolved_run_name == "mine"


# ------------------------------------------------------------------ validation
@pytest.mark.parametrize("values,key", [
    ({"num_experts": 0}, "num_experts"),
    ({"num_experts": -2}, "num_experts"),
    ({"num_experts": 2, "top_m": 3}, "top_m"),
    ({"top_m": -1}, "top_m"),
    ({"dirichlet_alpha": 0.0}, "dirichlet_alpha"),
    ({"dirichlet_alpha": -0.5}, "dirichlet_alpha"),
    ({"num_clients": 4, "num_coldstart_clients": 5}, "num_coldstart_clients"),
    ({"num_coldstart_clients": -1}, "num_coldstart_clients"),
    ({"num_clients": 0}, "num_clients"),
    ({"num_rounds": 0}, "num_rounds"),
    ({"algorithm": "fedsgd"}, "algorithm"),
    ({"dataset": "mnist"}, "dataset"),
    ({"partition": "shards"}, "partition"),
    ({"model": "vit"}, "model"),
    ({"norm": "layer"}, "norm"),
    ({"local_part": "all"}, "local_part"),
    ({"device": "tpu"}, "device"),
    ({"inner_experts": 2, "inner_top_k": 3}, "inner_top_k"),
    ({"model": "resnet_moe", "resnet_depth": 10}, "resnet_depth"),
    ({"model": "resnet_moe", "resnet_depth": 2}, "resnet_depth"),
    ({"fraction_train": 0.0}, "fraction_train"),
    ({"fraction_train": 1.5}, "fraction_train"),
    ({"min_reply_fraction": 0.0}, "min_reply_fraction"),
    ({"test_fraction": 1.0}, "test_fraction"),
    ({"test_fraction": 0.0}, "test_fraction"),
    ({"correlation_smoothing": 1.5}, "correlation_smoothing"),
    ({"correlation_smoothing": -0.1}, "correlation_smoothing"),
    ({"correlation_cap": 0.0}, "correlation_cap"),
    ({"correlation_cap": 1.1}, "correlation_cap"),
    ({"lr": 0.0}, "lr"),
    ({"momentum": -0.9}, "momentum"),
    ({"prox_mu": -1.0}, "prox_mu"),
    ({"width_multiplier": 0.0}, "width_multiplier"),
    ({"image_size": 4}, "image_size"),
    ({"classes_per_client": 0}, "classes_per_client"),
    ({"dataset": "imagefolder", "data_root": ""}, "data_root"),
    ({"pfedmoe_local_widths": "1.0,wide"}, "pfedmoe_local_widths"),
    ({"pfedmoe_local_widths": "1.0,-2"}, "pfedmoe_local_widths"),
    ({"fedmoe_da_tau": 0.0}, "fedmoe_da_tau"),
    ({"fedmoe_da_interval": 0}, "fedmoe_da_interval"),
    ({"max_update_norm_ratio": -1.0}, "max_update_norm_ratio"),
])
def test_invalid_value_names_key_and_value(values, key):
    with pytest.raises(ConfigError) as err:
        from_dict(values)
    msg = str(err.value)
    assert f"'{key}'" in msg, msg
    assert repr(values[key]) in msg, msg


@pytest.mark.parametrize("values", [
    {"num_experts": 3, "top_m": 3},
    {"num_experts": 3, "top_m": 0},
    {"num_clients": 5, "num_coldstart_clients": 5},
    {"num_coldstart_clients": 0},
    {"model": "resnet_moe", "resnet_depth": 8},
    {"model": "resnet_moe", "resnet_depth": 14},
    {"model": "resnet_moe", "resnet_depth": 18},
    {"model": "resnet_moe", "resnet_depth": 20},
    {"model": "cnn", "resnet_depth": 10},  # depth only matters for ResNet-MoE
    {"correlation_smoothing": 0.0, "correlation_cap": 1.0},
    {"dataset": "imagefolder", "data_root": "/somewhere/data.tar.gz"},
    {"pfedmoe_local_widths": "0.5, 1,2.0"},
    {"max_update_norm_ratio": 0.0},
])
def test_boundary_values_are_accepted(values):
    cfg = from_dict(values)
    for key, value in values.items():
        assert getattr(cfg, key) == value


# ------------------------------------------------------------------ YAML and overrides
def test_load_config_precedence(tmp_path):
    path = tmp_path / "exp.yaml"
    path.write_text("num_rounds: 7\nlr: 0.2\nalgorithm: fedavg\n")
    cfg = load_config(path, {"lr": 0.3, "algorithm": UNSET, "seed": UNSET, "num_experts": 6})
    assert cfg.num_rounds == 7  # YAML over default
    assert cfg.lr == 0.3  # override over YAML
    assert cfg.algorithm == "fedavg"  # "<yaml>" keeps the YAML value
    assert cfg.seed == ExperimentConfig().seed  # "<yaml>" with no YAML value keeps the default
    assert cfg.num_experts == 6  # override over default
    assert cfg.config_path == str(path)


def test_load_config_without_file_uses_defaults_and_overrides():
    cfg = load_config(None, {"seed": 4, "lr": UNSET})
    assert cfg == make_config(seed=4)


def test_missing_yaml_is_named(tmp_path):
    missing = tmp_path / "nope.yaml"
    with pytest.raises(ConfigError, match="nope.yaml"):
        load_config(missing)


def test_yaml_must_be_a_mapping(tmp_path):
    path = tmp_path / "list.yaml"
    path.write_text("- 1\n- 2\n")
    with pytest.raises(ConfigError, match="list.yaml"):
        load_config(path)


def test_yaml_errors_name_the_key(tmp_path):
    path = tmp_path / "bad.yaml"
    path.write_text("num_experts: 2\ntop_m: 4\n")
    with pytest.raises(ConfigError, match="top_m"):
        load_config(path)
    path.write_text("num_expertz: 2\n")
    with pytest.raises(ConfigError, match="num_expertz"):
        load_config(path)


def test_empty_yaml_is_the_defaults(tmp_path):
    path = tmp_path / "empty.yaml"
    path.write_text("# nothing here\n")
    assert load_config(path) == ExperimentConfig(config_path=str(path))


def test_config_from_run_config_resolves_relative_to_base_dir(tmp_path):
    (tmp_path / "configs").mkdir()
    (tmp_path / "configs" / "e.yaml").write_text("num_rounds: 9\nseed: 5\n")
    run_config = {key: UNSET for key in FIELDS}
    run_config.update({"config": "configs/e.yaml", "seed": 11})
    cfg = config_from_run_config(run_config, base_dir=str(tmp_path))
    assert cfg.num_rounds == 9 and cfg.seed == 11
    assert cfg.config_path == str(tmp_path / "configs" / "e.yaml")


def test_config_from_run_config_without_yaml():
    cfg = config_from_run_config({"config": "", "num_rounds": 3, "lr": UNSET})
    assert cfg == make_config(num_rounds=3)


def test_run_config_override_is_validated():
    with pytest.raises(ConfigError, match="dirichlet_alpha"):
        config_from_run_config({"config": "", "dirichlet_alpha": -1.0})


# ------------------------------------------------------------------ pyproject.toml and configs/
def test_pyproject_declares_every_config_key_and_nothing_else():
    declared = set(_pyproject_config())
    fields = set(FIELDS)
    assert fields - declared == set(), "config keys missing from [tool.flwr.app.config]"
    assert declared - fields == {"config"}, "keys in [tool.flwr.app.config] that the config does not know"


def test_pyproject_overrides_are_all_unset_so_yaml_wins():
    values = _pyproject_config()
    not_unset = {k: v for k, v in values.items() if k != "config" and v != UNSET}
    assert not_unset == {}


def test_pyproject_comments_state_the_real_defaults():
    """The '# built-in default: X' comments must match ExperimentConfig's defaults."""
    text = (REPO_ROOT / "pyproject.toml").read_text()
    section = text.split("[tool.flwr.app.config]", 1)[1].split("\n[", 1)[0]
    defaults = ExperimentConfig()
    seen = 0
    for key, literal in re.findall(r'^(\w+)\s*=\s*"<yaml>"\s*#\s*built-in default:\s*(.+?)\s*$', section, re.M):
        assert ast.literal_eval(literal) == getattr(defaults, key), key
        seen += 1
    assert seen == len(FIELDS)


def test_pyproject_default_config_file_exists():
    path = _pyproject_config()["config"]
    assert (REPO_ROOT / path).is_file(), f"[tool.flwr.app.config] config = '{path}' does not exist"


def test_pyproject_run_config_builds_a_valid_config():
    """What `flwr run .` hands the ServerApp with no overrides must validate."""
    cfg = config_from_run_config(_pyproject_config(), base_dir=str(REPO_ROOT))
    assert isinstance(cfg, ExperimentConfig)


# configs/methods/ holds method lists for the comparison runner (tests/unit/test_compare.py)
YAMLS = sorted(p for p in (REPO_ROOT / "configs").rglob("*.yaml") if "methods" not in p.relative_to(REPO_ROOT).parts)


def test_configs_folder_has_yamls():
    assert YAMLS, "configs/ holds no YAML files"


@pytest.mark.parametrize("path", YAMLS, ids=[str(p.relative_to(REPO_ROOT)) for p in YAMLS])
def test_every_shipped_yaml_loads_and_validates(path):
    merged = load_yaml(path)  # with its `base:` chain resolved
    assert "base" not in merged
    own = yaml.safe_load(path.read_text()) or {}
    for key, value in own.items():  # the file's own keys win over its base
        if key != "base":
            assert merged[key] == value, key
    cfg = load_config(path)
    for key, value in merged.items():
        got = getattr(cfg, key)
        assert got == value or (isinstance(got, float) and got == float(value)), key


def test_yaml_base_inheritance(tmp_path):
    (tmp_path / "parent.yaml").write_text("num_rounds: 5\nlr: 0.2\nseed: 3\n")
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "child.yaml").write_text("base: ../parent.yaml\nlr: 0.5\n")  # relative to the child
    (tmp_path / "grandchild.yaml").write_text("base: sub/child.yaml\nseed: 9\n")
    cfg = load_config(tmp_path / "grandchild.yaml")
    assert (cfg.num_rounds, cfg.lr, cfg.seed) == (5, 0.5, 9)
    assert cfg.config_path == str(tmp_path / "grandchild.yaml")


def test_yaml_base_cycle_and_missing_base_are_errors(tmp_path):
    (tmp_path / "a.yaml").write_text("base: b.yaml\n")
    (tmp_path / "b.yaml").write_text("base: a.yaml\n")
    with pytest.raises(ConfigError, match="itself"):
        load_config(tmp_path / "a.yaml")
    (tmp_path / "c.yaml").write_text("base: nowhere.yaml\n")
    with pytest.raises(ConfigError, match="nowhere.yaml"):
        load_config(tmp_path / "c.yaml")


def test_invalid_yaml_syntax_is_a_config_error(tmp_path):
    (tmp_path / "broken.yaml").write_text("num_rounds: [1, 2\n")
    with pytest.raises(ConfigError, match="broken.yaml"):
        load_config(tmp_path / "broken.yaml")


def test_errors_say_where_the_key_was_set(tmp_path):
    base = tmp_path / "base.yaml"
    base.write_text("num_rounds: 3\nlr: 0.1\n")
    variant = tmp_path / "variant.yaml"
    variant.write_text(f"base: {base.name}\nseed: 1\n\nlr: -1\n")
    with pytest.raises(ConfigError, match=r"'lr' = -1.0 .*set at .*variant.yaml:4"):
        load_config(variant)
    with pytest.raises(ConfigError, match=r"'momentum' = -2.0 .*set by --run-config"):
        load_config(base, {"momentum": -2})
    (tmp_path / "typo.yaml").write_text("seed: 1\nnum_roundz: 3\n")
    with pytest.raises(ConfigError, match=r"'num_roundz' at .*typo.yaml:2; did you mean 'num_rounds'\?"):
        load_config(tmp_path / "typo.yaml")


@pytest.mark.parametrize("names", ["a,b,a", "a,,b", "a, "])
def test_duplicate_or_empty_class_names_are_refused(names):
    with pytest.raises(ConfigError, match="class_names"):
        from_dict({"class_names": names})


def test_cli_prints_one_line_and_exits_2_without_a_traceback(tmp_path):
    import subprocess
    import sys

    bad = tmp_path / "bad.yaml"
    bad.write_text("lr: -1\n")
    proc = subprocess.run([sys.executable, "-m", "fedcoe_flwr.simulate", "--config", str(bad)],
                          capture_output=True, text=True, timeout=120, cwd=REPO_ROOT)
    assert proc.returncode == 2
    assert "error: config key 'lr' = -1.0" in proc.stderr and "Traceback" not in proc.stderr
