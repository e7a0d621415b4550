"""Whether a mixture's experts specialise, measured on the global test set (issue 17, item 3):
the mutual information between the gate's top expert and the class (0 bits: routing ignores the
class; log2(K) bits at most, when each expert takes its own classes), between expert and client,
and each expert's accuracy on each class. A mixture method's ``global_diagnostics`` reports them
under the keys below; its ``write_plots`` draws them with ``plot_specialisation``."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Sequence

import matplotlib
import numpy as np
import torch

from ..config import ExperimentConfig
from .training import predict_probs

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the headless backend is chosen)

KEYS = ("expert_class_mi_bits", "expert_client_mi_bits", "prediction_class_mi_bits")
# metrics of a client's evaluation reply: its own gate's K x C top-expert counts, flattened
COUNTS_KEY, EXPERTS_KEY = "expert_class_counts", "num_experts"


def mutual_information_bits(joint: Any) -> float:
    """I(A;B) in bits of a joint distribution (or counts) given as a 2-D array."""
    p = np.asarray(joint, dtype=np.float64)
    total = p.sum()
    if total <= 0:
        return 0.0
    p = p / total
    outer = p.sum(1, keepdims=True) @ p.sum(0, keepdims=True)
    nz = p > 0
    return float(max(0.0, (p[nz] * np.log2(p[nz] / outer[nz])).sum()))


def expert_class_counts(top_expert: torch.Tensor, labels: torch.Tensor, num_experts: int,
                        num_classes: int) -> np.ndarray:
    """K x C counts: how many test images of each class the gate sends to each expert first."""
    flat = top_expert.long() * num_classes + labels.long()
    return np.bincount(flat.numpy(), minlength=num_experts * num_classes).reshape(num_experts, num_classes)


def client_gate_counts(gate: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor, y: torch.Tensor,
                       num_classes: int, cfg: ExperimentConfig, device: torch.device) -> dict[str, Any]:
    """What a client with a gate of its own reports from the global test set: the K x C counts
    of its gate's top expert per class (flattened, for a metric record) and K."""
    probs = predict_probs(gate, x, cfg, device)
    counts = expert_class_counts(probs.argmax(1), y, probs.shape[1], num_classes)
    return {COUNTS_KEY: [int(v) for v in counts.ravel()], EXPERTS_KEY: int(probs.shape[1])}


def mean_client_mi_bits(replies: Sequence[dict[str, Any]], num_classes: int) -> dict[str, float]:
    """Per-client gates: each client's I(top expert; class) from its counts, their mean over the
    clients (their experts are their own, so no joint over clients is taken), and the lowest and highest."""
    mi = [mutual_information_bits(np.asarray(r[COUNTS_KEY]).reshape(int(r[EXPERTS_KEY]), num_classes))
          for r in replies]
    if not mi:
        return {}
    return {"expert_class_mi_bits": float(np.mean(mi)), "expert_class_mi_bits_min": float(min(mi)),
            "expert_class_mi_bits_max": float(max(mi))}


def per_expert_class_accuracy(expert_probs: Sequence[torch.Tensor], labels: torch.Tensor, num_classes: int
                              ) -> list[list[float | None]]:
    """K x C: each expert alone on the test images of each class (None: no image of the class)."""
    out = []
    for probs in expert_probs:
        correct = (probs.argmax(1) == labels).float()
        out.append([float(correct[labels == c].mean()) if bool((labels == c).any()) else None
                    for c in range(num_classes)])
    return out


def specialisation(gate_probs: torch.Tensor, expert_probs: Sequence[torch.Tensor], labels: torch.Tensor,
                   num_classes: int, client_rows: Any = None) -> dict[str, Any]:
    """The diagnostics of one evaluation: ``expert_class_mi_bits`` (top expert vs class on the
    test set), ``expert_class_counts`` (its K x C table), ``expert_class_accuracy`` (K x C),
    ``prediction_class_mi_bits`` (the gate-weighted mixture's predicted class vs the class: how
    much the pool's own prediction knows of the class, the scale the routing's figure sits on) and,
    from ``client_rows`` (each training client's mean gate probabilities, one row per client,
    clients weighted alike), ``expert_client_mi_bits``."""
    num_experts = gate_probs.shape[1]
    counts = expert_class_counts(gate_probs.argmax(1), labels, num_experts, num_classes)
    mixture = sum(gate_probs[:, k:k + 1] * probs for k, probs in enumerate(expert_probs))
    predicted = expert_class_counts(mixture.argmax(1), labels, num_classes, num_classes)
    out: dict[str, Any] = {"expert_class_mi_bits": mutual_information_bits(counts),
                           "prediction_class_mi_bits": mutual_information_bits(predicted),
                           "expert_class_counts": counts.tolist(),
                           "expert_class_accuracy": per_expert_class_accuracy(expert_probs, labels, num_classes)}
    if client_rows is not None and len(client_rows):
        rows = np.asarray(client_rows, dtype=np.float64)
        out["expert_client_mi_bits"] = mutual_information_bits(rows / rows.sum(1, keepdims=True))
    return out


def plot_specialisation(diagnostics: dict[str, Any], path: Path) -> Path:
    """Two panels: the share of each class the gate sends to each expert first, and each expert's
    accuracy on each class; the mutual information in the title."""
    counts = np.asarray(diagnostics["expert_class_counts"], dtype=float)
    share = counts / np.maximum(counts.sum(0, keepdims=True), 1)
    acc = np.array([[np.nan if v is None else v for v in row] for row in diagnostics["expert_class_accuracy"]])
    fig, axes = plt.subplots(1, 2, figsize=(2.5 + 0.9 * counts.shape[1], 1.8 + 0.45 * counts.shape[0]))
    for ax, matrix, title in ((axes[0], share, "share of each class routed to the expert"),
                              (axes[1], acc, "expert alone: accuracy per class")):
        image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0, vmax=1)
        ax.set_xlabel("class")
        ax.set_ylabel("expert")
        ax.set_xticks(range(matrix.shape[1]))
        ax.set_yticks(range(matrix.shape[0]))
        ax.set_title(title, fontsize=9)
        fig.colorbar(image, ax=ax)
    mi = f"I(top expert; class) = {diagnostics['expert_class_mi_bits']:.3f} bits"
    if "expert_client_mi_bits" in diagnostics:
        mi += f", I(expert; client) = {diagnostics['expert_client_mi_bits']:.3f} bits"
    fig.suptitle(mi, fontsize=10)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path
