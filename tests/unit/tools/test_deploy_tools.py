"""The deployment tools: certificates and node keys, tools/ neither installed nor in the FAB,
no process killed by name anywhere in the repository."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from harness import REPO_ROOT as ROOT
from tools.deploy.flower import FlowerCli, flower_env


# ------------------------------------------------------------------ certificates (compose: tests/unit/tools/test_compose_file.py)
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
def test_the_fab_holds_the_app_and_its_configs_and_no_tools_docs_or_tests(tmp_path):
    """tools/ runs beside the app: pip does not install it and `flwr build` (the same FAB
    `flwr run` sends to every SuperNode) leaves it out, with the docs, tests, benchmarks and
    scripts, while the app's packages and configs go in."""
    import tomllib

    from setuptools import find_packages

    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    packages = find_packages(ROOT, include=pyproject["tool"]["setuptools"]["packages"]["find"]["include"])
    assert "fedcoe_flwr" in packages and "server_app" in packages
    assert not [p for p in packages if p == "tools" or p.startswith("tools.")], packages
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "home"), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1"}
    import zipfile

    fab = FlowerCli("unused", env, tmp_path).build(ROOT, tmp_path / "fab")
    names = zipfile.ZipFile(fab).namelist()
    assert "fedcoe_flwr/client/handlers.py" in names and "server_app/app.py" in names and "client_app/app.py" in names
    assert "configs/default.yaml" in names and "configs/smoke.yaml" in names  # the run config names them
    assert not [n for n in names if n.split("/")[0] in ("tools", "docs", "tests", "benchmarks", "scripts")], names
    assert os.path.getsize(fab) < 1_000_000, os.path.getsize(fab)  # what every SuperNode pulls on each run


def test_runs_are_sent_from_a_folder_that_builds_the_same_fab(tmp_path):
    """`flwr run` walks every file under the app folder (a virtual environment in the checkout
    too) before it filters them: the deployment sends the run from a folder of the FAB's files
    only, and uses it only when Flower builds the very same FAB (hash) from it. Checked on a
    small copy of the app with this pyproject (its fab-exclude patterns) and an ignored venv."""

    app = tmp_path / "app"
    for name in ("pyproject.toml", ".gitignore", "README.md", "server_app/__init__.py", "server_app/app.py",
                 "client_app/__init__.py", "client_app/app.py", "configs/smoke.yaml", "docker-compose.yml"):
        (app / name).parent.mkdir(parents=True, exist_ok=True)
        (app / name).write_bytes((ROOT / name).read_bytes())
    for name in ("tools/deploy/x.py", "docs/x.md", "tests/x.py", "benchmarks/x.py", "scripts/x.py", ".venv/lib/x.py"):
        (app / name).parent.mkdir(parents=True, exist_ok=True)
        (app / name).write_text("# not in the FAB\n")
    env = {**os.environ, "FLWR_HOME": str(tmp_path / "home"), "FLWR_TELEMETRY_ENABLED": "0",
           "FLWR_DISABLE_UPDATE_CHECK": "1"}
    cli = FlowerCli("unused", env, tmp_path)
    folder = cli.app_folder(app)
    assert folder != app.resolve() and (folder / "server_app" / "app.py").is_file()
    assert not (folder / ".venv").exists() and not (folder / "docs" / "x.md").exists()
    assert cli.build(folder, tmp_path / "a").name == cli.build(app, tmp_path / "b").name
    assert cli.app_folder(app) == folder  # once per process


def test_flower_executables_are_those_beside_the_interpreter_activated_or_not(tmp_path):
    other = tmp_path / "other-install"
    other.mkdir()
    (other / "flwr").write_text("#!/bin/sh\necho other\n")
    (other / "flwr").chmod(0o755)
    scripts = str(Path(sys.executable).parent)
    env = flower_env({"PATH": os.pathsep.join([str(other), "/usr/bin", "/bin"])})  # not activated
    assert env["PATH"].split(os.pathsep) == [scripts, str(other), "/usr/bin", "/bin"]
    assert flower_env(env) == env
    version = subprocess.run(["flwr", "--version"], env=env, capture_output=True, text=True, timeout=60)
    assert version.returncode == 0 and "1.39" in version.stdout, version.stdout + version.stderr


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


# ------------------------------------------------------------------ ports
def test_free_port_is_bindable_and_outside_the_ephemeral_range():
    """Outgoing connections take ephemeral ports; a server port from that range can be taken
    between choosing it and the server binding it (a SuperNode failed so, 'address in use')."""
    import socket

    from tools.deploy.processes import _ephemeral_ports, free_port

    ephemeral = _ephemeral_ports()
    if ephemeral.start < 11000:
        pytest.skip(f"this kernel's ephemeral range starts at {ephemeral.start}: no room below it")
    ports = {free_port() for _ in range(20)}
    assert len(ports) > 1
    for port in ports:
        assert port not in ephemeral, (port, ephemeral)
        with socket.socket() as s:
            s.bind(("127.0.0.1", port))
