"""Run every method on identical partitions and seeds and write the comparison table:

    python -m fedcoe_flwr.compare --config configs/cifar10_dir0.1_cpu.yaml --seeds 0 1 2

Each (method, seed) runs in its own process (``python -m fedcoe_flwr.simulate``)
under ``results/<config>-<method>-s<seed>``; runs whose summary says ``finished``
are skipped, interrupted ones resume from their last checkpoint. Writes
``<out>/comparison.md`` (mean and std over seeds of global, personalised and
cold-start accuracy, bytes per client per round, wall time) and ``<out>/curves.png``.

A method is an algorithm name, or ``label:key=value,key=value`` for a variant, e.g.
``fedavg_wide:algorithm=fedavg,width_multiplier=2.0`` (capacity-matched FedAvg)."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np

from .config import ALGORITHMS, load_config
from .simulate import parse_overrides

METRICS = (("global_accuracy", "global"), ("personalized_accuracy", "personalised"),
           ("coldstart_accuracy", "cold-start"))


def parse_method(spec: str) -> tuple[str, dict[str, Any]]:
    if ":" not in spec:
        if spec not in ALGORITHMS:
            raise SystemExit(f"unknown method '{spec}'; choose from {', '.join(ALGORITHMS)} or label:key=value,...")
        return spec, {"algorithm": spec}
    label, rest = spec.split(":", 1)
    overrides = parse_overrides([kv for kv in rest.split(",") if kv])
    overrides.setdefault("algorithm", label)
    return label, overrides


def run_dir(results_dir: Path, stem: str, label: str, seed: int) -> Path:
    return results_dir / f"{stem}-{label}-s{seed}"


def run_one(config: str, label: str, overrides: dict[str, Any], seed: int, results_dir: Path,
            extra: list[str]) -> dict[str, Any]:
    stem = Path(config).stem
    out = run_dir(results_dir, stem, label, seed)
    summary_path = out / "summary.json"
    if summary_path.is_file() and json.loads(summary_path.read_text()).get("status") == "finished":
        print(f"[compare] {out.name}: finished earlier, skipped", flush=True)
        return json.loads(summary_path.read_text())
    resume = any((out / "checkpoints").glob("round-*.pt"))
    sets = {**overrides, "seed": seed, "run_name": out.name, "results_dir": str(results_dir), "resume": resume}
    cmd = [sys.executable, "-m", "fedcoe_flwr.simulate", "--config", config, "--set",
           *[f"{k}={v}" for k, v in sets.items()], *extra]
    print(f"[compare] {out.name}: {'resuming' if resume else 'running'}", flush=True)
    proc = subprocess.run(cmd)
    if proc.returncode != 0 or not summary_path.is_file():
        raise SystemExit(f"[compare] {out.name} failed (exit {proc.returncode}); rerun the same command to resume")
    return json.loads(summary_path.read_text())


def history(out: Path) -> list[dict[str, Any]]:
    path = out / "metrics.jsonl"
    return [json.loads(l) for l in path.read_text().splitlines()] if path.is_file() else []


def mean_std(values: list[float]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "n/a"
    return f"{100 * np.mean(vals):.2f} ± {100 * np.std(vals):.2f}"


def table(rows: list[tuple[str, list[dict[str, Any]]]], num_clients: int) -> str:
    head = ("| method | global acc. % | personalised acc. % | cold-start acc. % | "
            "MB per client per round (down + up) | p2p MB relayed per client per round | wall time s | global from |")
    lines = [head, "|" + "---|" * 8]
    for label, summaries in rows:
        finals = [s.get("final", {}) for s in summaries]
        rounds = [max(1, s.get("rounds_completed", 1)) for s in summaries]
        comm = [s.get("communication", {}) for s in summaries]
        per_round = [(c.get("bytes_down", 0) + c.get("bytes_up", 0)) / r / num_clients / 1e6
                     for c, r in zip(comm, rounds)]
        p2p = [c.get("bytes_p2p_relayed", 0) / r / num_clients / 1e6 for c, r in zip(comm, rounds)]
        wall = [s.get("wall_time_s", 0) for s in summaries]
        source = finals[0].get("global_accuracy_source", "") if finals else ""
        cells = [mean_std([f.get(k) for f in finals]) for k, _ in METRICS]
        lines.append(f"| {label} | " + " | ".join(cells) +
                     f" | {np.mean(per_round):.3f} | {np.mean(p2p):.3f} | {np.mean(wall):.0f} | {source} |")
    return "\n".join(lines)


def plot(curves: dict[str, list[list[dict[str, Any]]]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, (key, title) in zip(axes, METRICS):
        for label, runs in curves.items():
            rounds = sorted({h["round"] for run in runs for h in run if h.get(key) is not None})
            if not rounds:
                continue
            means = [np.mean([h[key] for run in runs for h in run if h["round"] == r and h.get(key) is not None])
                     for r in rounds]
            ax.plot(rounds, means, marker="o", label=label)
        ax.set_title(f"{title} accuracy (mean over seeds)")
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", required=True)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=["fedcoe", "fedavg", "fedprox", "fedper", "pfedmoe",
                                                          "fedmoe_da", "local"])
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    parser.add_argument("--results-dir", default="results")
    parser.add_argument("--out", default=None, help="where the table and plot go (default results/compare-<config>)")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, parse_overrides(args.set))  # fail fast on a bad config
    results_dir = Path(args.results_dir).resolve()
    stem = Path(args.config).stem
    out = Path(args.out or results_dir / f"compare-{stem}")
    out.mkdir(parents=True, exist_ok=True)
    methods = [parse_method(m) for m in args.methods]
    common = parse_overrides(args.set)
    rows, curves = [], {}
    for label, overrides in methods:
        summaries = [run_one(args.config, label, {**common, **overrides}, seed, results_dir, [])
                     for seed in args.seeds]
        rows.append((label, summaries))
        curves[label] = [history(run_dir(results_dir, stem, label, s)) for s in args.seeds]
    text = (f"Config `{args.config}`{' with ' + ' '.join(args.set) if args.set else ''}, seeds "
            f"{' '.join(map(str, args.seeds))}; final evaluation, mean ± std over seeds.\n"
            f"Command: `python -m fedcoe_flwr.compare --config {args.config} --seeds "
            f"{' '.join(map(str, args.seeds))} --methods {' '.join(args.methods)}"
            f"{' --set ' + ' '.join(args.set) if args.set else ''}`\n\n" + table(rows, cfg.num_clients) + "\n")
    (out / "comparison.md").write_text(text)
    plot(curves, out / "curves.png")
    print(text)
    print(f"[compare] wrote {out / 'comparison.md'} and {out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
