"""The generic checks of a training reply: the keys, shapes and dtypes the method
expects, finite values, a sane sample count and a bounded update norm. The method's own
checks (``Algorithm.validate_upload``) run after these."""

from __future__ import annotations

from typing import Any, Callable, Mapping

import numpy as np
import torch

from ..algorithms.training import BN_STATISTICS

Arrays = Mapping[str, torch.Tensor]


def validate_reply(arrays: Arrays, metrics: Mapping[str, Any],
                   expected: Mapping[str, tuple[tuple[int, ...], torch.dtype]],
                   payload: Arrays, max_norm_ratio: float,
                   method_check: Callable[[Arrays], str | None] | None = None) -> str | None:
    """The reason a training reply must be rejected, or None when it is sound."""
    missing = sorted(set(expected) - set(arrays))
    extra = sorted(set(arrays) - set(expected))
    if missing or extra:
        return f"unexpected keys (missing {missing[:3]}, extra {extra[:3]})"
    deltas: dict[str, float] = {}
    for key, (shape, dtype) in expected.items():
        value = arrays[key]
        if tuple(value.shape) != shape:
            return f"'{key}' has shape {tuple(value.shape)}, expected {shape}"
        if value.dtype != dtype:
            return f"'{key}' has dtype {value.dtype}, expected {dtype}"
        if not value.is_floating_point():
            continue
        ref = payload.get(key)
        if ref is not None and ref.is_floating_point() and ref.shape == value.shape:
            # one pass: the norm of the update is finite exactly when the update is (the payload is)
            deltas[key] = float(torch.linalg.vector_norm(value.float() - ref.float()))
            finite = np.isfinite(deltas[key]) or bool(torch.isfinite(value).all())
        else:
            finite = bool(torch.isfinite(value).all())
        if not finite:
            return f"'{key}' holds NaN or Inf"
    n = metrics.get("num_samples")
    if not isinstance(n, int) or isinstance(n, bool) or n < 1:
        return f"num_samples must be a positive integer, got {n!r}"
    if method_check is not None:
        reason = method_check(arrays)
        if reason:
            return reason
    if max_norm_ratio > 0:
        # only what the client sends back: a payload may also carry read-only parts (FedMoE-DA's relayed experts)
        for key, delta in deltas.items():
            if not key.endswith(BN_STATISTICS):
                bound = max_norm_ratio * (float(torch.linalg.vector_norm(payload[key].float())) + 1.0)
                if not delta <= bound:
                    return f"update of '{key}' has norm {delta:.3g} > bound {bound:.3g}"
    return None
