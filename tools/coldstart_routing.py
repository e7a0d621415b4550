"""Where FedCoE's cold-start accuracy comes from: for saved rounds of a finished FedCoE run
(``class_groups`` assignment), the cold-start clients' sample-weighted accuracy with EM at the
federation's temperature (``em_calibrated``) when the pool is routed by the gate (the
configured model) or by each image's label through the class map (the oracle), at each weight
of the shared expert, beside the global mixture's raw accuracy.

    python -m tools.coldstart_routing RUN_DIR ROUND [ROUND ...] [--weights 0 0.25 0.5 0.75 1]

Each weight gets its own calibration: the training clients' prior exchange is recomputed with
the mixture at that weight, as a federation running it would."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch
import torch.nn.functional as F

from fedcoe_flwr.algorithms.adaptation import em_label_prior, federation_calibration, prior_correct, prior_share, tempered
from fedcoe_flwr.algorithms.fedcoe.coldstart import pool_model
from fedcoe_flwr.algorithms.fedcoe.model import routed_mixture, split_pool_outputs
from fedcoe_flwr.algorithms.training import predict_probs
from fedcoe_flwr.data import load_client_data, load_global_test

from .coldstart_temperatures import CPU, print_tables, saved_package


def scan(run_dir: Path, server_round: int, weights: list[float]) -> list[dict[str, float]]:
    cfg, state, arrays, _, num_classes = saved_package(run_dir, server_round)
    if "class_expert" not in state.extra:
        raise SystemExit(f"{run_dir.name} has no class map: run it with assignment_level=class_groups")
    if cfg.shared_expert_weight <= 0:
        raise SystemExit(f"{run_dir.name} has no shared expert (shared_expert_weight={cfg.shared_expert_weight:g}) "
                         "to weigh")
    k = cfg.num_experts
    to_expert = F.one_hot(torch.as_tensor(state.extra["class_expert"]).long(), k).float()
    model = pool_model(arrays, cfg, num_classes, CPU)

    def outputs(x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor], torch.Tensor]:
        return split_pool_outputs(predict_probs(model.pool_outputs, x, cfg, CPU), k, num_classes)

    def mixture(parts, weight: float, route: torch.Tensor | None = None) -> torch.Tensor:
        gate, experts, shared = parts
        return routed_mixture(gate if route is None else route, experts, shared, weight)

    train = [load_client_data(cfg, i) for i in range(cfg.num_clients)]
    cold = [load_client_data(cfg, cfg.num_clients + i) for i in range(cfg.num_coldstart_clients)]
    cold_parts = [(outputs(d.train_x), outputs(d.test_x), d.test_y) for d in cold]
    x, y = load_global_test(cfg)
    global_parts = outputs(x)
    n = sum(len(labels) for _, _, labels in cold_parts)
    rows = []
    for weight in weights:
        model.shared_expert_weight = weight
        calibration = federation_calibration([prior_share(lambda b: model.mixture(b)[0], d, cfg, CPU) for d in train])
        if calibration is None:
            raise SystemExit(f"{run_dir.name}: no training client has a local test split to calibrate on")
        t, train_prior = calibration.temperature, calibration.prior
        correct = {"gate": 0.0, "oracle": 0.0}
        for unlabeled, test, labels in cold_parts:
            prior = em_label_prior(tempered(mixture(unlabeled, weight), t), train_prior)
            for name, route in (("gate", None), ("oracle", to_expert[labels])):
                probs = prior_correct(tempered(mixture(test, weight, route), t), prior, train_prior)
                correct[name] += float((probs.argmax(1) == labels).sum())
        rows.append({"weight": weight, "temperature": t,
                     "global_raw": float((mixture(global_parts, weight).argmax(1) == y).float().mean()),
                     "coldstart_gate": correct["gate"] / n, "coldstart_oracle": correct["oracle"] / n})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("rounds", type=int, nargs="+")
    parser.add_argument("--weights", type=float, nargs="+", default=[0.0, 0.25, 0.5, 0.75, 1.0])
    args = parser.parse_args(argv)
    outside = [w for w in args.weights if not 0.0 <= w <= 1.0]
    if outside:
        parser.error(f"--weights: {outside[0]:g} is not a shared-expert weight in [0, 1]")
    return print_tables(args.run_dir, args.rounds, lambda r: scan(args.run_dir, r, args.weights),
                        ["shared expert weight", "temperature", "global raw %", "cold-start, gate-routed %",
                         "cold-start, routed by the label %"],
                        lambda r: [f"{r['weight']:g}", f"{r['temperature']:g}", f"{100 * r['global_raw']:.2f}",
                                   f"{100 * r['coldstart_gate']:.2f}", f"{100 * r['coldstart_oracle']:.2f}"])


if __name__ == "__main__":
    raise SystemExit(main())
