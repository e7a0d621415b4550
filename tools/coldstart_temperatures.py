"""Cold-start accuracy with EM at each softmax temperature, for saved rounds of a finished run:
how much the federation's temperature calibration (``em_calibrated``) is worth, and whether
its choice (lowest NLL on the training clients' labelled local test splits) is near the best.

    python -m tools.coldstart_temperatures RUN_DIR ROUND [ROUND ...] [--temperatures 1 1.5 2 3]

Needs the rounds' checkpoints (``keep_checkpoints`` at least the run's rounds to keep them
all) and a method whose new-client model needs no private parts (FedAvg, FedProx, FedCoE).
Prints, per temperature, the training clients' held-out NLL, their mean top probability, and
the cold-start clients' sample-weighted accuracy with EM from the prior predicted at that
temperature."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Callable

import torch

from fedcoe_flwr.algorithms import get_algorithm
from fedcoe_flwr.algorithms.adaptation import (HELDOUT_NLL_KEY, TEMPERATURES, em_label_prior, federation_calibration,
                                               prior_correct, prior_share, tempered, tempered_prior)
from fedcoe_flwr.algorithms.base import ClientStep, ServerState
from fedcoe_flwr.algorithms.training import predict_probs
from fedcoe_flwr.config import ExperimentConfig, from_dict, saved_config
from fedcoe_flwr.data import federation_classes, load_client_data
from fedcoe_flwr.server.callbacks.checkpoint import CheckpointError, load_checkpoint

CPU = torch.device("cpu")


def saved_package(run_dir: Path, server_round: int) -> tuple[ExperimentConfig, ServerState, dict, dict, int]:
    """A saved round's config, server state, cold-start package (arrays and config) and number
    of classes."""
    payload = load_checkpoint(run_dir / "checkpoints" / f"round-{server_round:05d}.pt")
    cfg = from_dict(saved_config(payload["config"]))
    algorithm = get_algorithm(cfg.algorithm)
    if algorithm.coldstart_needs_client_parts:
        raise SystemExit(f"{cfg.algorithm}'s new-client model averages the clients' private parts, "
                         "which a checkpoint does not hold")
    state = ServerState(payload["arrays"], payload["extra"])
    arrays, config = algorithm.coldstart_payload(state, cfg, None)
    return cfg, state, arrays, config, len(federation_classes(cfg))


def scan(run_dir: Path, server_round: int, temperatures: list[float]) -> list[dict[str, float]]:
    cfg, _, arrays, config, num_classes = saved_package(run_dir, server_round)
    predict, _ = get_algorithm(cfg.algorithm).new_client_model(ClientStep(arrays, config, None, None, cfg, num_classes, CPU))
    train = [load_client_data(cfg, i) for i in range(cfg.num_clients)]
    cold = [load_client_data(cfg, cfg.num_clients + i) for i in range(cfg.num_coldstart_clients)]
    # the training clients' replies to the prior exchange, at the scan's temperatures
    shares = [prior_share(predict, d, cfg, CPU, temperatures) for d in train]
    chosen = federation_calibration([prior_share(predict, d, cfg, CPU) for d in train])
    held = [(predict_probs(predict, d.test_x, cfg, CPU), len(d.test_y)) for d in train]
    n_held = sum(n for _, n in held)
    cold_probs = [(predict_probs(predict, d.train_x, cfg, CPU), predict_probs(predict, d.test_x, cfg, CPU), d.test_y)
                  for d in cold]
    rows = []
    for i, t in enumerate(temperatures):
        prior = tempered_prior(shares, i, len(temperatures))
        nll = sum(s[HELDOUT_NLL_KEY][i] for s in shares) / n_held
        top = sum(float(tempered(h, t).max(1).values.sum()) for h, _ in held) / n_held
        correct = sum(float((prior_correct(tempered(te, t), em_label_prior(tempered(pool, t), prior), prior)
                             .argmax(1) == y).float().sum()) for pool, te, y in cold_probs)
        rows.append({"temperature": t, "heldout_nll": nll, "mean_top_prob": top,
                     "coldstart_em": correct / sum(len(y) for _, _, y in cold_probs),
                     "chosen": chosen is not None and chosen.temperature == t})
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("run_dir", type=Path)
    parser.add_argument("rounds", type=int, nargs="+")
    parser.add_argument("--temperatures", type=float, nargs="+", default=sorted(TEMPERATURES))
    args = parser.parse_args(argv)
    return print_tables(args.run_dir, args.rounds, lambda r: scan(args.run_dir, r, args.temperatures),
                        ["temperature", "held-out NLL", "mean top prob.", "cold-start EM %", "federation's choice"],
                        lambda r: [f"{r['temperature']:g}", f"{r['heldout_nll']:.4f}", f"{r['mean_top_prob']:.3f}",
                                   f"{100 * r['coldstart_em']:.2f}", "yes" if r["chosen"] else ""])


def print_tables(run_dir: Path, rounds: list[int], scan_round: Callable[[int], list[dict]], header: list[str],
                 cells: Callable[[dict], list[str]]) -> int:
    """One markdown table of ``scan_round``'s rows per saved round; 2 and a short error when a
    round's checkpoint is missing or unreadable."""
    for server_round in rounds:
        try:
            rows = scan_round(server_round)
        except CheckpointError as err:
            print(f"error: {err}", file=sys.stderr)
            return 2
        print(f"{run_dir.name}, round {server_round}:")
        print("| " + " | ".join(header) + " |")
        print("|" + "---|" * len(header))
        for r in rows:
            print("| " + " | ".join(cells(r)) + " |")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
