"""Real SuperLink + SuperNode processes over gRPC on 127.0.0.1 (TLS + node auth), shared by the
deployment tests: start a deployment, read a node's log, and say what to read when a test fails.
The trained federation most of them read is one run, started once (``conftest.federation``)."""

from __future__ import annotations

from pathlib import Path

from tools.deploy.deployment import LocalDeployment

# one evaluation, after the last round: an evaluation is three exchanges, each a ClientApp process per node
SMOKE = {"num_rounds": 2, "eval_every": 2, "round_timeout": 300.0, "wait_for_nodes": 120.0, "min_reply_fraction": 0.5}


def start_deployment(tmp: Path, certs: Path, run_name: str, unregistered: int = 0, num_nodes: int = 3,
                     num_coldstart: int | None = None, **overrides) -> LocalDeployment:
    """Data, SuperLink, registered keys and SuperNodes up (TLS, the smoke config); no run yet."""
    dep = LocalDeployment(tmp / run_name, num_nodes=num_nodes, tls=True, config="configs/smoke.yaml",
                          overrides={**SMOKE, "run_name": run_name, "results_dir": str(tmp / "results"), **overrides},
                          num_coldstart=num_coldstart, unregistered=unregistered, certs=certs, echo=lambda line: None)
    try:
        dep.prepare_data()
        dep.make_certs()
        dep.start_superlink()
        dep.register_all()
        dep.start_supernodes()
    except BaseException:
        dep.stop_all()
        raise
    return dep


def node_log(dep: LocalDeployment, index: int) -> str:
    return dep.nodes[index].log.read_text(errors="replace")


def wait_for_node_log(dep: LocalDeployment, index: int, text: str, count: int, timeout: float) -> None:
    """Until the SuperNode's log holds ``text`` ``count`` times: nothing structured says when a
    message has reached a node, and a kill must land in the middle of a round."""
    dep.wait_until(lambda: node_log(dep, index).count(text) >= count, f"{count} x {text!r} in {dep.site_name(index)}'s log",
                   timeout)


def diagnosis(dep: LocalDeployment) -> str:
    """What to read when a real-process test fails: the run's log, the SuperLink's SQLite
    errors and the end of every SuperNode log."""
    link = dep.superlink.log.read_text(errors="replace") if dep.superlink else ""
    parts = ["run log:", *dep.run_lines[-40:],
             f"SuperLink log: {link.count('database is locked')} x 'database is locked'"]
    for index, proc in dep.nodes.items():
        parts += [f"--- {proc.name} (alive={proc.alive()})", *node_log(dep, index).splitlines()[-8:]]
    return "\n".join(parts)


def new_site_folder(global_test: Path, out: Path, start: int, n_train: int, n_test: int) -> Path:
    """A site the federation never saw: images of the global test set (never used for training),
    laid out as train/<class>/* (its unlabeled pool) and test/<class>/* (its labelled test split)."""
    files = sorted(global_test.rglob("*.png"))[start::3][:n_train + n_test]  # every class, disjoint per start
    for i, f in enumerate(files):
        split = "train" if i < n_train else "test"
        dst = out / split / f.parent.name / f.name
        dst.parent.mkdir(parents=True, exist_ok=True)
        dst.write_bytes(f.read_bytes())
    return out
