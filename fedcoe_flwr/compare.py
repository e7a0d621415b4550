"""Run every method on identical partitions and seeds and report the comparison:

    python -m fedcoe_flwr.compare --config configs/compare_cifar10_dir0.1.yaml --seeds 0 1 2 \\
        --methods-file configs/methods/compare.yaml

Each (method, seed) runs in its own process (``python -m fedcoe_flwr.simulate``)
under ``results/<config>-<method>-s<seed>`` (``<config>-<key>=<value>-<method>-s<seed>`` with ``--set``
overrides: another split is another comparison); runs whose summary says ``finished``
are skipped, interrupted ones resume from their last checkpoint. Runs go seed by seed (every
method at the first seed, then the next), so a comparison stopped early has whole seeds.
``--jobs N`` runs N at once (on a GPU machine: the runs are small beside the card), each
printing to ``<results-dir>/<run>.log``. After each run one line says how many are done and
the time left, estimated from the mean time of the runs this invocation ran (skipped runs
count as done, not in the estimate). The report:

- ``<out>/comparison.md`` (mean and std over seeds of global, personalised and
  cold-start accuracy at the final round and at each seed's best evaluated round with its
  number, bytes per client per round, wall time), ``<out>/curves.png`` and
  ``<out>/per_client.png`` (each method's personalised accuracy per client at the last
  evaluation, every seed's clients in one box);
- ``<out>/tb/<method>/s<seed>``: a relative link to each run's TensorBoard folder
  (``<run>/tb``), so ``tensorboard --logdir <out>`` shows every method and seed side by side
  while the runs stay where they are (TensorBoard follows the links; a resumed run's files
  appear through them as they grow);
- ``docs/results/<name>.json``, the same figures for machines: each method's global,
  personalised and cold-start accuracy at the label-free variant the run reported and
  unadapted (``raw``), with the config, its hash, rounds and seeds;
- with ``--kind calibration`` each method at its unadapted figures (published results used no
  label-free adaptation; the variants stay listed), its entry also at the file's top level
  (``{"fedavg": {"global": {"mean": ...}}, ...}``, as the calibration check reads it);
- with ``--archive DIR``, each reported run's records (``RECORD_FILES``: no checkpoints, a few
  tens of kB) copied to ``DIR/<run>/``: ``--report-only --results-dir DIR`` rebuilds the same
  report from them alone, and copied into a results folder they count as finished runs, so a
  comparison too long for one machine's life can be finished on another;
- ``docs/RESULTS.md``, regenerated from every ``docs/results/*.json`` (plus the
  hand-written ``docs/results/<name>.md`` fragments): never edit it by hand.
  ``--regenerate-docs`` rebuilds it alone (after editing a fragment); ``--no-docs`` writes
  neither file.

A method is an algorithm name, or ``label:key=value,key=value`` for a variant, e.g.
``fedavg_x4:algorithm=fedavg,width_multiplier=1.0`` (capacity-matched FedAvg)."""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import subprocess
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from time import monotonic
from typing import Any

import matplotlib
import numpy as np
import yaml

from .algorithms import REGISTRY as ALGORITHMS
from .cli import user_errors
from .config import load_config, load_yaml, method_only_keys, saved_config
from .fileio import atomic_write, read_jsonl
from .report import KINDS, METRICS, comparison_markdown, method_record, write_results_doc
from .server.callbacks.tensorboard import TB_DIR
from .simulate import parse_overrides

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  (after the headless backend is chosen)


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


def comparison_stem(config: str, common: dict[str, Any]) -> str:
    """The config's stem, and each ``--set`` override that changes what the runs compute: a
    comparison on another split (``--set dirichlet_alpha=0.3``) gets its own run folders and its
    own report (``<stem>-dirichlet_alpha_0.3``), and never replaces the config's own. Characters a
    run name may not hold become '_'."""
    changes = [re.sub(r"[^A-Za-z0-9_.-]", "_", f"{k}_{v}") for k, v in sorted(common.items())
               if k not in BOOKKEEPING_KEYS]
    return "-".join([Path(config).stem, *changes])


def run_one(config: str, label: str, overrides: dict[str, Any], seed: int, results_dir: Path,
            extra: list[str], log: Path | None = None, stem: str | None = None) -> dict[str, Any]:
    """One run in its own process; ``log``: where its output goes (None: this terminal);
    ``stem``: the run folders' prefix (default: the config's stem)."""
    out = run_dir(results_dir, stem or Path(config).stem, label, seed)
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
    print(f"[compare] {out.name}: {'resuming' if resume else 'running'}"
          + (f", output in {log}" if log else ""), flush=True)
    if log is None:
        proc = subprocess.run(cmd)
    else:
        with open(log, "a") as sink:
            proc = subprocess.run(cmd, stdout=sink, stderr=subprocess.STDOUT)
    if proc.returncode != 0 or not summary_path.is_file():
        where = f"; its output: {log}" if log else ""
        raise SystemExit(f"[compare] {out.name} failed (exit {proc.returncode}){where}; "
                         "rerun the same command to resume")
    return {**json.loads(summary_path.read_text()), "run_dir": str(out)}


# Keys that say where and how a run ran, not what it computed.
BOOKKEEPING_KEYS = frozenset({"run_name", "results_dir", "resume", "resume_from", "config_path", "data_root",
                              "cache_dir", "device", "keep_checkpoints", "round_timeout", "wait_for_nodes",
                              "node_restart_grace"})


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


def config_hash(config: str, overrides: dict[str, Any]) -> str:
    """sha256 of the resolved config (YAML with its bases, then ``overrides``), bookkeeping keys
    left out: two comparisons with the same hash computed on the same settings."""
    values = {k: v for k, v in load_config(config, overrides).to_dict().items() if k not in BOOKKEEPING_KEYS}
    return "sha256:" + hashlib.sha256(json.dumps(values, sort_keys=True).encode()).hexdigest()


RECORD_FILES = ("summary.json", "metrics.jsonl", "rounds.jsonl")  # all a report reads of a run


def archive_records(run: Path, archive: Path) -> Path:
    """Copy a finished run's records to ``archive/<run name>/``; returns that folder."""
    dst = archive / run.name
    dst.mkdir(parents=True, exist_ok=True)
    for name in RECORD_FILES:
        if (run / name).is_file():
            atomic_write(dst / name, (run / name).read_bytes())
    return dst


def finished(out: Path) -> dict[str, Any] | None:
    """The summary of a finished run, or None."""
    path = out / "summary.json"
    if path.is_file():
        summary = json.loads(path.read_text())
        if summary.get("status") == "finished":
            return {**summary, "run_dir": str(out)}
    return None


def default_name(stem: str, methods_file: str | None) -> str:
    """The JSON's name: the comparison's stem (``comparison_stem``), and the methods file's when
    one is given, so that rerunning a comparison replaces its own file."""
    return stem + (f"-{Path(methods_file).stem}" if methods_file else "")


# ------------------------------------------------------------ the command
def methods_from_file(path: str) -> list[str]:
    """A YAML file with ``methods:`` (a list of method specs, as for --methods) and, optionally,
    ``set:`` (key: value, or a YAML file of them beside this one), which every method of the file
    takes unless its spec sets the key: a file of runs measured under earlier defaults pins those
    defaults there, so its runs reproduce."""
    if not Path(path).is_file():
        raise SystemExit(f"--methods-file '{path}' not found")
    with open(path) as fh:
        data = yaml.safe_load(fh) or {}
    methods = data.get("methods") if isinstance(data, dict) else None
    if not isinstance(methods, list) or not methods or not all(isinstance(m, str) for m in methods):
        raise SystemExit(f"--methods-file '{path}' must hold 'methods:', a list of method specs")
    pinned = data.get("set") or {}
    if isinstance(pinned, str):  # a config YAML beside this file: its keys checked as a config's
        pinned = load_yaml(Path(path).parent / pinned)
    if not isinstance(pinned, dict):
        raise SystemExit(f"--methods-file '{path}': 'set:' must map keys to values, not {pinned!r}")
    return [with_pinned(spec, pinned) for spec in methods]


def with_pinned(spec: str, pinned: dict[str, Any]) -> str:
    """``spec`` with each ``pinned`` key its own overrides do not set appended."""
    own = parse_method(spec)[1]
    extra = [f"{k}={str(v).lower() if isinstance(v, bool) else v}" for k, v in pinned.items() if k not in own]
    return f"{spec}{',' if ':' in spec else ':'}{','.join(extra)}" if extra else spec


def duration(seconds: float) -> str:
    seconds = int(round(seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h {seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m {seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    """One line per finished run: done/total and the time left, estimated from the mean time
    of the runs this invocation ran (a run finished earlier counts as done, not in the mean)
    and the number of runs going at once."""

    def __init__(self, total: int, jobs: int = 1):
        self.total, self.done, self.times, self.jobs = total, 0, [], jobs
        self._lock = threading.Lock()  # runs finish on several threads with --jobs

    def finished(self, name: str, seconds: float | None) -> str:
        """``seconds``: how long the run took here, None when it had finished earlier."""
        with self._lock:
            return self._line(name, seconds)

    def _line(self, name: str, seconds: float | None) -> str:
        self.done += 1
        if seconds is not None:
            self.times.append(seconds)
        left = self.total - self.done
        took = "finished earlier" if seconds is None else f"took {duration(seconds)}"
        if not left:
            eta = "all runs done"
        elif self.times:
            mean = float(np.mean(self.times))
            at_once = f", {self.jobs} at once" if self.jobs > 1 else ""
            eta = f"about {duration(mean * -(-left // self.jobs))} left ({left} more at {duration(mean)} each{at_once})"
        else:
            eta = f"{left} more; time left unknown until one runs here"
        return f"[compare] {self.done}/{self.total} done: {name} {took}; {eta}"


def link_tensorboard(out: Path, label: str, summaries: list[dict[str, Any]]) -> None:
    """``<out>/tb/<label>/s<seed>`` -> the run's ``tb/`` (relative, so a copied results folder
    keeps working); a run without event files (written before they existed) gets no link."""
    for summary in summaries:
        target = Path(summary["run_dir"]) / TB_DIR
        link = out / TB_DIR / label / f"s{summary['seed']}"
        if not target.is_dir() or (link.exists() and not link.is_symlink()):
            continue
        link.parent.mkdir(parents=True, exist_ok=True)
        link.unlink(missing_ok=True)
        link.symlink_to(os.path.relpath(target.resolve(), link.parent.resolve()), target_is_directory=True)


def plot(curves: dict[str, list[list[dict[str, Any]]]], path: Path) -> None:
    fig, axes = plt.subplots(1, 3, figsize=(15, 4))
    for ax, metric in zip(axes, METRICS):
        key = metric.key
        for label, runs in curves.items():
            rounds = sorted({h["round"] for run in runs for h in run if h.get(key) is not None})
            if not rounds:
                continue
            means = [np.mean([h[key] for run in runs for h in run if h["round"] == r and h.get(key) is not None])
                     for r in rounds]
            ax.plot(rounds, means, marker="o", label=label)
        ax.set_title(f"{metric.title} accuracy (mean over seeds)")
        ax.set_xlabel("round")
        ax.grid(alpha=0.3)
    axes[0].legend()
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)


def plot_per_client(curves: dict[str, list[list[dict[str, Any]]]], path: Path) -> Path | None:
    """One box per method: the personalised accuracy of each client at each seed's last
    evaluation (``personalized_accuracy_per_client``), the points on top; None when no run has them."""
    data = {label: [100 * v for run in runs if run for v in run[-1].get("personalized_accuracy_per_client", [])]
            for label, runs in curves.items()}
    data = {label: values for label, values in data.items() if values}
    if not data:
        return None
    fig, ax = plt.subplots(figsize=(max(5.0, 1.2 * len(data) + 2), 4))
    ax.boxplot(list(data.values()), showfliers=False)
    jitter = np.random.default_rng(0)
    for i, values in enumerate(data.values(), start=1):
        ax.scatter(i + jitter.uniform(-0.15, 0.15, len(values)), values, s=10, alpha=0.6, color="tab:blue")
    ax.set_xticks(range(1, len(data) + 1), [f"{label}\n(n={len(v)})" for label, v in data.items()], rotation=20)
    ax.set_ylabel("personalised accuracy %")
    ax.set_title("Personalised accuracy per client at the last evaluation (n: clients × seeds)")
    ax.grid(alpha=0.3, axis="y")
    fig.savefig(path, dpi=100, bbox_inches="tight")
    plt.close(fig)
    return path


def command_line(args: argparse.Namespace) -> str:
    """The command that reproduces this report."""
    parts = ["python -m fedcoe_flwr.compare", f"--config {args.config}", "--seeds " + " ".join(map(str, args.seeds))]
    parts.append(f"--methods-file {args.methods_file}" if args.methods_file else "--methods " + " ".join(args.methods))
    if args.set:
        parts.append("--set " + " ".join(args.set))
    if args.name:
        parts.append(f"--name {args.name}")
    if args.kind != "comparison":
        parts.append(f"--kind {args.kind}")
    return " ".join(parts)


def run_all(args: argparse.Namespace, methods: list[tuple[str, str, dict[str, Any]]], common: dict[str, Any],
            results_dir: Path, stem: str) -> None:
    """Every (method, seed) run, seed by seed, ``args.jobs`` at once; raises (SystemExit) once
    the runs going have ended if any failed."""
    runs = [(label, {**common, **overrides}, seed) for seed in args.seeds for _, label, overrides in methods]
    progress = Progress(len(runs), args.jobs)
    extra = ["--num-cpus", str(args.num_cpus)] if args.num_cpus else []

    def one(label: str, overrides: dict[str, Any], seed: int) -> None:
        out_run, started = run_dir(results_dir, stem, label, seed), monotonic()
        earlier = finished(out_run) is not None
        log = results_dir / f"{out_run.name}.log" if args.jobs > 1 else None
        run_one(args.config, label, overrides, seed, results_dir, extra, log, stem)
        print(progress.finished(out_run.name, None if earlier else monotonic() - started), flush=True)

    if args.jobs == 1:
        for run in runs:
            one(*run)
        return
    results_dir.mkdir(parents=True, exist_ok=True)
    with ThreadPoolExecutor(max_workers=args.jobs) as pool:
        futures = [pool.submit(one, *run) for run in runs]
    failures = [str(f.exception()) for f in futures if f.exception() is not None]
    if failures:
        raise SystemExit("\n".join(failures))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", help="the experiment YAML every method runs (required unless --regenerate-docs)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--methods", nargs="+", default=list(ALGORITHMS))
    parser.add_argument("--methods-file", default=None,
                        help="YAML with 'methods:', a list of specs (e.g. configs/methods/ablation_fedcoe.yaml), "
                             "and optionally 'set:', keys every spec takes unless it sets them; replaces --methods")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="overrides for every run")
    parser.add_argument("--results-dir", default="results")
    parser.add_argument("--out", default=None, help="where the table and plot go (default <results-dir>/compare-<name>)")
    parser.add_argument("--num-cpus", type=int, default=None,
                        help="cores each run's simulation may use (default: every core); e.g. 1 on a shared machine")
    parser.add_argument("--jobs", type=int, default=1,
                        help="runs at once, each in its own process and log (default 1: one after another)")
    parser.add_argument("--archive", default=None, metavar="DIR",
                        help="also copy each reported run's records (no checkpoints) to DIR/<run>/")
    parser.add_argument("--report-only", action="store_true",
                        help="run nothing: the table and plot from the runs already finished")
    parser.add_argument("--name", default=None,
                        help="the report's name: docs/results/<name>.json (default <config stem>[-<key>=<value> "
                             "per --set override][-<methods file stem>])")
    parser.add_argument("--kind", default="comparison", choices=list(KINDS),
                        help="the group of docs/RESULTS.md the report goes in")
    parser.add_argument("--title", default=None, help="its heading in docs/RESULTS.md (default: the name)")
    parser.add_argument("--docs-dir", default="docs/results", help="where <name>.json and the fragments live")
    parser.add_argument("--results-doc", default="docs/RESULTS.md", help="the file regenerated from --docs-dir")
    parser.add_argument("--no-docs", action="store_true", help="write neither <name>.json nor the results doc")
    parser.add_argument("--regenerate-docs", action="store_true",
                        help="run and report nothing: only rebuild --results-doc from --docs-dir")
    args = parser.parse_args(argv)
    docs_dir, results_doc = Path(args.docs_dir), Path(args.results_doc)
    if args.regenerate_docs:
        print(f"[compare] wrote {write_results_doc(docs_dir, results_doc)}")
        return 0
    if not args.config:
        parser.error("--config is required (or --regenerate-docs)")
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: must be at least 1")
    common = parse_overrides(args.set)
    cfg = load_config(args.config, common)  # fail fast on a bad config
    results_dir = Path(args.results_dir).resolve()
    stem = comparison_stem(args.config, common)
    name = args.name or default_name(stem, args.methods_file)
    out = Path(args.out or results_dir / f"compare-{name}")
    out.mkdir(parents=True, exist_ok=True)
    if args.methods_file:
        args.methods = methods_from_file(args.methods_file)
    methods = [(spec, *parse_method(spec)) for spec in args.methods]
    if not args.report_only:
        run_all(args, methods, common, results_dir, stem)
    records, curves = {}, {}
    for spec, label, overrides in methods:
        summaries = [s for s in (finished(run_dir(results_dir, stem, label, seed)) for seed in args.seeds) if s]
        for summary in summaries:  # a missing seed drops out, so each summary names its own
            refuse_if_stale(summary, args.config, {**common, **overrides}, summary["seed"])
        if not summaries:
            continue
        # a calibration compares with published figures, which no label-free adaptation produced
        records[label] = {"spec": spec, **method_record(summaries, cfg.num_clients,
                                                        adapted=args.kind != "calibration")}
        curves[label] = [read_jsonl(Path(s["run_dir"]) / "metrics.jsonl") for s in summaries]
        link_tensorboard(out, label, summaries)
        if args.archive:
            for summary in summaries:
                archive_records(Path(summary["run_dir"]), Path(args.archive))
    doc = {"name": name, "kind": args.kind,
           "title": args.title or "", "config": args.config, "config_hash": config_hash(args.config, common),
           "overrides": args.set, "methods_file": args.methods_file, "rounds": cfg.num_rounds,
           "seeds": args.seeds, "command": command_line(args),
           "source": f"measured: the finished runs under {args.results_dir}/{stem}-<method>-s<seed>",
           "methods": records}
    if args.kind == "calibration":  # also at the top level: {"fedavg": {"global": {"mean": ...}}, ...}
        doc.update({label: record for label, record in records.items() if label not in doc})
    text = (f"Config `{args.config}`{' with ' + ' '.join(args.set) if args.set else ''}, seeds "
            f"{' '.join(map(str, args.seeds))}; final evaluation, mean ± std over seeds.\n"
            f"Command: `{doc['command']}`\n\n" + comparison_markdown(doc))
    atomic_write(out / "comparison.md", text)
    plot(curves, out / "curves.png")
    per_client = plot_per_client(curves, out / "per_client.png")
    print(text)
    print(f"[compare] wrote {out / 'comparison.md'}, {out / 'curves.png'}"
          + (f", {per_client}" if per_client else " (no per-client accuracies: per_client.png not written)"))
    if (out / TB_DIR).is_dir():
        print(f"[compare] TensorBoard, every method and seed: tensorboard --logdir {out}")
    if not args.no_docs and records:
        path = atomic_write(docs_dir / f"{doc['name']}.json", json.dumps(doc, indent=2, ensure_ascii=False) + "\n")
        print(f"[compare] wrote {path} and {write_results_doc(docs_dir, results_doc)}")
    return 0


if __name__ == "__main__":
    with user_errors():
        sys.exit(main())
