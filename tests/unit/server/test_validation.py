"""Reply validation at the server (a pure function) and the personalised summary."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from fedcoe_flwr.algorithms.fedcoe import FedCoE
from fedcoe_flwr.server.evaluation import summarise_personalised
from fedcoe_flwr.server.validation import validate_reply


def sound():
    """A payload, the expected upload spec, and a sound reply to it."""
    torch.manual_seed(0)
    payload = {
        "gate.w": torch.randn(4, 3),
        "expert.0.bn.running_mean": torch.zeros(3),
        "expert.0.bn.running_var": torch.ones(3),
        "expert.0.bn.num_batches_tracked": torch.tensor(5),
    }
    expected = {k: (tuple(v.shape), v.dtype) for k, v in payload.items()}
    expected["correlation"] = ((3,), torch.float32)
    arrays = {k: v.clone() for k, v in payload.items()}
    arrays["gate.w"] += 0.1
    arrays["expert.0.bn.num_batches_tracked"] += 3
    arrays["correlation"] = torch.tensor([0.2, 0.5, 0.3])
    return arrays, {"num_samples": 40, "train_loss": 0.7}, expected, payload


def check(arrays, metrics, expected, payload, ratio=100.0):
    """The generic checks, then FedCoE's own (its correlation row must be a probability vector)."""
    return validate_reply(arrays, metrics, expected, payload, ratio, lambda a: FedCoE().validate_upload(a, None))


def test_sound_reply_is_accepted():
    assert check(*sound()) is None


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_values_are_rejected(bad):
    arrays, metrics, expected, payload = sound()
    arrays["gate.w"][1, 2] = bad
    reason = check(arrays, metrics, expected, payload)
    assert reason and "gate.w" in reason and "NaN or Inf" in reason


def test_non_finite_correlation_is_rejected():
    arrays, metrics, expected, payload = sound()
    arrays["correlation"] = torch.tensor([float("nan"), 0.5, 0.5])
    assert "correlation" in check(arrays, metrics, expected, payload)


def test_wrong_shape_is_rejected():
    arrays, metrics, expected, payload = sound()
    arrays["gate.w"] = torch.zeros(3, 4)
    reason = check(arrays, metrics, expected, payload)
    assert reason and "gate.w" in reason and "shape" in reason


def test_wrong_dtype_is_rejected():
    arrays, metrics, expected, payload = sound()
    arrays["gate.w"] = arrays["gate.w"].double()
    reason = check(arrays, metrics, expected, payload)
    assert reason and "dtype" in reason
    arrays, metrics, expected, payload = sound()
    arrays["expert.0.bn.num_batches_tracked"] = torch.tensor(5.0)
    assert "dtype" in check(arrays, metrics, expected, payload)


def test_missing_and_extra_keys_are_rejected():
    arrays, metrics, expected, payload = sound()
    del arrays["correlation"]
    reason = check(arrays, metrics, expected, payload)
    assert reason and "missing" in reason and "correlation" in reason
    arrays, metrics, expected, payload = sound()
    arrays["local.head.weight"] = torch.zeros(2)  # a private part must never be uploaded
    reason = check(arrays, metrics, expected, payload)
    assert reason and "local.head.weight" in reason


@pytest.mark.parametrize("n", [0, -5, 3.0, 2.5, "40", None, True])
def test_num_samples_must_be_a_positive_int(n):
    arrays, metrics, expected, payload = sound()
    metrics["num_samples"] = n
    reason = check(arrays, metrics, expected, payload)
    assert reason and "num_samples" in reason


def test_num_samples_missing_is_rejected():
    arrays, metrics, expected, payload = sound()
    del metrics["num_samples"]
    assert "num_samples" in check(arrays, metrics, expected, payload)


@pytest.mark.parametrize("row", [[0.5, 0.5, 0.5], [0.2, 0.2, 0.2], [1.2, -0.1, -0.1], [0.0, 0.0, 0.0]])
def test_correlation_row_must_be_a_probability_vector(row):
    arrays, metrics, expected, payload = sound()
    arrays["correlation"] = torch.tensor(row)
    reason = check(arrays, metrics, expected, payload)
    assert reason and "correlation" in reason


def test_correlation_row_tolerates_rounding():
    arrays, metrics, expected, payload = sound()
    arrays["correlation"] = torch.tensor([0.3333, 0.3333, 0.3335])
    assert check(arrays, metrics, expected, payload) is None


def test_update_norm_bound():
    arrays, metrics, expected, payload = sound()
    bound = 100.0 * (float(payload["gate.w"].norm()) + 1.0)
    arrays["gate.w"] = payload["gate.w"] + torch.full((4, 3), 1.01 * bound / math.sqrt(12))
    reason = check(arrays, metrics, expected, payload)
    assert reason and "gate.w" in reason and "norm" in reason
    arrays["gate.w"] = payload["gate.w"] + torch.full((4, 3), 0.99 * bound / math.sqrt(12))
    assert check(arrays, metrics, expected, payload) is None
    arrays["gate.w"] = payload["gate.w"] + 1e6
    assert check(arrays, metrics, expected, payload, ratio=0.0) is None  # 0 switches the check off


def test_batchnorm_statistics_are_exempt_from_the_norm_bound():
    arrays, metrics, expected, payload = sound()
    arrays["expert.0.bn.running_var"] = torch.full((3,), 1e5)  # new local statistics, legitimately far
    assert check(arrays, metrics, expected, payload) is None


def test_summarise_personalised():
    out = summarise_personalised([0.5, 1.0, 0.0, 0.75], [10, 30, 10, 50])
    assert out["personalized_accuracy"] == pytest.approx((5 + 30 + 0 + 37.5) / 100)
    assert out["personalized_accuracy_mean"] == pytest.approx(0.5625)
    assert out["personalized_accuracy_p10"] == pytest.approx(np.percentile([0.5, 1.0, 0.0, 0.75], 10))
    assert out["personalized_accuracy_p10"] == pytest.approx(0.15)
