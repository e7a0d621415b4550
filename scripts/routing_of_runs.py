"""Where a FedCoE run's global accuracy comes from, from its records alone (the last evaluation
in ``metrics.jsonl``): the unadapted mixture against the shared expert alone, each expert
alone, the mixture routed label-free by the shared expert's class probabilities through the
class map, and routed by the label (the oracle), with the gate's routing accuracy.

    python scripts/routing_of_runs.py docs/results/runs/routing/*"""

import argparse
import json
from pathlib import Path

COLUMNS = (("mixture", "global_accuracy"), ("shared expert alone", "shared_expert_global_accuracy"),
           ("shared-posterior routing", "shared_routing_global_accuracy"),
           ("oracle routing", "oracle_routing_global_accuracy"), ("gate routes right", "gate_routing_accuracy"))


def last_evaluation(run: Path) -> dict:
    lines = [line for line in (run / "metrics.jsonl").read_text().splitlines() if line.strip()]
    return json.loads(lines[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", type=Path, help="run folders (each with metrics.jsonl)")
    args = parser.parse_args()
    print("| run | round | " + " | ".join(name for name, _ in COLUMNS) + " | experts alone |")
    print("|---|---|" + "---|" * (len(COLUMNS) + 1))
    for run in args.runs:
        last = last_evaluation(run)
        cells = [f"{100 * last[key]:.2f}" if isinstance(last.get(key), (int, float)) else "-" for _, key in COLUMNS]
        experts = ", ".join(f"{100 * v:.1f}" for v in last.get("expert_global_accuracy") or [])
        print(f"| {run.name} | {last['round']} | " + " | ".join(cells) + f" | {experts} |")


if __name__ == "__main__":
    main()
