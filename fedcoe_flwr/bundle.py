"""The model file an onboarded site keeps: the method's adapted new-client model plus
its config and label space, saved with tensors and plain data only, so that
``python -m fedcoe_flwr.predict`` can use it without Flower and loading it runs no code."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Mapping

import torch

from .algorithms import get_algorithm
from .algorithms.base import Predictor
from .algorithms.training import predict_probs
from .config import from_dict, saved_config
from .fileio import atomic_write

BUNDLE_FORMAT = 1


def save_bundle(bundle: Mapping[str, Any], path: str | os.PathLike) -> int:
    """One file, written atomically; returns its size."""
    path = atomic_write(path, lambda fh: torch.save(dict(bundle), fh))
    return path.stat().st_size


def load_bundle(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file '{path}' does not exist")
    bundle = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(bundle, dict) or bundle.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"'{path}' is not an onboarded fedcoe-flwr model (format {BUNDLE_FORMAT})")
    return bundle


def bundle_predictor(bundle: Mapping[str, Any], device: torch.device) -> Predictor:
    """x (normalised float batch) -> class probabilities of the saved model."""
    cfg = from_dict(saved_config(bundle["config"]))
    return get_algorithm(bundle["algorithm"]).bundle_predictor(bundle, cfg, len(bundle["class_names"]), device)


def predict_images(bundle: Mapping[str, Any], x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Class probabilities for uint8 NCHW images."""
    return predict_probs(bundle_predictor(bundle, device), x, from_dict(saved_config(bundle["config"])), device)
