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


def flower_log_of(error: Exception, monkeypatch, debug: str = "") -> str:
    """What Flower's own logger prints when an app raised ``error`` (it logs with exc_info)."""
    import io
    import logging
    from flwr.common.logger import log
    from fedcoe_flwr.cli import quiet_user_errors_in_flower_logs
    monkeypatch.setenv("FEDCOE_DEBUG", debug)
    quiet_user_errors_in_flower_logs()
    quiet_user_errors_in_flower_logs()  # idempotent: one filter however often the app modules load
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    logger = logging.getLogger("flwr")
    logger.addHandler(handler)
    try:
        raise error
    except Exception as ex:
        log(logging.ERROR, "%s raised an exception", "ServerApp", exc_info=ex)
    finally:
        logger.removeHandler(handler)
    return stream.getvalue()


def test_flower_logs_a_user_error_in_one_line_and_anything_else_with_its_traceback(monkeypatch):
    text = flower_log_of(ConfigError("config key 'lr' = -1.0 is not allowed: must be > 0", "lr"), monkeypatch)
    assert "ServerApp raised an exception: config key 'lr' = -1.0 is not allowed" in text
    assert "Traceback" not in text and "FEDCOE_DEBUG=1" in text
    assert "Traceback" in flower_log_of(ConfigError("bad", "lr"), monkeypatch, debug="1")
    assert "Traceback" in flower_log_of(RuntimeError("a bug"), monkeypatch)
