"""Simulation at scale: many simulated clients through the real Flower simulation,
rounds per minute and peak memory per round.

    python benchmarks/scale.py                      # 500 clients, 100 per round, 6 rounds, FedCoE
    python benchmarks/scale.py --algorithm fedavg
    python benchmarks/scale.py --local-part expert  # a full private expert per client

One fresh child process runs ``fedcoe_flwr.simulate.simulate`` (Flower's
``run_simulation``, Ray actors, our ServerApp logic and ClientApp) on CIFAR-10 with
``--num-clients`` clients of ``--samples`` images each (IID), ``--clients`` sampled per
round, 1 local epoch, batch 10, the small CNN at ``--width``; no evaluation rounds.
The parent samples the memory of the child's whole process tree every
``--interval`` seconds: the proportional set size (PSS: shared pages split between the
processes mapping them) summed over the server process, Ray's raylet/GCS/agents and
the ClientApp actors, plus the server process's and the actors' RSS. Round boundaries
come from the Strategy's ``rounds.jsonl`` (``started_at``/``aggregated_at``). Printed
per round: duration, distinct clients seen so far, peak memory; then rounds per minute
and the growth of the per-round peak from round 2 to the last round ("flat" when it
grows by less than ``--flat-tolerance`` MB while the distinct clients seen keep growing).

Where the private state lives: FedCoE's private parts are kept in ``context.state``,
which Flower's simulation holds for every node in the server process; ``--local-part
expert`` makes them a whole expert per client so that their cost becomes visible."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _common import (RESULT_PREFIX, ROOT, children_of, cmdline, emit, load_average, pss_bytes, rss_bytes,
                     sample_schedule, workload_run_config)

MB = 1024 * 1024


def _run_config(args: argparse.Namespace) -> dict[str, Any]:
    extra = {"width_multiplier": args.width, "local_part": args.local_part}
    cfg = workload_run_config("default", args.clients, args.algorithm, args.rounds, data_root=args.data_root,
                              num_clients=args.num_clients, experts=args.experts, top_m=args.top_m,
                              seed=args.seed, extra=extra)
    if args.samples != 50:  # workload (a) shape with another number of images per client
        if args.data_root == "synthetic":
            cfg["synthetic_train_size"] = args.samples * args.num_clients
        else:
            cfg["train_subset"] = args.samples * args.num_clients if args.samples * args.num_clients < 50_000 else 0
    return cfg


def child(args: argparse.Namespace) -> dict[str, Any]:
    from fedcoe_flwr.simulate import simulate

    load0 = load_average()
    run_config = {**_run_config(args), "results_dir": args.results_dir, "run_name": "scale"}
    t0 = time.time()
    simulate(run_config, args.num_cpus_per_client)
    return {"total_s": time.time() - t0, "load": [load0, load_average()]}


class Sampler(threading.Thread):
    """Samples the memory of a process tree until stopped."""

    def __init__(self, pid: int, interval: float):
        super().__init__(daemon=True)
        self.pid, self.interval = pid, interval
        self.samples: list[dict[str, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        while not self.stop.is_set():
            pids = [self.pid, *children_of(self.pid)]
            actors = [p for p in pids if cmdline(p).startswith("ray::ClientAppActor")]
            self.samples.append({
                "t": time.time(), "pss": sum(pss_bytes(p) for p in pids), "server_rss": rss_bytes(self.pid),
                "actors_rss": sum(rss_bytes(p) for p in actors), "actors": len(actors),
                "load": load_average()})
            self.stop.wait(self.interval)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--num-clients", type=int, default=500, help="simulated clients (SuperNodes)")
    parser.add_argument("--clients", type=int, default=100, help="clients per round")
    parser.add_argument("--rounds", type=int, default=6)
    parser.add_argument("--samples", type=int, default=50, help="images per client")
    parser.add_argument("--algorithm", default="fedcoe")
    parser.add_argument("--local-part", default="head", help="FedCoE private part: head (light) or expert")
    parser.add_argument("--width", type=float, default=0.5, help="width multiplier of the small CNN")
    parser.add_argument("--experts", type=int, default=4)
    parser.add_argument("--top-m", type=int, default=2)
    parser.add_argument("--data-root", default="", help="CIFAR-10 source (default: the shared copy); 'synthetic'")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-cpus-per-client", type=float, default=1.0)
    parser.add_argument("--interval", type=float, default=0.5, help="seconds between memory samples")
    parser.add_argument("--flat-tolerance", type=float, default=50.0,
                        help="MB of growth of the per-round peak (round 2 -> last) still called flat")
    parser.add_argument("--timeout", type=float, default=3600)
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--results-dir", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        emit(child(args))
        return 0

    print(f"[scale] {args.algorithm} (local part {args.local_part}), {args.num_clients} clients x {args.samples} "
          f"images, {args.clients} per round, {args.rounds} rounds, small CNN width {args.width:g}, 1 local epoch, "
          f"batch 10, seed {args.seed}, {os.cpu_count()} cores, {args.num_cpus_per_client:g} CPU per actor; "
          f"load now {load_average():.2f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="fedcoe-scale-") as tmp:
        cmd = [sys.executable, str(Path(__file__).resolve()), "--child", "--results-dir", tmp,
               *[str(a) for a in (argv if argv is not None else sys.argv[1:])]]
        env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0", "RAY_DEDUP_LOGS": "0"}
        log_path = Path(tmp) / "child.log"
        with open(log_path, "w") as log:
            proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
            sampler = Sampler(proc.pid, args.interval)
            sampler.start()
            try:
                proc.wait(timeout=args.timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
                print(f"[scale] timed out after {args.timeout:.0f}s", flush=True)
            finally:
                sampler.stop.set()
                sampler.join()
        out = log_path.read_text()
        result = next((json.loads(line[len(RESULT_PREFIX):]) for line in reversed(out.splitlines())
                       if line.startswith(RESULT_PREFIX)), None)
        rounds_file = Path(tmp) / "scale" / "rounds.jsonl"
        rounds = [json.loads(line) for line in rounds_file.read_text().splitlines()] if rounds_file.is_file() else []
        if result is None or len(rounds) != args.rounds:
            print("\n".join(out.splitlines()[-40:]))
            print(f"[scale] FAILED: the simulation completed {len(rounds)} of {args.rounds} rounds", flush=True)
            return 1

    from fedcoe_flwr.config import config_from_run_config

    schedule = sample_schedule(config_from_run_config(_run_config(args), str(ROOT)))
    samples = sampler.samples
    seen: set[int] = set()
    peaks = []
    before = [s for s in samples if s["t"] < rounds[0]["started_at"]]
    if before:
        print(f"set-up (Ray start, discovery of {args.num_clients} nodes): {rounds[0]['started_at'] - samples[0]['t']:.1f} s, "
              f"peak PSS {max(s['pss'] for s in before) / MB:.0f} MB")
    print(f"{'round':>5} {'time s':>7} {'clients seen':>12} {'peak PSS MB (all processes)':>28} "
          f"{'server RSS MB':>13} {'actors RSS MB':>13} {'actors':>6} {'load':>5}")
    for i, r in enumerate(rounds):
        seen.update(schedule[i] if i < len(schedule) else [])
        end = rounds[i + 1]["started_at"] if i + 1 < len(rounds) else r["aggregated_at"]
        window = [s for s in samples if r["started_at"] <= s["t"] <= end] or \
                 [min(samples, key=lambda s: abs(s["t"] - r["aggregated_at"]))]
        peak = {k: max(s[k] for s in window) for k in ("pss", "server_rss", "actors_rss", "actors")}
        peaks.append(peak)
        print(f"{r['round']:5d} {end - r['started_at']:7.2f} {len(seen):12d} {peak['pss'] / MB:28.0f} "
              f"{peak['server_rss'] / MB:13.0f} {peak['actors_rss'] / MB:13.0f} {peak['actors']:6.0f} "
              f"{max(s['load'] for s in window):5.1f}", flush=True)
    span = rounds[-1]["aggregated_at"] - rounds[0]["started_at"]
    loads = [s["load"] for s in samples]
    print(f"rounds per minute: {len(rounds) / span * 60:.2f} ({len(rounds)} rounds of {args.clients} clients in "
          f"{span:.1f} s; {len(rounds) * args.clients / span:.1f} client updates/s; load {min(loads):.1f}-{max(loads):.1f})")
    if len(peaks) >= 2:
        growth = (peaks[-1]["pss"] - peaks[1]["pss"]) / MB
        server_growth = (peaks[-1]["server_rss"] - peaks[1]["server_rss"]) / MB
        flat = growth < args.flat_tolerance
        print(f"memory after round 1: peak PSS round 2 -> round {len(peaks)}: {growth:+.0f} MB (server process RSS "
              f"{server_growth:+.0f} MB) while clients seen grew {len(set(c for s in schedule[:2] for c in s))} -> "
              f"{len(seen)}: {'flat' if flat else 'GROWING'} (tolerance {args.flat_tolerance:g} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
