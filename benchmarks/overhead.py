"""Framework overhead: R rounds through the real Flower simulation against exactly the
same client training in a plain single-process loop, plus a quickstart-style reference.

    python benchmarks/overhead.py --clients 50 --rounds 5 --repeats 3
    python benchmarks/overhead.py --workload paper --clients 100 --rounds 1 --repeats 3

For each algorithm (default: fedavg fedcoe) and repeat, three fresh processes:

* ``simulation``: ``fedcoe_flwr.simulate.simulate`` = Flower's ``run_simulation`` (Ray
  actors, one per ``--num-cpus-per-client`` CPUs) with our real ServerApp logic
  (``run_server``: MoEStrategy, validation, aggregation, checkpoints) and ClientApp;
* ``plain``: the same rounds in one process: the same clients sampled by the same
  seeded sampler, the same payloads, the same ``client_train`` calls with the same
  seeds on the same data, the same aggregation -- no Flower, no Ray, no messages; torch
  with ``--plain-threads`` threads (default 1, as each actor), its data loaded inside
  round 1 as in the actors (``--warm-plain`` loads it before the clock);
* ``reference`` (per repeat, FedAvg): ``quickstart_ref.py``, a ClientApp written as
  Flower's quickstart-pytorch is (model built, partition loaded and transformed, weights
  converted on every call) with Flower's FedAvg strategy, on the same workload; run on
  Flower's own simulation runtime (``stock``: what a user of the quickstart gets) and on
  ours (``ours``: with ``simulate.install_fast_dispatch``, so that only the ClientApp's
  style differs); ``--reference-runtime`` picks one or both.

Timed: the R training rounds, from the start of round 1 to the aggregation of round R,
after the set-up (Ray start, discovery of every node) in both processes; start-up is
printed apart. ``ratio`` = simulation / plain (and reference / plain); ``steady ratio``
the same over rounds 2..R (actors warm). The final global
weights of simulation and plain are compared (``max|dw|``) to show it is the same work.
Every figure is the median over ``--repeats``, with the 1-minute load average beside it."""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from _common import (ROOT, Stopwatch, add_workload_args, emit, fmt_load, load_average, median, run_child,
                     sample_schedule, workload_run_config)


# ------------------------------------------------------------------ children
def _run_config(args: argparse.Namespace, algorithm: str) -> dict[str, Any]:
    return workload_run_config(args.workload, args.clients, algorithm, args.rounds, data_root=args.data_root,
                               num_clients=args.num_clients or None, experts=args.experts, top_m=args.top_m,
                               seed=args.seed)


def child_sim(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from fedcoe_flwr.simulate import simulate

    load0 = load_average()
    with tempfile.TemporaryDirectory(prefix="fedcoe-bench-") as tmp:
        run_config = {**_run_config(args, args.algorithm), "results_dir": tmp, "run_name": "sim"}
        clock = Stopwatch()
        t_start = time.time()
        simulate(run_config, args.num_cpus_per_client)
        total = clock()
        out = Path(tmp) / "sim"
        rounds = [json.loads(line) for line in (out / "rounds.jsonl").read_text().splitlines()]
        if len(rounds) != args.rounds or any(r["replies"] != r["clients"] for r in rounds):
            raise SystemExit(f"simulation did not complete {args.rounds} full rounds: {rounds}")
        final = torch.load(out / "final_state.pt", weights_only=False)["arrays"]
        torch.save(final, args.out)
    return {"rounds_s": rounds[-1]["aggregated_at"] - rounds[0]["started_at"],
            "round_s": [r["time_s"] for r in rounds], "startup_s": rounds[0]["started_at"] - t_start,
            "total_s": total, "load": [load0, load_average()]}


def child_plain(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    from _plain_loop import plain_round
    from fedcoe_flwr.algorithms import get_algorithm
    from fedcoe_flwr.config import config_from_run_config
    from fedcoe_flwr.data import federation_classes, load_client_data
    from fedcoe_flwr import data as data_mod
    from fedcoe_flwr.server.run import absolute_paths

    load0 = load_average()
    if args.plain_threads:
        torch.set_num_threads(args.plain_threads)
    cfg = absolute_paths(config_from_run_config(_run_config(args, args.algorithm), str(ROOT)), ROOT)
    clock = Stopwatch()
    num_classes = len(federation_classes(cfg))
    algo = get_algorithm(cfg.algorithm)
    state = algo.init_state(cfg, num_classes)
    schedule = sample_schedule(cfg)
    if args.warm_plain:
        for client in sorted({c for clients in schedule for c in clients}):
            load_client_data(cfg, client)
    else:  # cold like a Ray actor: the data set is loaded and partitioned inside round 1
        data_mod.clear_caches()
    setup = clock()
    privates: dict[int, Any] = {}
    round_s = []
    clock = Stopwatch()
    for server_round, clients in enumerate(schedule, start=1):
        t0 = clock()
        state = plain_round(algo, state, cfg, clients, server_round, privates, lambda c: load_client_data(cfg, c),
                            num_classes, lambda steps: [algo.client_train(step) for step in steps])
        round_s.append(clock() - t0)
    rounds_s = clock()
    torch.save(state.arrays, args.out)
    return {"rounds_s": rounds_s, "round_s": round_s, "startup_s": setup, "total_s": setup + rounds_s,
            "threads": torch.get_num_threads(), "load": [load0, load_average()]}


def child_reference(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    from flwr.simulation import run_simulation

    from quickstart_ref import app as client_app
    from quickstart_ref import make_server

    from fedcoe_flwr.compat import install_fast_dispatch

    if args.reference_runtime == "ours":  # our runtime: only the ClientApp's style differs
        install_fast_dispatch()
    load0 = load_average()
    cfg = _run_config(args, "fedavg")
    train_config = {"data-path": args.hf_path, "batch-size": cfg["batch_size"], "local-epochs": cfg["local_epochs"],
                    "lr": cfg["lr"], "momentum": cfg["momentum"], "threads": args.reference_threads}
    result: dict[str, Any] = {}
    server = make_server(cfg["num_clients"], args.clients, args.rounds, train_config, args.seed, result)
    clock = Stopwatch()
    t_start = time.time()
    run_simulation(server, client_app, num_supernodes=cfg["num_clients"],
                   backend_config={"client_resources": {"num_cpus": args.num_cpus_per_client, "num_gpus": 0.0}})
    total = clock()
    times = result.get("round_times") or []
    if len(times) != args.rounds:
        raise SystemExit(f"reference run did not complete {args.rounds} rounds")
    torch.save(result["arrays"], args.out)
    return {"rounds_s": times[-1][1] - times[0][0], "round_s": [b - a for a, b in times],
            "startup_s": times[0][0] - t_start, "total_s": total, "load": [load0, load_average()]}


def prepare_reference_data(args: argparse.Namespace) -> str:
    """The workload's training images as a Hugging Face data set on disk (PNG images +
    labels, like ``uoft-cs/cifar10``), in the order our IID partitioner shards them."""
    import hashlib

    import numpy as np

    from fedcoe_flwr.config import config_from_run_config
    from fedcoe_flwr.data import load_dataset
    from fedcoe_flwr.server.run import absolute_paths

    cfg = absolute_paths(config_from_run_config(_run_config(args, "fedavg"), str(ROOT)), ROOT)
    data = load_dataset(cfg)
    pool = np.arange(len(data.train_y))
    if cfg.train_subset and cfg.train_subset < len(pool):  # the same subset as fedcoe_flwr.data
        pool = np.sort(np.random.default_rng(cfg.seed).permutation(pool)[: cfg.train_subset])
    key = hashlib.sha1(f"{cfg.dataset}|{cfg.data_root}|{cfg.synthetic_train_size}|{cfg.seed}|{len(pool)}|"
                       f"{int(pool.sum())}".encode()).hexdigest()[:12]
    path = Path(cfg.cache_dir) / f"bench-hf-{key}"
    if not (path / "dataset_info.json").is_file():
        from datasets import ClassLabel, Dataset, Features, Image
        from PIL import Image as PILImage

        features = Features({"img": Image(), "label": ClassLabel(names=list(data.class_names))})
        ds = Dataset.from_dict({"img": [PILImage.fromarray(x) for x in data.train_x[pool]],
                                "label": data.train_y[pool].tolist()}, features=features)
        tmp = path.with_name(path.name + f".tmp{os.getpid()}")
        ds.save_to_disk(str(tmp))
        os.replace(tmp, path)
    return str(path)


# ------------------------------------------------------------------ parent
def max_abs_diff(a_path: str, b_path: str) -> float:
    import torch

    a, b = torch.load(a_path, weights_only=False), torch.load(b_path, weights_only=False)
    if set(a) != set(b):
        return float("nan")
    return max(float((a[k].double() - b[k].double()).abs().max()) if a[k].numel() else 0.0 for k in a)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--clients", type=int, default=50, help="clients per round (C)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (R)")
    parser.add_argument("--algorithms", nargs="+", default=["fedavg", "fedcoe"])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--num-cpus-per-client", type=float, default=1.0,
                        help="Ray client resources: CPUs per actor (actors = cores / this)")
    parser.add_argument("--plain-threads", type=int, default=1,
                        help="torch threads of the plain loop (default 1, as each actor; 0 = torch's default)")
    parser.add_argument("--warm-plain", action="store_true",
                        help="plain loop: load every sampled client's data before the clock (default: cold, "
                             "loaded inside round 1 as the actors do)")
    parser.add_argument("--no-reference", action="store_true", help="skip the quickstart-style reference")
    parser.add_argument("--reference-runtime", choices=["both", "stock", "ours"], default="both",
                        help="Flower runtime of the reference: Flower's own ('stock'), ours ('ours': our "
                             "message dispatcher) or both (default)")
    parser.add_argument("--reference-threads", type=int, default=0,
                        help="torch threads the reference sets per call (default 0: none, as the quickstart)")
    parser.add_argument("--timeout", type=float, default=1800, help="seconds allowed to each run")
    add_workload_args(parser)
    parser.add_argument("--child", choices=["sim", "plain", "reference"], help=argparse.SUPPRESS)
    parser.add_argument("--algorithm", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    parser.add_argument("--hf-path", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        emit({"sim": child_sim, "plain": child_plain, "reference": child_reference}[args.child](args))
        return 0

    shape = _run_config(args, args.algorithms[0])
    print(f"[overhead] workload {args.workload}: {shape['dataset']} {shape['num_clients']} clients x "
          f"{50 if args.workload == 'default' else 500} images, {args.clients} clients per round, "
          f"{shape['local_epochs']} local epoch(s), batch {shape['batch_size']}, model {shape['model']}; "
          f"FedCoE K={args.experts} m={args.top_m}; {args.rounds} rounds x {args.repeats} repeats, seed {args.seed}, "
          f"{os.cpu_count()} cores, {args.num_cpus_per_client:g} CPU per actor; load now {load_average():.2f}",
          flush=True)
    hf_path = "" if args.no_reference else prepare_reference_data(args)
    common = ["--workload", args.workload, "--clients", args.clients, "--rounds", args.rounds,
              "--experts", args.experts, "--top-m", args.top_m, "--seed", args.seed,
              "--num-cpus-per-client", args.num_cpus_per_client, "--plain-threads", args.plain_threads,
              "--reference-threads", args.reference_threads] + (["--warm-plain"] if args.warm_plain else [])
    if args.data_root:
        common += ["--data-root", args.data_root]
    if args.num_clients:
        common += ["--num-clients", args.num_clients]
    runs: dict[str, list[dict[str, Any]]] = {}
    reference_runtimes = ["stock", "ours"] if args.reference_runtime == "both" else [args.reference_runtime]
    with tempfile.TemporaryDirectory(prefix="fedcoe-overhead-") as tmp:
        for rep in range(args.repeats):
            for algorithm in args.algorithms:
                res = {}
                for kind in ("sim", "plain"):
                    out = str(Path(tmp) / f"{algorithm}-{kind}-{rep}.pt")
                    res[kind] = run_child("overhead.py", [*common, "--child", kind, "--algorithm", algorithm,
                                                          "--out", out], args.timeout)
                    res[kind]["out"] = out
                    print(f"[overhead] repeat {rep + 1} {algorithm:7s} {kind:9s} {res[kind]['rounds_s']:8.2f} s "
                          f"(start-up {res[kind]['startup_s']:.1f} s, {fmt_load(res[kind]['load'])})", flush=True)
                res["max_dw"] = max_abs_diff(res["sim"]["out"], res["plain"]["out"])
                runs.setdefault(algorithm, []).append(res)
            for runtime in ([] if args.no_reference else reference_runtimes):
                out = str(Path(tmp) / f"reference-{runtime}-{rep}.pt")
                ref = run_child("overhead.py", [*common, "--child", "reference", "--reference-runtime", runtime,
                                                "--out", out, "--hf-path", hf_path], args.timeout)
                print(f"[overhead] repeat {rep + 1} reference {runtime:9s} {ref['rounds_s']:8.2f} s "
                      f"(start-up {ref['startup_s']:.1f} s, {fmt_load(ref['load'])})", flush=True)
                runs.setdefault(f"reference-{runtime}", []).append({"sim": ref})

    print(f"\n[overhead] medians over {args.repeats} repeat(s), {args.rounds} rounds of {args.clients} clients "
          f"(workload {args.workload}); 'steady' = rounds 2..R (actors and plain loop already warm):")
    plain_ref = None
    for algorithm in args.algorithms:
        reps = runs[algorithm]
        sim = median(r["sim"]["rounds_s"] for r in reps)
        plain = median(r["plain"]["rounds_s"] for r in reps)
        ratios = [r["sim"]["rounds_s"] / r["plain"]["rounds_s"] for r in reps]
        loads = [x for r in reps for x in r["sim"]["load"] + r["plain"]["load"]]
        steady = ""
        if args.rounds > 1:
            s_sim = median(sum(r["sim"]["round_s"][1:]) for r in reps)
            s_plain = median(sum(r["plain"]["round_s"][1:]) for r in reps)
            steady = f"   steady ratio {s_sim / s_plain:5.2f} ({s_sim:.2f} s / {s_plain:.2f} s)"
        if algorithm == "fedavg":
            plain_ref = plain
        print(f"{algorithm:8s} simulation {sim:8.2f} s   plain loop {plain:8.2f} s   ratio {sim / plain:5.2f}{steady}   "
              f"(per repeat {' '.join(f'{x:.2f}' for x in ratios)}; sim/plain max|dw| "
              f"{max(r['max_dw'] for r in reps):.2g}; {fmt_load(loads)})")
    for runtime in ("stock", "ours"):
        reps = runs.get(f"reference-{runtime}")
        if not reps:
            continue
        ref = median(r["sim"]["rounds_s"] for r in reps)
        loads = [x for r in reps for x in r["sim"]["load"]]
        name = {"stock": "on Flower's own runtime", "ours": "on our runtime"}[runtime]
        if plain_ref is None:
            print(f"reference {name} simulation {ref:8.2f} s (no fedavg plain loop to compare with; add fedavg)")
        else:
            ours = median(r["sim"]["rounds_s"] for r in runs["fedavg"])
            print(f"quickstart-style reference (FedAvg) {name}: simulation {ref:8.2f} s   ratio "
                  f"{ref / plain_ref:5.2f} vs the fedavg plain loop; ours is {ref / ours:.1f}x faster "
                  f"({fmt_load(loads)})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
