"""Deployment: site data from node config, private state on disk, certificates, the
orchestrator's packaging, and real SuperLink + SuperNode processes over gRPC on 127.0.0.1
(TLS + node auth, the SuperLink's state in SQLite). The compose file: tests/test_compose.py.

The ``slow`` tests start real processes on free loopback ports and stop all of them (process
groups plus a sweep for the deployment's environment marker); each is bounded by timeouts.
They judge a run by structured output only where Flower offers it (`flwr ... --format json`,
the ServerApp's rounds.jsonl / metrics.jsonl / summary.json); the SuperNode log is read only
to time a kill into the middle of a round, which nothing structured reports."""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from pathlib import Path

import pytest
import torch
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedcoe_flwr.client import handlers as client
from fedcoe_flwr.client import private_state
from fedcoe_flwr.algorithms import get_algorithm
from fedcoe_flwr.client.node import NodeConfigError, node_role
from fedcoe_flwr.client.private_state import state_checksum, state_paths
from fedcoe_flwr.data import DataError, load_global_test, load_site_data
from fedcoe_flwr.records import (ARRAYS, CONFIG, EXPERIMENT, METRICS, config_record, experiment_record,
                                 from_array_record, to_array_record)

from PIL import Image
from tools.deploy.deployment import LocalDeployment
from tools.deploy.processes import marked_processes
from tools.deploy.results import metrics_lines, round_lines, run_status
from tools.deploy.sites import export_sites

COLOURS = {"ant": (250, 10, 10), "bee": (10, 250, 10), "cat": (10, 10, 250)}


def make_image_folder(root, counts=None, size=10):
    """root/{train,test}/<class>/<i>.png, each image a solid class colour."""
    counts = counts or {"train": {"ant": 4, "bee": 3, "cat": 5}, "test": {"ant": 2, "bee": 2, "cat": 1}}
    for split, per_class in counts.items():
        for cls, n in per_class.items():
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("RGB", (size, size), COLOURS[cls]).save(folder / f"{i:03d}.png")
    return root

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _task_identity():
    TaskIdentity.run_id, TaskIdentity.task_id, TaskIdentity.node_id = 1, 1, 1
    yield


def context(node_config: dict, run_id: int = 7, state: RecordDict | None = None) -> Context:
    return Context(run_id=run_id, node_id=11, node_config=node_config, state=state or RecordDict(), run_config={})


# ------------------------------------------------------------------ node config -> role
def test_node_role_from_site_and_partition_configs(make_cfg):
    cfg = make_cfg(num_clients=3, num_coldstart_clients=2)
    site = node_role(context({"data-dir": "/data/a", "site-id": 2}))
    assert (site.mode, site.key, site.index(cfg), site.coldstart) == ("site", "site-2", 2, False)
    cold = node_role(context({"data-dir": "/data/b", "site-id": 1, "cold-start": True, "state-dir": "/s"}))
    assert (cold.key, cold.index(cfg), cold.state_dir) == ("coldstart-1", 4, "/s")  # num_clients + site-id
    part = node_role(context({"partition-id": 3, "num-partitions": 5}))
    assert (part.mode, part.key, part.index(cfg), part.num_partitions) == ("partition", "partition-3", 3, 5)


@pytest.mark.parametrize("node_config, match", [
    ({}, "neither which site nor which partition"),
    ({"data-dir": "/d"}, "both data-dir and site-id"),
    ({"data-dir": "/d", "site-id": 0, "partition-id": 0, "num-partitions": 2}, "mixes a site"),
    ({"data-dir": "/d", "site-id": "x"}, "site-id must be an integer"),
    ({"data-dir": "/d", "site-id": 0, "cold-start": "maybe"}, "cold-start must be true or false"),
])
def test_bad_node_config_says_what_to_pass(node_config, match):
    with pytest.raises(NodeConfigError, match=match):
        node_role(context(node_config))


def test_site_id_outside_the_federation_is_an_error(make_cfg):
    cfg = make_cfg(num_clients=2, num_coldstart_clients=1)
    with pytest.raises(NodeConfigError, match="training site-id 2 is outside 0..1"):
        node_role(context({"data-dir": "/d", "site-id": 2})).index(cfg)
    with pytest.raises(NodeConfigError, match="cold-start site-id 1 is outside 0..0"):
        node_role(context({"data-dir": "/d", "site-id": 1, "cold-start": True})).index(cfg)


# ------------------------------------------------------------------ site data
@pytest.fixture
def sites(make_cfg, tmp_path, fresh_caches):
    """Site folders cut from the tiny generated data set (3 training + 1 cold-start)."""
    cfg = make_cfg()
    folders = export_sites(cfg, tmp_path / "sites")
    return make_cfg(class_names=",".join(folders.class_names)), folders


def images(x: torch.Tensor) -> list[bytes]:
    """A batch of images as a sorted list of their bytes (order-free comparison)."""
    return sorted(bytes(row) for row in x.reshape(len(x), -1).numpy())


def test_exported_sites_hold_exactly_the_research_mode_data(sites):
    cfg, folders = sites
    from fedcoe_flwr.data import load_client_data

    for index in range(cfg.num_partitions):
        folder = folders.training[index] if index < cfg.num_clients else folders.coldstart[index - cfg.num_clients]
        site, part = load_site_data(folder, cfg), load_client_data(cfg, index)
        for a, b in ((site.train_x, part.train_x), (site.test_x, part.test_x)):
            assert a.shape == b.shape
            assert images(a) == images(b)  # the same images (PNG is lossless), in another order
        assert sorted(site.train_y.tolist()) == sorted(part.train_y.tolist())
    gx, gy = load_global_test(cfg.replace(global_test_dir=str(folders.global_test)))
    ref_x, ref_y = load_global_test(cfg)
    assert images(gx) == images(ref_x) and sorted(gy.tolist()) == sorted(ref_y.tolist())


def test_site_labels_follow_the_federation_label_space(tmp_path, make_cfg):
    root = make_image_folder(tmp_path / "site-a", {"train": {"bee": 2, "cat": 3}, "test": {"cat": 1}})
    cfg = make_cfg(class_names="cat,dog,bee,ant", image_size=8)
    data = load_site_data(root, cfg)
    assert sorted(data.train_y.tolist()) == [0, 0, 0, 2, 2] and data.test_y.tolist() == [0]


def test_site_with_an_unknown_class_names_folder_and_class(tmp_path, make_cfg):
    root = make_image_folder(tmp_path / "site-b", {"train": {"ant": 2, "cat": 2}, "test": {"ant": 1}})
    with pytest.raises(DataError, match=r"site-b.*\['cat'\].*train/cat"):
        load_site_data(root, make_cfg(class_names="ant,bee", image_size=8))


def test_site_data_errors_name_the_folder(tmp_path, make_cfg):
    with pytest.raises(DataError, match="nowhere.*does not exist"):
        load_site_data(tmp_path / "nowhere", make_cfg(class_names="a,b"))
    root = make_image_folder(tmp_path / "site-c")
    with pytest.raises(DataError, match="needs class_names"):
        load_site_data(root, make_cfg(class_names=""))


def test_site_data_from_a_tar_gz_and_its_cache(tmp_path, make_cfg):
    root = make_image_folder(tmp_path / "site-d")
    archive = tmp_path / "site-d.tar.gz"
    subprocess.run(["tar", "-czf", str(archive), "-C", str(tmp_path), "site-d"], check=True)
    cfg = make_cfg(class_names="ant,bee,cat", image_size=8)
    a = load_site_data(root, cfg)
    b = load_site_data(archive, cfg, cache_dir=tmp_path / "cache")
    c = load_site_data(archive, cfg, cache_dir=tmp_path / "cache")  # from the cache
    assert len(list((tmp_path / "cache").glob("site-*"))) == 1
    for x in (b, c):  # archive order differs from the sorted folder walk: compare as sets of images
        assert images(x.train_x) == images(a.train_x) and sorted(x.test_y.tolist()) == sorted(a.test_y.tolist())
    assert torch.equal(b.train_x, c.train_x) and torch.equal(b.train_y, c.train_y)  # the cache is exact


# ------------------------------------------------------------------ ClientApp handlers in site mode
def message(cfg, message_type: str, arrays: dict, config: dict) -> Message:
    content = RecordDict({ARRAYS: to_array_record(arrays), CONFIG: config_record(config),
                          EXPERIMENT: experiment_record(cfg)})
    return Message(content=content, dst_node_id=11, message_type=message_type)


def test_profile_gives_site_index_and_federation_size(sites):
    cfg, folders = sites
    query = Message(content=RecordDict({EXPERIMENT: experiment_record(cfg)}), dst_node_id=11,
                    message_type="query.profile")
    cold = client.handle_profile(query, context({"data-dir": str(folders.coldstart[0]), "site-id": 0,
                                                 "cold-start": True}))
    info = dict(cold.content.config_records[CONFIG])
    assert (info["partition-id"], info["num-partitions"], info["site"]) == (3, 4, "coldstart-0")
    # research mode answers as before, with or without the experiment in the query
    bare = Message(content=RecordDict(), dst_node_id=11, message_type="query.profile")
    info = dict(client.handle_profile(bare, context({"partition-id": 2, "num-partitions": 4})).content
                .config_records[CONFIG])
    assert (info["partition-id"], info["num-partitions"]) == (2, 4)
    # a site whose folder holds a class the federation does not know is stopped at discovery
    bad = make_image_folder(folders.root / "bad", {"train": {"bee": 1}, "test": {"bee": 1}})
    with pytest.raises(DataError, match="bee"):
        client.handle_profile(query, context({"data-dir": str(bad), "site-id": 0}))


def test_private_state_survives_a_restart_through_the_state_dir(sites, tmp_path):
    """Train in one Context; a 'restarted SuperNode' (new, empty Context) evaluates with the
    private parts reloaded from state-dir -- checked by checksum and by value."""
    cfg, folders = sites
    algo = get_algorithm(cfg.algorithm)
    state = algo.init_state(cfg, len(folders.class_names))
    node_config = {"data-dir": str(folders.training[1]), "site-id": 1, "state-dir": str(tmp_path / "state")}
    payload, pconfig = algo.train_payload(state, cfg, 1, 1)
    first = context(node_config)
    reply = client.handle_train(message(cfg, "train", payload, {**pconfig, "server_round": 1}), first)
    assert dict(reply.content.metric_records[METRICS])["num_samples"] > 0
    kept = from_array_record(first.state.array_records[private_state.PRIVATE])
    folder, journal = state_paths(tmp_path / "state", cfg.resolved_run_name, "site-1")
    path = private_state.version_path(folder, 1)
    saved = torch.load(path, weights_only=True)
    assert saved["round"] == 1 and saved["crc"] == state_checksum(kept)
    assert not [p for p in path.parent.iterdir() if ".tmp" in p.name]  # written atomically

    restarted = context(node_config)  # same run, empty state
    payload, pconfig = algo.eval_payload(state, cfg, 1)
    client.handle_evaluate(message(cfg, "evaluate", payload, {**pconfig, "server_round": 1}), restarted)
    reloaded = from_array_record(restarted.state.array_records[private_state.PRIVATE])
    assert reloaded.keys() == kept.keys() and all(torch.equal(reloaded[k], kept[k]) for k in kept)
    events = json.loads(journal.read_text())
    assert [(e["phase"], e["source"]) for e in events] == [("train", "none"), ("evaluate", "state-dir")]
    assert events[1]["crc_in"] == events[0]["crc_out"] == saved["crc"]

    # another run with the same name does not pick up this run's private parts ...
    other = context(node_config, run_id=8)
    assert private_state.load_private_state(node_role(other), cfg, other, before_round=2) is None
    # ... unless it resumes it
    assert private_state.load_private_state(node_role(other), cfg.replace(resume=True), other, 2) is not None


def test_corrupt_state_file_is_ignored_not_loaded(sites, tmp_path):
    cfg, folders = sites
    node_config = {"data-dir": str(folders.training[0]), "site-id": 0, "state-dir": str(tmp_path / "s")}
    ctx = context(node_config)
    role = node_role(ctx)
    private_state.save_private_state(role, cfg, ctx, {"w": torch.ones(3)}, 1)
    folder, _ = state_paths(tmp_path / "s", cfg.resolved_run_name, "site-0")
    path = private_state.version_path(folder, 1)
    assert private_state.load_private_state(role, cfg, ctx, 2)[0]["w"].tolist() == [1.0, 1.0, 1.0]
    path.write_bytes(path.read_bytes()[:20])
    assert private_state.load_private_state(role, cfg, ctx, 2) is None


def test_private_state_of_a_round_never_aggregated_is_skipped(sites, tmp_path):
    """A crash after clients trained round 3 but before the server aggregated it: the resumed
    round 3 starts from the round-2 parts, as the uninterrupted run did."""
    cfg, folders = sites
    ctx = context({"data-dir": str(folders.training[0]), "site-id": 0, "state-dir": str(tmp_path / "s")})
    role = node_role(ctx)
    for r in (1, 2, 3, 4):
        private_state.save_private_state(role, cfg, ctx, {"w": torch.full((2,), float(r))}, r)
    folder, _ = state_paths(tmp_path / "s", cfg.resolved_run_name, "site-0")
    assert sorted(p.name for p in folder.glob("round-*.pt")) == [f"round-0000{r}.pt" for r in (2, 3, 4)]
    private, payload = private_state.load_private_state(role, cfg, ctx, before_round=4)
    assert payload["round"] == 3 and private["w"].tolist() == [3.0, 3.0]
    fresh = context({"data-dir": str(folders.training[0]), "site-id": 0, "state-dir": str(tmp_path / "s")})
    private, source = private_state.private_parts(fresh, role, cfg, before_round=3)
    assert source == "state-dir" and private["w"].tolist() == [2.0, 2.0]
    # the held parts are newer than the round allows: the older version on disk wins
    private, source = private_state.private_parts(ctx, role, cfg, before_round=3)
    assert source == "state-dir" and private["w"].tolist() == [2.0, 2.0]


# ------------------------------------------------------------------ certificates (compose: tests/test_compose.py)
def test_make_certs_makes_ca_server_cert_and_openssh_node_keys(tmp_path):
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.hazmat.primitives.serialization import load_ssh_private_key, load_ssh_public_key

    out = tmp_path / "certs"
    env = {**os.environ, "CERT_RSA_BITS": "2048"}
    subprocess.run(["bash", str(ROOT / "scripts" / "make_certs.sh"), str(out), "2"], check=True, env=env,
                   capture_output=True, timeout=120)
    sans = subprocess.run(["openssl", "x509", "-in", str(out / "server.pem"), "-noout", "-ext", "subjectAltName"],
                          check=True, capture_output=True, text=True).stdout
    for san in ("DNS:localhost", "IP Address:127.0.0.1", "IP Address:0:0:0:0:0:0:0:1", "DNS:superlink"):
        assert san in sans
    subprocess.run(["openssl", "verify", "-CAfile", str(out / "ca.crt"), str(out / "server.pem")], check=True,
                   capture_output=True)
    for i in range(2):
        private = (out / "keys" / f"site-{i}").read_bytes()
        assert private.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")  # what flwr reads (G4)
        key = load_ssh_private_key(private, password=None)
        assert isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == "secp384r1"
        assert isinstance(load_ssh_public_key((out / "keys" / f"site-{i}.pub").read_bytes()), ec.EllipticCurvePublicKey)
        assert oct((out / "keys" / f"site-{i}").stat().st_mode & 0o777) == "0o600"
    assert (out / "superexec.secret").stat().st_size >= 32
    before = (out / "ca.crt").read_bytes()  # a re-run adds keys and keeps the CA
    subprocess.run(["bash", str(ROOT / "scripts" / "make_certs.sh"), str(out), "3"], check=True, env=env,
                   capture_output=True, timeout=120)
    assert (out / "ca.crt").read_bytes() == before and (out / "keys" / "site-2.pub").is_file()
    assert "certs/" in (ROOT / ".gitignore").read_text().split()


# ------------------------------------------------------------------ packaging of the orchestrator
def test_the_deployment_tools_are_neither_installed_nor_shipped_in_the_fab(tmp_path):
    """tools/ runs beside the app: pip does not install it and `flwr build` (the same FAB
    `flwr run` sends to every SuperNode) leaves it out, while the app's packages go in."""
    import tomllib

    from setuptools import find_packages

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = find_packages(ROOT, include=pyproject["tool"]["setuptools"]["packages"]["find"]["include"])
    assert "fedcoe_flwr" in packages and "server_app" in packages
    assert not [p for p in packages if p == "tools" or p.startswith("tools.")], packages
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "home"), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1"}
    res = subprocess.run(["flwr", "build", "--app", str(ROOT)], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=120)
    assert res.returncode == 0, res.stdout + res.stderr
    import zipfile

    (fab,) = tmp_path.glob("*.fab")
    names = zipfile.ZipFile(fab).namelist()
    assert "fedcoe_flwr/client/handlers.py" in names and "server_app/app.py" in names and "client_app/app.py" in names
    assert not [n for n in names if n.startswith("tools/")], names


def test_no_broad_process_kill_anywhere_in_the_repository():
    """Docs, scripts and code stop processes by PID; a kill by name would also hit other
    users' SuperLinks on a shared host."""
    by_name = re.compile(r"\b(p" + r"kill|kill" + r"all)\b")  # spelt apart so this file does not match itself
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    hits = []
    for name in tracked:
        try:
            text = (ROOT / name).read_text()
        except (UnicodeDecodeError, OSError):
            continue
        hits += [f"{name}:{i}: {line.strip()}" for i, line in enumerate(text.splitlines(), 1) if by_name.search(line)]
    assert hits == []


# ------------------------------------------------------------------ real processes on loopback
SMOKE = {"num_rounds": 2, "round_timeout": 300.0, "wait_for_nodes": 120.0, "min_reply_fraction": 0.5}


def start_deployment(tmp: Path, certs: Path, run_name: str, unregistered: int = 0, num_nodes: int = 3,
                     num_coldstart: int | None = None) -> LocalDeployment:
    dep = LocalDeployment(tmp / run_name, num_nodes=num_nodes, tls=True, config="configs/smoke.yaml",
                          overrides={**SMOKE, "run_name": run_name, "results_dir": str(tmp / "results")},
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


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    out = tmp_path_factory.mktemp("certs") / "certs"
    subprocess.run(["bash", str(ROOT / "scripts" / "make_certs.sh"), str(out), "4"], check=True,
                   env={**os.environ, "CERT_RSA_BITS": "2048"}, capture_output=True, timeout=120)
    return out


@pytest.fixture(scope="module")
def tls_run(tmp_path_factory, certs):
    """3 registered SuperNodes + 1 SuperNode with an unregistered key; a 2-round FedCoE run.
    Everything is stopped before the tests look at the results."""
    tmp = tmp_path_factory.mktemp("deploy")
    dep = start_deployment(tmp, certs, "tls", unregistered=1)
    try:
        refused = dep.wait_refused(timeout=90)
        dep.start_run()
        status = dep.wait_run(timeout=600)
        nodes = dep.node_status()
        why = diagnosis(dep)
    finally:
        dep.stop_all()
    return dep, status, refused, nodes, marked_processes(dep.mark), why


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_three_tls_authenticated_supernodes_complete_two_fedcoe_rounds(tls_run):
    dep, status, _, nodes, leftovers, why = tls_run
    assert status == "finished:completed" and run_status(dep.results_dir) == "finished", why
    lines = metrics_lines(dep.results_dir)
    assert [l["round"] for l in lines] == [1, 2], why
    for line in lines:
        for key in ("global_accuracy", "personalized_accuracy", "coldstart_accuracy"):
            assert isinstance(line[key], float) and 0.0 <= line[key] <= 1.0, (key, line)
    assert [r["replies"] for r in round_lines(dep.results_dir)] == [2, 2]  # both training sites, every round
    assert "Starting Fleet API (gRPC-rere) on 127.0.0.1:" in dep.superlink.log.read_text()  # loopback only, gRPC
    # Flower's view: exactly the three registered keys, all online; the unregistered key never got in
    assert set(nodes) == set(dep.node_ids.values()), nodes
    assert all(n["status"] == "online" for n in nodes.values()), nodes
    assert dep.database.is_file() and dep.database.stat().st_size > 0  # the SuperLink's state is on disk
    assert leftovers == [], "every process the deployment started must be gone"
    dep.report(status)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_supernode_with_unregistered_key_is_refused_and_run_completes(tls_run):
    dep, status, refused, _, _, why = tls_run
    (index, code), = refused.items()
    log = node_log(dep, index)
    assert code not in (None, 0), "the unregistered SuperNode must exit with an error"
    assert "Exit Code: 305" in log and "Failed to activate SuperNode" in log
    assert "No SuperNode found with the given public key" in dep.superlink.log.read_text()
    assert status == "finished:completed" and run_status(dep.results_dir) == "finished", why
    assert "[fedcoe] 3 nodes" in "\n".join(dep.run_lines)  # the run went on with the registered three


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_restarted_supernode_gets_its_private_state_back(tmp_path, certs):
    """Site 0 is stopped (SIGTERM) and started again between round 1 and round 2. Its first use
    of the private parts after the restart must come from its state-dir with exactly the values
    it saved in round 1 (CRC-32 over the tensors, computed here from the file before the restart)."""
    dep = start_deployment(tmp_path, certs, "restart")
    try:
        dep.start_run()
        state_file, journal = state_paths(dep.state_dir(0), "restart", "site-0")
        # round 1 evaluated: every site, site 0 included, has sent its evaluate reply
        dep.wait_until(lambda: len(metrics_lines(dep.results_dir)) >= 1, "round 1's evaluation", 400)
        saved = torch.load(state_file, weights_only=True)
        before = state_checksum(saved["private"])
        assert saved["round"] == 1 and saved["crc"] == before
        old_pid, node_id = dep.nodes[0].pid, dep.node_ids[0]
        away = dep.restart_supernode(0)  # returns once Flower lists node_id online again
        assert dep.nodes[0].pid != old_pid
        status = dep.wait_run(timeout=600)
        nodes = dep.node_status()
        why = diagnosis(dep)
    finally:
        dep.stop_all()
    assert status == "finished:completed" and run_status(dep.results_dir) == "finished", why
    assert [l["round"] for l in metrics_lines(dep.results_dir)] == [1, 2]
    events = json.loads(journal.read_text())
    after = [e for e in events if e["time"] > saved_time(events, 1)]
    first = after[0]
    assert first["source"] == "state-dir", events  # the restarted SuperNode had an empty context.state
    assert first["crc_in"] == before, events  # ... and got exactly the saved private parts back
    assert all(e["source"] == "context" for e in after[1:]), events
    # node auth keeps the node id across the restart: the same three ids, no new one
    assert set(nodes) == set(dep.node_ids.values()) and nodes[node_id]["status"] == "online", nodes
    assert marked_processes(dep.mark) == []
    dep.report(status, {"restart_away_s": round(away, 2), "journal_site0": events})


def saved_time(events: list[dict], server_round: int) -> float:
    """Time of the last event of ``server_round`` (the restart came after it)."""
    return max(e["time"] for e in events if e["round"] == server_round)


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_supernode_killed_mid_round_is_left_out_and_run_completes(tmp_path, certs):
    """Site 1's SuperNode (with its SuperExec and ClientApp: its whole process group) gets
    SIGKILL as soon as round 1's train message reaches it. The SuperLink reports the node
    dead after missed heartbeats (about a minute); the round aggregates site 0 alone, logs
    site 1 as failed, and the run finishes its 2 rounds."""
    import signal

    dep = start_deployment(tmp_path, certs, "kill")
    try:
        dep.start_run()
        wait_for_node_log(dep, 1, "Receiving: train message", 1, 300)
        os.killpg(os.getpgid(dep.nodes[1].pid), signal.SIGKILL)
        killed_at = time.time()
        status = dep.wait_run(timeout=600)
        nodes = dep.node_status()
        why = diagnosis(dep)
    finally:
        dep.stop_all()
    assert status == "finished:completed" and run_status(dep.results_dir) == "finished", why
    assert [l["round"] for l in metrics_lines(dep.results_dir)] == [1, 2]
    rounds = round_lines(dep.results_dir)
    assert rounds[0]["replies"] == 1 and rounds[0]["failed"] == [1], rounds[0]  # site 1 left out, logged
    assert rounds[1]["replies"] == 1, rounds[1]  # the dead node is no longer sampled
    assert "failed or timed out; left out" in "\n".join(dep.run_lines), why
    assert nodes[dep.node_ids[1]]["status"] == "offline", nodes  # and Flower lists it offline
    assert marked_processes(dep.mark) == [], "every process the deployment started must be gone"
    from datetime import datetime, timezone

    detected = rounds[0]["aggregated_at"] - killed_at
    offline = datetime.strptime(nodes[dep.node_ids[1]]["offline-at"], "%Y-%m-%d %H:%M:%SZ")
    listed = offline.replace(tzinfo=timezone.utc).timestamp() - killed_at
    print(f"measured: SuperNode SIGKILL to round 1 aggregated without it: {detected:.1f}s; "
          f"to `flwr supernode list` offline-at: {listed:.0f}s")
    dep.report(status, {"killed_after_run_start_s": round(killed_at - dep.timings["run_started"], 2),
                        "kill_to_detection_s": round(detected, 2), "kill_to_offline_listed_s": round(listed)})


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_superlink_killed_mid_round_comes_back_from_its_database_and_the_run_resumes(tmp_path, certs):
    """Two training SuperNodes, 2 rounds. Once round 2's train message has reached site 0, the
    SuperLink and everything under it (its SuperExec, the ServerApp) get SIGKILL at once, as in
    a crash of its host. The SuperLink is started again with the same ``--database``, and
    ``flwr run ... resume=true`` continues from the round-1 checkpoint. The SuperNodes are
    never touched: they reconnect by themselves, under the node ids they were registered with."""
    dep = start_deployment(tmp_path, certs, "relink", num_nodes=2, num_coldstart=0)
    try:
        registered, pids = dict(dep.node_ids), {i: p.pid for i, p in dep.nodes.items()}
        dep.start_run()
        wait_for_node_log(dep, 0, "Receiving: train message", 2, 400)  # round 2 is under way
        dep.kill_superlink()
        assert [r["round"] for r in round_lines(dep.results_dir)] == [1]  # round 2 was never aggregated
        restarted_at = time.time()
        dep.start_superlink()
        dep.start_run(resume=True)
        status = dep.wait_run(timeout=600)
        nodes = dep.node_status()
        alive = {i: p.alive() for i, p in dep.nodes.items()}
        why = diagnosis(dep)
    finally:
        dep.stop_all()
    assert status == "finished:completed" and run_status(dep.results_dir) == "finished", why
    rounds = round_lines(dep.results_dir)
    assert [r["round"] for r in rounds] == [1, 2], rounds  # every round exactly once
    assert [m["round"] for m in metrics_lines(dep.results_dir)] == [1, 2]  # every evaluation exactly once
    assert rounds[1]["replies"] == 2, rounds[1]  # both sites came back and trained the resumed round
    assert all(alive.values()) and {i: p.pid for i, p in dep.nodes.items()} == pids  # never restarted
    # no re-registration: Flower lists exactly the ids given at registration, online
    assert set(nodes) == set(registered.values()) and all(n["status"] == "online" for n in nodes.values()), nodes
    recovered = rounds[1]["aggregated_at"] - restarted_at
    print(f"measured: SuperLink restart to the first round finished: {recovered:.1f}s")
    dep.report(status, {"restart_to_first_round_s": round(recovered, 2)})
