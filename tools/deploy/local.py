"""A real Flower deployment on this machine's loopback, for trials and tests:

    python -m tools.deploy.local --nodes 3 --tls --rounds 2 [--config configs/smoke.yaml]

1. cuts the configured data set into one image folder per site (``tools.deploy.sites``),
2. with ``--tls`` makes a CA, the SuperLink certificate and one OpenSSH ECDSA key pair per
   SuperNode with ``scripts/make_certs.sh``,
3. starts ``flower-superlink`` (Fleet gRPC and Control/Runtime HTTP bound to 127.0.0.1 on free
   ports, its state in SQLite, ``--enable-supernode-auth`` with TLS),
4. registers every node key (``flwr supernode register --format json``),
5. starts N ``flower-supernode`` processes, each with its own data folder, state folder and
   FLWR_HOME, and waits until ``flwr supernode list --format json`` shows them online,
6. starts the run (``flwr run --format json``), streams its log (``flwr log --stream``) and
   judges it by Flower's run status (``flwr ls --format json``) and the ServerApp's
   ``summary.json``,
7. reports where the results are (``results/<run>/``) and stops every process it started,
   children included, also on Ctrl-C, SIGTERM or an error.

Everything lives in a run folder (default ``.deploy/<run-name>/``, git-ignored).
With ``--serve-from RUN_DIR --onboard-dir DIR ...`` it runs the serving mode instead: no
training, new sites onboarded from a finished run's checkpoint.
"""

from __future__ import annotations

import argparse
import signal
import sys
import time
from pathlib import Path
from typing import Any, Callable

from fedcoe_flwr.server.onboarding import load_served_checkpoint, read_registry
from fedcoe_flwr.simulate import parse_overrides

from .deployment import ROOT, DeploymentError, LocalDeployment
from .processes import tail
from .results import format_metrics, metrics_lines, run_status

FINISHED = "finished:completed"


def _raise_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--nodes", type=int, default=3, help="SuperNodes (training + cold-start sites)")
    parser.add_argument("--coldstart", type=int, default=None, help="cold-start sites among them (default 1)")
    parser.add_argument("--rounds", type=int, default=2)
    parser.add_argument("--config", default="configs/smoke.yaml")
    parser.add_argument("--algorithm", default=None)
    parser.add_argument("--tls", action="store_true", help="TLS + SuperNode authentication (else --insecure)")
    parser.add_argument("--certs", default=None, help="use this certs folder (made by scripts/make_certs.sh)")
    parser.add_argument("--mode", choices=("sites", "partitions"), default="sites",
                        help="sites: each node gets its own image folder (data-dir); partitions: "
                             "partition-id/num-partitions over the shared data set (research mode)")
    parser.add_argument("--unregistered", type=int, default=0,
                        help="also start this many SuperNodes with keys that are NOT registered (needs --tls)")
    parser.add_argument("--run-name", default=None)
    parser.add_argument("--workdir", default=None, help="run folder (default .deploy/<run-name>)")
    parser.add_argument("--timeout", type=float, default=1800.0, help="seconds for the whole run")
    parser.add_argument("--torch-threads", type=int, default=1, help="torch threads per ClientApp")
    parser.add_argument("--set", nargs="*", default=[], metavar="KEY=VALUE", help="more run-config overrides")
    parser.add_argument("--serve-from", default=None, metavar="RUN_DIR",
                        help="serving mode: no training; onboard new sites from this finished run "
                             "(results/<run> or a checkpoint file)")
    parser.add_argument("--onboard-dir", action="append", default=[], metavar="DIR",
                        help="serving mode: start one new-site SuperNode per image folder (repeatable)")
    parser.add_argument("--serve-timeout", type=float, default=600.0, help="serving mode: seconds to serve")
    args = parser.parse_args(argv)
    if args.unregistered and not args.tls:
        parser.error("--unregistered needs --tls (node authentication only exists with TLS)")
    if args.onboard_dir and not args.serve_from:
        parser.error("--onboard-dir needs --serve-from")
    return args


def drive(dep: LocalDeployment, steps: Callable[[LocalDeployment], str], extra: dict[str, Any]
          ) -> tuple[str | None, dict[str, Any]]:
    """Run ``steps`` (returns Flower's run status) in the deployment, stop every process it
    started, write deployment.json; Ctrl-C ends the command with exit code 130."""
    started, status = time.time(), None
    try:
        with dep:
            status = steps(dep)
    except KeyboardInterrupt:
        print("[deploy] interrupted: stopped every process")
        dep.report(status, {"total_s": round(time.time() - started, 2), **extra})
        raise SystemExit(130) from None
    except DeploymentError as err:
        print(f"[deploy] failed: {err}", file=sys.stderr)
    return status, dep.report(status, {"total_s": round(time.time() - started, 2), **extra})


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    return serve_main(args) if args.serve_from else train_main(args)


def train_main(args: argparse.Namespace) -> int:
    run_name = args.run_name or f"deploy-{time.strftime('%Y%m%d-%H%M%S')}"
    overrides: dict[str, Any] = {"num_rounds": args.rounds, "run_name": run_name, "wait_for_nodes": 120.0,
                                 **parse_overrides(args.set)}
    if args.algorithm:
        overrides["algorithm"] = args.algorithm
    workdir = Path(args.workdir or ROOT / ".deploy" / run_name)
    dep = LocalDeployment(workdir, args.nodes, args.tls, args.config, overrides, args.coldstart, args.mode,
                          args.unregistered, args.torch_threads, args.certs)

    def steps(dep: LocalDeployment) -> str:
        print(f"[deploy] run folder {dep.workdir}; {dep.cfg.num_clients} training + "
              f"{dep.cfg.num_coldstart_clients} cold-start SuperNodes, {args.rounds} rounds, mode {args.mode}")
        dep.prepare_data()
        if args.tls:
            dep.make_certs()
        dep.start_superlink()
        if args.tls:
            dep.register_all()
        dep.start_supernodes()
        if args.unregistered:
            for i, code in dep.wait_refused().items():
                print(f"[deploy] unregistered SuperNode {dep.site_name(i)} exited with code {code}: "
                      f"{tail(dep.nodes[i].log, 3)}")
        dep.start_run()
        return dep.wait_run(args.timeout)

    status, report = drive(dep, steps, {})
    lines = metrics_lines(dep.results_dir)
    server_status = run_status(dep.results_dir)
    print(f"[deploy] run {dep.run_id}: Flower says {status}, the ServerApp's summary.json says {server_status}")
    if lines:
        last = lines[-1]
        print(f"[deploy] results in {dep.results_dir}: round {last['round']} {format_metrics(last)}")
    print(f"[deploy] train phases {report['train_phase_s']} s; run {report['timings'].get('run_s')} s; "
          f"total {report['total_s']} s; report {dep.workdir / 'deployment.json'}")
    return 0 if status == FINISHED and server_status == "finished" else 1


def serve_main(args: argparse.Namespace) -> int:
    """SuperLink + the serving-mode run from a finished run's checkpoint + one new-site SuperNode
    per --onboard-dir; prints the registry lines and the local prediction command."""
    payload, ckpt, run_dir = load_served_checkpoint(Path(args.serve_from).resolve())
    run_name = str(payload["config"].get("run_name") or run_dir.name)
    dirs = [Path(d).resolve() for d in args.onboard_dir]
    overrides = {"run_name": run_name, "serve_from": str(ckpt), "serve_timeout": args.serve_timeout,
                 "serve_max_nodes": len(dirs)}
    workdir = Path(args.workdir or ROOT / ".deploy" / f"serve-{run_name}-{time.strftime('%Y%m%d-%H%M%S')}")
    dep = LocalDeployment(workdir, max(1, len(dirs)), args.tls, args.config, overrides, 0, "sites", 0,
                          args.torch_threads, args.certs)
    before = len(read_registry(run_dir))
    added: list[int] = []

    def steps(dep: LocalDeployment) -> str:
        print(f"[deploy] serving mode: onboarding new sites from {ckpt} (run {run_name}); run folder {dep.workdir}")
        if args.tls:
            dep.make_certs()
        dep.start_superlink()
        dep.start_run()
        for d in dirs:
            added.append(dep.add_site(d, name=d.name))
        if not dirs:
            print(f"[deploy] serving for {args.serve_timeout:.0f}s; start new sites with flower-supernode "
                  f"--superlink 127.0.0.1:{dep.fleet_port} ... --node-config 'data-dir=\"/path\" cold-start=true'")
        return dep.wait_run(args.serve_timeout + 120)

    status, _ = drive(dep, steps, {"serve_from": str(ckpt)})
    entries = read_registry(run_dir)[before:]
    for entry in entries:
        acc = entry.get("metrics", {}).get("coldstart_accuracy")
        print(f"[deploy] onboarded node {entry['node_id']}: status {entry['status']}, routing row "
              f"{entry.get('routing_row')}, cold-start accuracy {acc}, round trip {entry.get('round_trip_s')} s")
    print(f"[deploy] registry {run_dir / 'onboarding.jsonl'}")
    for index in added:
        model = dep.onboarded_model(index)
        print(f"[deploy] {dep.site_name(index)}: model {model} ({'saved' if model.is_file() else 'MISSING'}); "
              f"python -m fedcoe_flwr.predict --model {model} --images {dep.extra_sites[index][1]}")
    ok = status == FINISHED and len([e for e in entries if e["status"] == "onboarded"]) >= len(dirs)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
