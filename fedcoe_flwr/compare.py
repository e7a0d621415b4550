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

from .algorithms import REGISTRY as ALGORITHMS
from .config import load_config, method_only_keys, saved_config
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
    done = finished(out)
    if done:
        refuse_if_stale(done, config, overrides, seed)
        print(f"[compare] {out.name}: finished earlier, skipped", flush=True)
        return done
    resume = any((out / "checkpoints").glob("round-*.pt"))
    sets = {**overrides, "seed": seed, "run_name": out.name, "results_dir": str(results_dir), "resume": resume}
    cmd = [sys.executable, "-m", "fedcoe_flwr.simulate", "--config", config, "--set",
           *[f"{k}={v}" for k, v in sets.items()], *extra]
    print(f"[compare] {out.name}: {'resuming' if resume else 'running'}", flush=True)
    proc = subprocess.run(cmd)
    if proc.returncode != 0 or not summary_path.is_file():
        raise SystemExit(f"[compare] {out.name} failed (exit {proc.returncode}); rerun the same command to resume")
    return {**json.loads(summary_path.read_text()), "run_dir": str(out)}


# Keys that say where and how a run ran, not what it computed.
BOOKKEEPING_KEYS = frozenset({"run_name", "results_dir", "resume", "resume_from", "config_path", "data_root",
                              "cache_dir", "device", "keep_checkpoints", "round_timeout", "wait_for_nodes"})


def stale_keys(summary: dict[str, Any], config: str, overrides: dict[str, Any], seed: int
               ) -> list[tuple[str, Any, Any]]:
    """(key, the finished run's value, the requested value) for every computing key that
    differs (FedCoE's own keys only for FedCoE): a run finished under older defaults must
    not stand in for the requested one.
    A key the run's config lacks (added later) counts as it ran (``config.saved_config``)."""
    requested = load_config(config, {**overrides, "seed": seed}).to_dict()
    ran = saved_config(summary.get("config", {}))
    ignored = BOOKKEEPING_KEYS | method_only_keys(requested["algorithm"])
    return [(k, ran[k], v) for k, v in requested.items() if k not in ignored and ran[k] != v]


def refuse_if_stale(summary: dict[str, Any], config: str, overrides: dict[str, Any], seed: int) -> None:
    diff = stale_keys(summary, config, overrides, seed)
    if diff:
        shown = ", ".join(f"{k}: ran {a!r}, requested {b!r}" for k, a, b in diff[:5])
        raise SystemExit(f"[compare] {Path(summary['run_dir']).name} finished under a different config ({shown}); "
                         "move that folder aside or give the method another label")


def finished(out: Path) -> dict[str, Any] | None:
    """The summary of a finished run, or None."""
    path = out / "summary.json"
    if path.is_file():
        summary = json.loads(path.read_text())
        if summary.get("status") == "finished":
            return {**summary, "run_dir": str(out)}
    return None


def history(out: Path, name: str = "metrics.jsonl") -> list[dict[str, Any]]:
    path = out / name
    return [json.loads(l) for l in path.read_text().splitlines()] if path.is_file() else []


def seconds_per_round(summary: dict[str, Any]) -> float:
    """Mean wall time of a training round (sampling to aggregation), from rounds.jsonl:
    the compute a round costs on this machine, evaluation excluded."""
    rounds = history(Path(summary["run_dir"]), "rounds.jsonl") if "run_dir" in summary else []
    times = [r["time_s"] for r in rounds if r.get("time_s") is not None]
    return float(np.mean(times)) if times else float("nan")


def mean_std(values: list[float]) -> str:
    vals = [v for v in values if v is not None]
    if not vals:
        return "n/a"
    return f"{100 * np.mean(vals):.2f} ± {100 * np.std(vals):.2f}"


def table(rows: list[tuple[str, list[dict[str, Any]]]], num_clients: int) -> str:
    head = ("| method | global acc. % | personalised acc. % | cold-start acc. % | "
            "MB per client per round (down + up) | p2p MB relayed per client per round | s per round | "
            "wall time s | seeds | global from |")
    lines = [head, "|" + "---|" * 10]
    for label, summaries in rows:
        finals = [s.get("final", {}) for s in summaries]
        rounds = [max(1, s.get("rounds_completed", 1)) for s in summaries]
        comm = [s.get("communication", {}) for s in summaries]
        per_round = [(c.get("bytes_down", 0) + c.get("bytes_up", 0)) / r / num_clients / 1e6
                     for c, r in zip(comm, rounds)]
        p2p = [c.get("bytes_p2p_relayed", 0) / r / num_clients / 1e6 for c, r in zip(comm, rounds)]
        wall = [s.get("wall_time_s", 0) for s in summaries]
        per_round_s = [seconds_per_round(s) for s in summaries]
        source = finals[0].get("global_accuracy_source", "") if finals else ""
        cells = [mean_std([f.get(k) for f in finals]) for k, _ in METRICS]
        lines.append(f"| {label} | " + " | ".join(cells) +
                     f" | {np.mean(per_round):.3f} | {np.mean(p2p):.3f} | {np.mean(per_round_s):.1f} | "
                     f"{np.mean(wall):.0f} | {len(summaries)} | {source} |")
    return "\n".join(lines)


VARIANT_PREFIXES = ("global_accuracy_", "coldstart_accuracy_")


def variants_table(rows: list[tuple[str, list[dict[str, Any]]]]) -> str:
    """Every variant a run reported besides its configured one, from the same run and model:
    the other global model (raw / balanced) and each cold-start adaptation on and off."""
    keys = sorted({k for _, summaries in rows for s in summaries for k, v in s.get("final", {}).items()
                   if k.startswith(VARIANT_PREFIXES) and isinstance(v, (int, float))})
    if not keys:
        return ""
    lines = ["| method | " + " | ".join(k.replace("_accuracy_", " ") for k in keys) + " |",
             "|" + "---|" * (len(keys) + 1)]
    for label, summaries in rows:
        finals = [s.get("final", {}) for s in summaries]
        if any(k in f for f in finals for k in keys):
            lines.append(f"| {label} | " + " | ".join(mean_std([f.get(k) for f in finals]) for k in keys) + " |")
    return "\n".join(lines)


def methods_from_file(path: str) -> list[str]:
    """A YAML file with ``methods:`` (a list of method specs, as for --methods)."""
    import yaml

    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    methods = data.get("methods") if isinstance(data, dict) else None
    if not isinstance(methods, list) or not methods or not all(isinstance(m, str) for m in methods):
        raise SystemExit(f"--methods-file '{path}' must hold 'methods:', a list of method specs")
    return methods


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
    parser.add_argument("--methods-file", default=None,
                        help="YAML with 'methods:', a list of specs (e.g. configs/methods/ablation_fedcoe.yaml); "
                             "replaces --methods")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    parser.add_argument("--results-dir", default="results")
    parser.add_argument("--out", default=None, help="where the table and plot go (default results/compare-<config>)")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: the table and plot from the runs already finished")
    args = parser.parse_args(argv)
    cfg = load_config(args.config, parse_overrides(args.set))  # fail fast on a bad config
    results_dir = Path(args.results_dir).resolve()
    stem = Path(args.config).stem
    out = Path(args.out or results_dir / f"compare-{stem}")
    out.mkdir(parents=True, exist_ok=True)
    if args.methods_file:
        args.methods = methods_from_file(args.methods_file)
    methods = [parse_method(m) for m in args.methods]
    common = parse_overrides(args.set)
    rows, curves = [], {}
    for label, overrides in methods:
        if args.report_only:
            summaries = [s for s in (finished(run_dir(results_dir, stem, label, seed)) for seed in args.seeds) if s]
            for summary in summaries:  # a missing seed drops out, so each summary names its own
                refuse_if_stale(summary, args.config, {**common, **overrides}, summary["seed"])
            if not summaries:
                continue
        else:
            summaries = [run_one(args.config, label, {**common, **overrides}, seed, results_dir, [])
                         for seed in args.seeds]
        rows.append((label, summaries))
        curves[label] = [history(Path(s["run_dir"])) for s in summaries]
    text = (f"Config `{args.config}`{' with ' + ' '.join(args.set) if args.set else ''}, seeds "
            f"{' '.join(map(str, args.seeds))}; final evaluation, mean ± std over seeds.\n"
            f"Command: `python -m fedcoe_flwr.compare --config {args.config} --seeds "
            f"{' '.join(map(str, args.seeds))} "
            f"{'--methods-file ' + args.methods_file if args.methods_file else '--methods ' + ' '.join(args.methods)}"
            f"{' --set ' + ' '.join(args.set) if args.set else ''}`\n\n" + table(rows, cfg.num_clients) + "\n")
    variants = variants_table(rows)
    if variants:
        text += ("\nVariants measured in the same runs (the other global model; each cold-start adaptation on "
                 "and off), % mean ± std over seeds:\n\n" + variants + "\n")
    (out / "comparison.md").write_text(text)
    plot(curves, out / "curves.png")
    print(text)
    print(f"[compare] wrote {out / 'comparison.md'} and {out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
