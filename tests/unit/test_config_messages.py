"""Bad YAML and bad values are named in the error."""

from __future__ import annotations

import pytest
from fedcoe_flwr.config import ConfigError, load_config


# ------------------------------------------------------------------ invalid input
def test_invalid_yaml_is_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text("num_rounds: [1, 2\nalgorithm: fedcoe\n")
    with pytest.raises(ConfigError, match="bad.yaml.*not valid YAML"):
        load_config(bad)


@pytest.mark.parametrize("text, match", [
    ("num_roundz: 3\n", "unknown config key.*num_roundz"),
    ("num_rounds: three\n", "'num_rounds' must be a int.*three"),
    ("algorithm: fedsgd\n", "'algorithm' = 'fedsgd'"),
    ("robust_aggregation: mode\n", "'robust_aggregation' = 'mode'"),
    ("num_experts: 0\n", "'num_experts' = 0"),
    ("- a\n- b\n", "mapping"),
])
def test_invalid_config_values_are_named(tmp_path, text, match):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=match):
        load_config(path)
