"""The class groups of a finished FedCoE run with ``assignment_level=class_groups``: the map it
ended with, and the maps the grouping search gives from the final pool's own confusions (its
mixture's predicted-class co-occurrence on the official test set, no labels used), from the
run's map and with restarts. The likeness is the search's objective (lift summed within groups).

    python scripts/class_groups_of_run.py results/compare_cifar10_dir0.1-fedcoe_wide_groups_shared-s2"""

import argparse
import sys
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
from fedcoe_flwr.algorithms.fedcoe.aggregation import _likeness, class_groups  # noqa: E402
from fedcoe_flwr.algorithms.fedcoe.algorithm import cooccurrence, predicted_mixture  # noqa: E402
from fedcoe_flwr.algorithms.fedcoe.coldstart import pool_model  # noqa: E402
from fedcoe_flwr.config import from_dict  # noqa: E402
from fedcoe_flwr.data import federation_classes, load_global_test  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a finished run's folder (its final_state.pt)")
    parser.add_argument("--restarts", type=int, default=8)
    args = parser.parse_args()
    payload = torch.load(Path(args.run) / "final_state.pt", weights_only=False)
    cfg = from_dict(payload["config"])
    names = federation_classes(cfg)
    if "class_expert" not in payload["extra"]:
        raise SystemExit(f"{args.run}: no class map (not a run with assignment_level=class_groups)")
    final = np.asarray(payload["extra"]["class_expert"], dtype=np.int64)
    x, _ = load_global_test(cfg)
    model = pool_model(payload["arrays"], cfg, len(names), torch.device("cpu"))
    joint = cooccurrence(predicted_mixture(model, x, cfg, torch.device("cpu"))).double().numpy()
    marginal = joint.sum(1)
    lift = (joint + joint.T) / 2 / np.maximum(np.outer(marginal, marginal), 1e-12)
    np.fill_diagonal(lift, 0.0)
    for label, group in (("the run's final map", final),
                         ("searched from it", class_groups(joint, cfg.num_experts, final)),
                         (f"with {args.restarts} restarts", class_groups(joint, cfg.num_experts, final, args.restarts))):
        groups = ["{" + ", ".join(names[c] for c in np.flatnonzero(group == k)) + "}" for k in range(cfg.num_experts)]
        print(f"{label:22s} likeness {_likeness(lift, group):6.2f}  " + "  ".join(groups))


if __name__ == "__main__":
    main()
