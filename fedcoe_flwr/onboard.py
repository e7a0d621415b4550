"""Onboarding a new site: the cold-start package, the routed model a site keeps, the
reply it may send, and the registry the server keeps. Pure functions plus one small
piece of glue (``Onboarder``) that both the training Strategy and the serving mode use.

What moves (ALGORITHMS.md, "Cold start"; docs/DEPLOYMENT.md, "Onboarding a new site"):

* server -> node: the package = the shared gate and the expert pool (FedCoE), or the
  method's new-client model (FedAvg/FedProx: the global model);
* node -> server: its correlation row (K floats: mean gate probabilities on its own
  unlabeled images) and, when it holds labelled test images, its cold-start accuracy
  (plus counts). Never images, labels or model weights: ``check_reply`` rejects any
  reply that carries more.

The node adapts the package with no gradient step (AdaBN on its unlabeled images,
EM label-prior correction; the config's ``coldstart_*`` switches), routes (top-m experts
by its row when ``coldstart_top_m``) and saves the result as one file that
``python -m fedcoe_flwr.predict`` loads for inference without Flower.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

import numpy as np
import torch

from .config import ExperimentConfig, from_dict, saved_config
from .records import tensors_crc
from .data import IMAGE_SUFFIXES, ClientData, DataError, federation_classes, to_tensor_images

BUNDLE_FORMAT = 1
REGISTRY = "onboarding.jsonl"
# Everything a node may report back (all numbers): the routing row and metrics.
ALLOWED_METRICS = frozenset({
    "routing_row", "coldstart_accuracy", "coldstart_accuracy_plain", "coldstart_accuracy_em",
    "coldstart_accuracy_em_uniform", "coldstart_accuracy_adabn", "coldstart_accuracy_adabn_em", "model_accuracy",
    "num_test", "num_unlabeled", "can_train", "onboard_time_s", "model_bytes"})
# Keys of a serving run's config taken from the serving run instead of the checkpoint.
SERVE_KEYS = ("device", "round_timeout", "wait_for_nodes", "coldstart_adabn", "coldstart_em", "coldstart_top_m",
              "coldstart_prior", "eval_batch_size", "serve_from", "serve_max_nodes", "serve_timeout", "results_dir")


class OnboardingError(RuntimeError):
    """A package cannot be built or a reply is not acceptable; the message says why."""


# ------------------------------------------------------------------ server side: the package
def package_crc(arrays: Mapping[str, torch.Tensor]) -> int:
    """The package's CRC-32: the same package gives the same number on the server, on the
    node and in a test that rebuilds it from a checkpoint."""
    return tensors_crc(arrays)


def coldstart_package(algorithm: Any, state: Any, cfg: ExperimentConfig
                      ) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """(arrays, payload config) a new node gets: the method's new-client model."""
    if algorithm.coldstart_needs_client_parts:
        raise OnboardingError(f"{cfg.algorithm}'s new-client model averages the training clients' private parts, "
                              "which only a training round can collect; onboarding supports fedcoe, fedavg and "
                              "fedprox")
    return algorithm.coldstart_payload(state, cfg, None)


def load_checkpoint(source: str | os.PathLike) -> tuple[dict[str, Any], Path, Path]:
    """(checkpoint payload, the file, the run's results folder) from a run folder (its
    final_state.pt, else its latest checkpoint) or a checkpoint file."""
    path = Path(os.path.expanduser(str(source)))
    if path.is_dir():
        candidates = [path / "final_state.pt"] + sorted((path / "checkpoints").glob("round-*.pt"), reverse=True)
        found = next((p for p in candidates if p.is_file()), None)
        if found is None:
            raise OnboardingError(f"serve_from='{source}' holds neither final_state.pt nor checkpoints/round-*.pt")
        path = found
    if not path.is_file():
        raise OnboardingError(f"serve_from='{source}' does not exist (give a finished run's results folder, "
                              "e.g. results/deploy-fedcoe-s0, or one of its checkpoint files)")
    try:
        payload = torch.load(path, map_location="cpu", weights_only=False)
        payload["arrays"], payload["config"]  # noqa: B018 -- the keys a checkpoint must have
    except Exception as err:
        raise OnboardingError(f"'{path}' is not a readable fedcoe checkpoint: {err}") from err
    run_dir = path.parent.parent if path.parent.name == "checkpoints" else path.parent
    return payload, path, run_dir


def serving_config(checkpoint_config: Mapping[str, Any], serving: ExperimentConfig) -> ExperimentConfig:
    """The checkpoint's config (it defines the model and the label space) with the
    serving run's run-time keys."""
    values = saved_config(checkpoint_config)
    for key in SERVE_KEYS:
        values[key] = getattr(serving, key)
    return from_dict(values)


# ------------------------------------------------------------------ server side: replies, registry
def check_reply(metric_keys: Iterable[str], routing_row: list[float] | None, num_experts: int | None,
                array_records: int, config_records: int) -> str | None:
    """Why an onboarding reply must be refused (it carries more than the row and
    metrics, or the row is not K probabilities), or None."""
    if array_records or config_records:
        return f"the reply carries {array_records} array and {config_records} config record(s); only metrics may come back"
    extra = sorted(set(metric_keys) - ALLOWED_METRICS)
    if extra:
        return f"the reply carries metric(s) {extra} that onboarding does not ask for"
    if num_experts is not None:
        if routing_row is None or len(routing_row) != num_experts:
            return f"routing_row must hold {num_experts} floats, got {None if routing_row is None else len(routing_row)}"
        row = np.asarray(routing_row, dtype=float)
        if not np.isfinite(row).all() or (row < 0).any() or abs(row.sum() - 1.0) > 1e-3:
            return f"routing_row is not a probability vector: {routing_row}"
    return None


def append_registry(run_dir: str | os.PathLike, entry: Mapping[str, Any]) -> Path:
    path = Path(run_dir) / REGISTRY
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fh.write(json.dumps(dict(entry), default=float) + "\n")
        fh.flush()
        os.fsync(fh.fileno())
    return path


def read_registry(run_dir: str | os.PathLike) -> list[dict[str, Any]]:
    path = Path(run_dir) / REGISTRY
    return [json.loads(l) for l in path.read_text().splitlines() if l.strip()] if path.is_file() else []


# ------------------------------------------------------------------ node side: its data
def read_unlabeled_images(folder: str | os.PathLike, size: int) -> tuple[torch.Tensor, list[Path]]:
    """Every image under ``folder`` (sorted paths) as uint8 NCHW, resized as the training data was."""
    from .data import _decode  # the one decoder, so a site sees the pixels training saw

    root = Path(os.path.expanduser(str(folder)))
    if not root.exists():
        raise DataError(f"image folder '{root}' does not exist")
    files = [root] if root.is_file() else sorted(p for p in root.rglob("*")
                                                  if p.is_file() and p.name.lower().endswith(IMAGE_SUFFIXES))
    if not files:
        raise DataError(f"'{root}' holds no images ({', '.join(IMAGE_SUFFIXES)})")
    arrays = np.stack([_decode(p.read_bytes(), str(p), size) for p in files])
    return to_tensor_images(arrays), files


def has_labelled_layout(folder: str | os.PathLike) -> bool:
    """train/<class>/* or test/<class>/* (a .tar.gz counts as that layout)."""
    root = Path(os.path.expanduser(str(folder)))
    if root.is_file():
        return True
    return any((root / split).is_dir() and any(p.is_dir() for p in (root / split).iterdir())
               for split in ("train", "test"))


def unlabeled_only(x: torch.Tensor) -> ClientData:
    empty = torch.zeros((0, *x.shape[1:]), dtype=torch.uint8)
    return ClientData(x, torch.zeros(len(x), dtype=torch.int64), empty, torch.zeros(0, dtype=torch.int64))


def unlabeled_images(data: ClientData) -> torch.Tensor:
    """What the node adapts and routes on: its train/ images with the labels unused, or its
    test/ images when it has no train/ split."""
    return data.train_x if len(data.train_x) else data.test_x


# ------------------------------------------------------------------ node side: the routed model
@dataclass
class Onboarded:
    bundle: dict[str, Any]  # what the node saves (``save_bundle``)
    metrics: dict[str, Any]  # what the node reports (the routing row among them)


def _fedcoe_bundle(package: Mapping[str, torch.Tensor], cfg: ExperimentConfig, unlabeled: torch.Tensor,
                   num_classes: int, device: torch.device) -> tuple[dict[str, Any], list[float]]:
    """Same steps, in the same order, as ``fedcoe.coldstart_evaluate``'s configured variant:
    route (gate row before AdaBN), top-m if configured, AdaBN, EM prior on the adapted model."""
    from .algorithms.common import predict_probs
    from .algorithms.fedcoe import FedCoEModel, em_label_prior, expert_set, reestimate_batchnorm, training_prior

    model = FedCoEModel(cfg, num_classes, list(range(cfg.num_experts)), with_private=False)
    model.load_shared(package)
    model.to(device).eval()
    row = predict_probs(model.gate_probs, unlabeled, cfg, device).mean(0)
    if cfg.coldstart_top_m and cfg.experts_per_client < cfg.num_experts:
        model.expert_ids = expert_set(row.numpy(), cfg.experts_per_client, cfg.num_experts)
    adabn = bool(cfg.coldstart_adabn) and reestimate_batchnorm(model, unlabeled, cfg, device)
    train_prior = training_prior(package, cfg, num_classes)
    prior = None
    if cfg.coldstart_em:
        pool = predict_probs(lambda x: model.mixture(x)[0], unlabeled, cfg, device)
        prior = em_label_prior(pool, train_prior)
    bundle = {"expert_ids": list(model.expert_ids),
              "arrays": {k: v.detach().cpu().clone() for k, v in model.shared_state().items()},
              "adabn": adabn, "prior": None if prior is None else prior.cpu(), "train_prior": train_prior}
    return bundle, [float(v) for v in row]


def build_onboarded(package: Mapping[str, torch.Tensor], payload_config: Mapping[str, Any], data: ClientData,
                    cfg: ExperimentConfig, device: torch.device, meta: Mapping[str, Any] | None = None) -> Onboarded:
    """The node's routed, adapted model and its report, from the package and its own
    images (no gradient step, labels used only to score the labelled test split)."""
    from .algorithms import get_algorithm
    from .algorithms.common import accuracy

    t0 = time.perf_counter()
    names = federation_classes(cfg)
    num_classes = len(names)
    unlabeled = unlabeled_images(data)
    if len(unlabeled) == 0:
        raise DataError("this node has no images to adapt to")
    algo = get_algorithm(cfg.algorithm)
    bundle: dict[str, Any] = {"format": BUNDLE_FORMAT, "algorithm": cfg.algorithm, "config": cfg.to_dict(),
                              "class_names": list(names), "created": time.time(), **dict(meta or {})}
    metrics: dict[str, Any] = {"num_unlabeled": int(len(unlabeled)), "num_test": int(len(data.test_y)),
                               "can_train": int(data.num_train > 0 and len(data.train_x) > 0)}
    if cfg.algorithm == "fedcoe":
        part, row = _fedcoe_bundle(package, cfg, unlabeled, num_classes, device)
        bundle.update(part)
        bundle["routing_row"] = row
        metrics["routing_row"] = row
    else:
        bundle.update({"arrays": {k: v.detach().cpu().clone() for k, v in package.items()},
                       "payload_config": dict(payload_config)})
    if len(data.test_y):
        reported = algo.client_coldstart(package, payload_config, data, cfg, num_classes, device)
        metrics.update({k: v for k, v in reported.items() if k.startswith("coldstart_accuracy")})
        metrics["model_accuracy"] = accuracy(bundle_predictor(bundle, device), data.test_x, data.test_y, cfg, device)
    bundle["metrics"] = {k: v for k, v in metrics.items() if k != "routing_row"}
    metrics["onboard_time_s"] = time.perf_counter() - t0
    return Onboarded(bundle, metrics)


def save_bundle(bundle: Mapping[str, Any], path: str | os.PathLike) -> int:
    """One file (torch.save of plain types and tensors), written atomically; returns its size."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    with open(tmp, "wb") as fh:
        torch.save(dict(bundle), fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
    return path.stat().st_size


def load_bundle(path: str | os.PathLike) -> dict[str, Any]:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"model file '{path}' does not exist")
    bundle = torch.load(path, map_location="cpu", weights_only=True)
    if not isinstance(bundle, dict) or bundle.get("format") != BUNDLE_FORMAT:
        raise ValueError(f"'{path}' is not an onboarded fedcoe model (format {BUNDLE_FORMAT})")
    return bundle


def bundle_predictor(bundle: Mapping[str, Any], device: torch.device) -> Callable[[torch.Tensor], torch.Tensor]:
    """x (normalised float batch) -> class probabilities of the saved model."""
    cfg = from_dict(bundle["config"])
    num_classes = len(bundle["class_names"])
    if bundle["algorithm"] == "fedcoe":
        from .algorithms.fedcoe import FedCoEModel, prior_correct

        model = FedCoEModel(cfg, num_classes, [int(k) for k in bundle["expert_ids"]], with_private=False)
        model.load_shared(bundle["arrays"])
        model.to(device).eval()
        prior, train_prior = bundle.get("prior"), bundle["train_prior"]

        @torch.no_grad()
        def predict(x: torch.Tensor) -> torch.Tensor:
            probs = model.mixture(x)[0]
            if prior is not None:
                probs = prior_correct(probs.float().cpu(), prior, train_prior)
            return probs

        return predict
    from .algorithms import get_algorithm

    return get_algorithm(bundle["algorithm"]).client_predict(bundle["arrays"], bundle["payload_config"], None, cfg,
                                                            num_classes, device)


def predict_images(bundle: Mapping[str, Any], x: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Class probabilities for uint8 NCHW images."""
    from .algorithms.common import predict_probs

    return predict_probs(bundle_predictor(bundle, device), x, from_dict(bundle["config"]), device)


def finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and math.isfinite(float(value))


def grow_client_rows(extra: Mapping[str, np.ndarray], rows: int, num_experts: int) -> dict[str, np.ndarray]:
    """FedCoE's per-client server state (correlation rows) extended to ``rows`` clients, so a
    node that joins training after onboarding has its own row (uniform and unknown until it trains)."""
    out = dict(extra)
    if "correlation" in out and len(out["correlation"]) < rows:
        corr, known = out["correlation"], out["correlation_known"]
        add = rows - len(corr)
        out["correlation"] = np.concatenate([corr, np.full((add, num_experts), 1.0 / num_experts)])
        out["correlation_known"] = np.concatenate([known, np.zeros(add, dtype=bool)])
    return out
