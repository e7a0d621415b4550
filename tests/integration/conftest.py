"""Everything under tests/integration runs real simulations, real processes or real images:
it is marked slow here, by folder (``-m "not slow"`` leaves it out; CI runs it). The deployment
tests share their certificates and one trained federation (``federation``)."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
from harness import make_certs
from loopback import diagnosis, new_site_folder, start_deployment

from fedcoe_flwr.server import onboarding as onboard
from tools.deploy.processes import marked_processes
from tools.deploy.results import round_lines

HERE = Path(__file__).resolve().parent


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config, items):
    for item in items:
        if HERE in Path(str(item.fspath)).resolve().parents:
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def certs(tmp_path_factory):
    """A CA, the SuperLink's certificate and six node keys: the federation's three sites, its
    unregistered node and its two new sites (the fault test's four sites use the first four)."""
    return make_certs(tmp_path_factory.mktemp("certs") / "certs", 6)


@pytest.fixture(scope="session")
def federation(tmp_path_factory, certs):
    """One TLS deployment for every test that reads a trained federation (one deployment in place
    of two): 3 registered SuperNodes (2 training sites, 1 cold-start site) and 1 SuperNode with
    an unregistered key; a 3-round FedCoE run. Once round 1 is aggregated a new site joins and
    is onboarded before round 3 (one evaluation, after the last round), then trains in round 3
    (``coldstart_join_training``). Then every SuperNode is stopped and a serving-mode run onboards
    a second new site from the finished run's checkpoint, with no training client present.
    Everything is stopped before the tests look at the results."""
    tmp = tmp_path_factory.mktemp("deploy")
    dep = start_deployment(tmp, certs, "tls", unregistered=1, num_rounds=3, eval_every=3,
                           coldstart_join_training=True)
    out: dict = {"dep": dep, "timings": {}}
    try:
        out["site_a"] = new_site_folder(dep.sites.global_test, tmp / "new-site-a", 0, 40, 30)
        out["site_b"] = new_site_folder(dep.sites.global_test, tmp / "new-site-b", 1, 40, 30)
        dep.start_run()  # the unregistered SuperNode's refusal is awaited after the run, not before
        # round 1 aggregated: round 2 is starting
        dep.wait_until(lambda: len(round_lines(dep.results_dir)) >= 1, "round 1's aggregation", 400)
        t0 = time.time()
        out["late"] = dep.add_site(out["site_a"], name="new-site-a")
        out["timings"]["late_online_s"] = time.time() - t0
        out["status"] = dep.wait_run(timeout=600)
        out["refused"] = dep.wait_refused(timeout=90)
        out["nodes"] = dep.node_status()
        out["registered"] = set(dep.node_ids.values())  # before the serving run registers its new site
        out["train_lines"] = list(dep.run_lines)
        out["why"] = diagnosis(dep)
        # serving mode: no training client left
        dep.stop_supernodes([index for index, proc in dep.nodes.items() if proc.alive()])
        t0 = time.time()
        dep.start_run(serve_from=str(dep.results_dir), serve_max_nodes=1, serve_timeout=240.0)
        out["served"] = dep.add_site(out["site_b"], name="new-site-b")
        out["serve_rc"] = dep.wait_run(timeout=300)
        out["timings"]["serve_s"] = time.time() - t0
    finally:
        dep.stop_all()
    out["leftovers"] = marked_processes(dep.mark)
    out["registry"] = onboard.read_registry(dep.results_dir)
    return out
