"""Cohort training against the plain sequential loop: client updates per second, rounds per
minute and peak memory, side by side in one run.

    python benchmarks/cohort.py --clients 50 --rounds 3                       # cross-device, FedAvg + FedCoE
    python benchmarks/cohort.py --workload comparison --rounds 2              # 20 clients of ~400 images
    python benchmarks/cohort.py --workload scaling --scale 100 1000 10000 --rounds 3

For each algorithm, fresh child processes run the same R rounds (same sampled clients,
payloads, seeds, data and aggregation):

* ``loop``: the plain sequential PyTorch loop: one process, the clients one after another
  through ``Algorithm.client_train`` (the per-client path every simulated or deployed
  ClientApp runs: model, ``torch.optim.SGD``, forward/backward/step per batch), with 1 and
  with 2 torch threads (``--threads``); the better is the baseline, so that a gain is not
  just the second core;
* ``cohort``: the same rounds with ``fedcoe_flwr.cohort.train_clients``, also with 1 and 2
  threads; the speed-up line compares the better of each;
* with ``--simulation``: the Flower simulation of the same shape (``fedcoe_flwr.simulate``,
  the generated data set partitioned IID, so other images), per client in Ray actors (1 CPU
  each) and on the cohort backend; the peak memory printed is the driver process's only.

Workloads (synthetic CIFAR-10-shaped images, generated per client on first use, so that
clients that are never sampled cost nothing; speed does not depend on pixel values):
``cross-device``: ``--num-clients`` (1000) clients x 50 images, ``--clients`` (50) per round,
batch 10, 1 epoch, the small CNN; ``comparison``: configs/compare_cifar10_dir0.1.yaml's
shapes: 20 clients, all per round, 200-600 images each (mean 400; the Dirichlet split's
sizes vary), batch 32, 2 epochs, the half-width CNN; ``scaling``: the cross-device shape at
each ``--scale`` federation size, cohort path only (the first ``--threads``): set-up time (server state and client
sampling for N clients), seconds per round, peak memory.

Printed: per path, seconds over the R rounds (set-up excluded), client updates/s, rounds/min,
peak resident memory of the child process, the 1-minute load average, and the speed-up on a
line ``cohort vs plain loop: 4.3x client updates/s``; ``max|dw|``: the largest difference
between the final global (or shared) weights of the loop and the cohort run (float noise:
the same work)."""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from _common import Stopwatch, emit, fmt_load, hwm_bytes, load_average, run_child

NUM_CLASSES = 10
WORKLOADS: dict[str, dict[str, Any]] = {
    "cross-device": dict(batch_size=10, local_epochs=1, width_multiplier=1.0, num_clients=1000),
    "comparison": dict(batch_size=32, local_epochs=2, width_multiplier=0.5, num_clients=20),
}
CROSS_DEVICE_IMAGES = 50


def experiment(args: argparse.Namespace, algorithm: str, num_clients: int):  # noqa: ANN201
    from fedcoe_flwr.config import from_dict

    shape = dict(WORKLOADS["comparison" if args.workload == "comparison" else "cross-device"])
    shape["num_clients"] = num_clients
    per_round = num_clients if args.workload == "comparison" else args.clients
    if not 1 <= per_round <= num_clients:
        raise SystemExit(f"--clients must be in 1..{num_clients}, got {per_round}")
    return from_dict(dict(dataset="synthetic", image_size=32, synthetic_num_classes=NUM_CLASSES,
                          num_coldstart_clients=0, model="cnn", algorithm=algorithm, num_experts=args.experts,
                          top_m=args.top_m, num_rounds=args.rounds, fraction_train=per_round / num_clients,
                          lr=0.01, momentum=0.9, seed=args.seed, device="cpu", **shape))


def client_sizes(args: argparse.Namespace, num_clients: int) -> list[int]:
    import numpy as np

    if args.workload == "comparison":
        return [int(n) for n in np.random.default_rng(args.seed).integers(200, 601, num_clients)]
    return [CROSS_DEVICE_IMAGES] * num_clients


def client_data(seed: int, client: int, n: int):  # noqa: ANN201
    import torch

    from fedcoe_flwr.data import ClientData

    g = torch.Generator().manual_seed(seed * 1_000_003 + client)
    x = torch.randint(0, 256, (n, 3, 32, 32), dtype=torch.uint8, generator=g)
    y = torch.randint(0, NUM_CLASSES, (n,), generator=g)
    return ClientData(x, y, x[:0], y[:0])


def child(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from _plain_loop import plain_round
    from fedcoe_flwr.algorithms import get_algorithm
    from fedcoe_flwr.cohort import train_clients
    from _common import sample_schedule

    torch.set_num_threads(args.threads[0])
    load0 = load_average()
    clock = Stopwatch()
    num_clients = args.num_clients or WORKLOADS["comparison" if args.workload == "comparison" else "cross-device"][
        "num_clients"]
    cfg = experiment(args, args.algorithm, num_clients)
    sizes = client_sizes(args, num_clients)
    algo = get_algorithm(cfg.algorithm)
    state = algo.init_state(cfg, NUM_CLASSES)
    schedule = sample_schedule(cfg)
    setup_s = clock()
    privates: dict[int, Any] = {}
    round_s = []
    clock = Stopwatch()
    train = (lambda steps: train_clients(algo, steps, args.chunk_size)) if args.path == "cohort" \
        else (lambda steps: [algo.client_train(step) for step in steps])
    for server_round, clients in enumerate(schedule, start=1):
        t0 = clock()
        state = plain_round(algo, state, cfg, clients, server_round, privates,
                            lambda c: client_data(args.seed, c, sizes[c]), NUM_CLASSES, train)
        round_s.append(clock() - t0)
    torch.save(state.arrays, args.out)
    return {"setup_s": setup_s, "rounds_s": sum(round_s), "round_s": round_s, "updates": sum(map(len, schedule)),
            "peak_bytes": hwm_bytes(os.getpid()), "threads": torch.get_num_threads(), "load": [load0, load_average()]}


def child_simulation(args: argparse.Namespace) -> dict[str, Any]:
    """The same workload through the Flower simulation (``fedcoe_flwr.simulate``), with the
    given ``simulation_training``; data: the synthetic data set of the same shape."""
    import json
    import tempfile

    import torch

    from fedcoe_flwr.simulate import simulate

    load0 = load_average()
    num_clients = args.num_clients or WORKLOADS["cross-device"]["num_clients"]
    cfg = experiment(args, args.algorithm, num_clients)
    with tempfile.TemporaryDirectory(prefix="fedcoe-cohort-sim-") as tmp:
        run_config = {**{k: v for k, v in cfg.to_dict().items() if k in ("batch_size", "local_epochs", "lr",
                                                                          "momentum", "width_multiplier", "num_rounds",
                                                                          "fraction_train", "seed", "algorithm",
                                                                          "num_experts", "top_m", "num_clients")},
                      "dataset": "synthetic", "image_size": 32, "synthetic_num_classes": NUM_CLASSES,
                      "synthetic_train_size": CROSS_DEVICE_IMAGES * num_clients, "synthetic_test_size": 100,
                      "partition": "iid", "test_fraction": 0.001, "min_partition_size": 1, "num_coldstart_clients": 0,
                      "model": "cnn", "eval_every": 0, "device": "cpu", "keep_checkpoints": 1,
                      "simulation_training": args.path.split("-", 1)[1], "results_dir": tmp, "run_name": "sim",
                      "cache_dir": str(Path(tmp) / "cache")}
        clock = Stopwatch()
        simulate(run_config, 1.0)
        total = clock()
        rounds = [json.loads(line) for line in (Path(tmp) / "sim" / "rounds.jsonl").read_text().splitlines()]
        torch.save(torch.load(Path(tmp) / "sim" / "final_state.pt", weights_only=False)["arrays"], args.out)
    rounds_s = rounds[-1]["aggregated_at"] - rounds[0]["started_at"]
    return {"setup_s": total - rounds_s, "rounds_s": rounds_s, "round_s": [r["time_s"] for r in rounds],
            "updates": sum(r["replies"] for r in rounds), "peak_bytes": hwm_bytes(os.getpid()),
            "threads": torch.get_num_threads(),
            "load": [load0, load_average()]}


def max_abs_diff(a_path: str, b_path: str) -> float:
    import torch

    a, b = torch.load(a_path, weights_only=False), torch.load(b_path, weights_only=False)
    return max((float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].numel()), default=0.0)


def line(name: str, res: dict[str, Any]) -> str:
    rate = res["updates"] / res["rounds_s"]
    return (f"  {name:22s} {res['rounds_s']:8.2f} s  {rate:7.2f} client updates/s  "
            f"{60 * len(res['round_s']) / res['rounds_s']:7.2f} rounds/min  peak {res['peak_bytes'] / 2**20:7.0f} MiB  "
            f"set-up {res['setup_s']:.2f} s  ({fmt_load(res['load'])})")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workload", choices=["cross-device", "comparison", "scaling"], default="cross-device")
    parser.add_argument("--clients", type=int, default=50, help="clients per round (C; comparison: all 20)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (R)")
    parser.add_argument("--num-clients", type=int, default=0, help="clients in the federation (default: the workload's)")
    parser.add_argument("--scale", type=int, nargs="+", default=[100, 1000, 10000],
                        help="scaling: federation sizes")
    parser.add_argument("--algorithms", nargs="+", default=["fedavg", "fedcoe"])
    parser.add_argument("--chunk-size", type=int, default=0, help="cohort chunk size (default: the executor's)")
    parser.add_argument("--experts", type=int, default=4, help="FedCoE: K experts")
    parser.add_argument("--top-m", type=int, default=2, help="FedCoE: m experts per client")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed to each child")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--simulation", action="store_true",
                        help="cross-device: also the Flower simulation (fedcoe_flwr.simulate, synthetic data set of "
                             "the same shape) with simulation_training per_client (Ray actors) and cohort")
    parser.add_argument("--path", choices=["loop", "cohort", "sim-per_client", "sim-cohort"], help=argparse.SUPPRESS)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2],
                        help="torch thread counts each path is run with; the better of them counts (default 1 2)")
    parser.add_argument("--algorithm", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if not args.chunk_size:
        from fedcoe_flwr.cohort import DEFAULT_CHUNK_SIZE

        args.chunk_size = DEFAULT_CHUNK_SIZE
    if args.child:
        emit(child_simulation(args) if args.path.startswith("sim-") else child(args))
        return 0

    common = ["--workload", args.workload, "--clients", args.clients, "--rounds", args.rounds, "--experts",
              args.experts, "--top-m", args.top_m, "--seed", args.seed, "--chunk-size", args.chunk_size]
    print(f"[cohort] workload {args.workload}, {args.rounds} rounds, seed {args.seed}, cohort chunk {args.chunk_size}, "
          f"{os.cpu_count()} cores, no GPU; load now {load_average():.2f}", flush=True)
    with tempfile.TemporaryDirectory(prefix="fedcoe-cohort-") as tmp:
        if args.workload == "scaling":
            for algorithm in args.algorithms:
                print(f"{algorithm}: cross-device shape, {args.clients} clients per round, cohort path")
                for n in args.scale:
                    res = run_child("cohort.py", [*common, "--child", "--path", "cohort", "--threads", args.threads[0],
                                              "--algorithm", algorithm,
                                                  "--num-clients", n, "--out", str(Path(tmp) / f"s{n}.pt")],
                                    args.timeout)
                    per_round = res["rounds_s"] / len(res["round_s"])
                    print(f"  {n:6d} clients: set-up {res['setup_s']:6.2f} s  {per_round:6.2f} s/round  "
                          f"peak {res['peak_bytes'] / 2**20:6.0f} MiB  ({fmt_load(res['load'])})", flush=True)
            return 0
        if args.num_clients:
            common += ["--num-clients", args.num_clients]
        for algorithm in args.algorithms:
            runs = {}
            variants = [(f"{label}, {t} thread{'s' if t > 1 else ''}", path, t)
                        for label, path in (("plain loop", "loop"), ("cohort", "cohort")) for t in args.threads]
            if args.simulation:
                variants += [("simulation, per-client", "sim-per_client", 1), ("simulation, cohort", "sim-cohort", 1)]
            for name, path, threads in variants:
                out = str(Path(tmp) / f"{algorithm}-{path}-{threads}.pt")
                runs[name] = run_child("cohort.py", [*common, "--child", "--path", path, "--threads", threads,
                                                     "--algorithm", algorithm, "--out", out], args.timeout)
                runs[name]["out"] = out
            best = min((r for name, r in runs.items() if name.startswith("plain")), key=lambda r: r["rounds_s"])
            cohort = min((r for name, r in runs.items() if name.startswith("cohort")), key=lambda r: r["rounds_s"])
            print(f"{algorithm}: {cohort['updates']} client updates over {args.rounds} rounds")
            for name, res in runs.items():
                print(line(name, res))
            print(f"  {algorithm} cohort vs plain loop: {best['rounds_s'] / cohort['rounds_s']:.1f}x client updates/s "
                  f"(best over threads {args.threads} each: loop {best['threads']}, cohort {cohort['threads']}); max|dw| loop vs cohort "
                  f"{max_abs_diff(best['out'], cohort['out']):.2g}", flush=True)
            if args.simulation:
                sim, sim_cohort = runs["simulation, per-client"], runs["simulation, cohort"]
                print(f"  {algorithm} simulation, cohort vs per-client: {sim['rounds_s'] / sim_cohort['rounds_s']:.1f}x "
                      f"client updates/s; max|dw| {max_abs_diff(sim['out'], sim_cohort['out']):.2g}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
