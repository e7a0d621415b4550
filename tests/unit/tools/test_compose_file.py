"""docker-compose.yml: image names from variables defaulting to the official images, TLS, node
authentication and SQLite state on a volume, each site's key, data and state, volume owners."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path
import flwr
import pytest
import yaml
from harness import REPO_ROOT as ROOT, compose_tools, system_tool_env
COMPOSE_FILE = ROOT / "docker-compose.yml"


def default_of(value: str) -> str:
    """'${VAR:-default}' -> 'default' (compose interpolation with nothing set); other text unchanged."""
    return re.sub(r"\$\{[A-Z0-9_]+:-([^}]*)\}", r"\1", value)


def variable_of(value: str) -> str | None:
    match = re.fullmatch(r"\$\{([A-Z0-9_]+):-[^}]*\}", value)
    return match.group(1) if match else None


@pytest.fixture(scope="module")
def compose() -> dict:
    return yaml.safe_load(COMPOSE_FILE.read_text())


def test_images_are_variables_whose_defaults_are_the_official_images(compose):
    services, version = compose["services"], flwr.__version__
    assert version.startswith("1.39")
    assert variable_of(services["superlink"]["image"]) == "SUPERLINK_IMAGE"
    assert default_of(services["superlink"]["image"]) == f"flwr/superlink:{version}"
    for i in range(3):
        node = services[f"supernode-{i}"]
        assert variable_of(node["image"]) == "SUPERNODE_IMAGE"
        assert default_of(node["image"]) == f"flwr/supernode:{version}"
        app = services[f"superexec-clientapp-{i}"]
        assert variable_of(app["image"]) == "SUPEREXEC_IMAGE"
        assert default_of(app["build"]["args"]["BASE_IMAGE"]) == f"flwr/superexec:{version}"
    dockerfile = (ROOT / services["superexec-serverapp"]["build"]["dockerfile"]).read_text()
    assert f"ARG BASE_IMAGE=flwr/superexec:{version}" in dockerfile and "FROM ${BASE_IMAGE}" in dockerfile
    for k in ("superlink", "supernode"):
        assert f"flwr/{k}:{version}" in (ROOT / "docs" / "DEPLOYMENT.md").read_text()


def test_superlink_runs_tls_node_auth_and_sqlite_state_on_a_volume(compose):
    services = compose["services"]
    link = services["superlink"]
    cmd = link["command"]
    assert "--enable-supernode-auth" in cmd and not any(a == "--insecure" for a in cmd)
    assert "--fleet-api-address=0.0.0.0:9092" in cmd and "--port=8000" in cmd
    assert {"ca_crt", "server_pem", "server_key"} <= set(link["secrets"])
    database = next(a.split("=", 1)[1] for a in cmd if a.startswith("--database="))
    mounts = {v.split(":")[1]: v.split(":")[0] for v in link["volumes"]}
    state_dir = str(Path(database).parent)
    assert mounts.get(state_dir) in compose["volumes"], f"{database} is not on a named volume"
    ports = [default_of(p) for p in link["ports"]]
    assert {p.split(":", 1)[1] for p in ports} == {"8000:8000", "9092:9092"}


def test_each_site_has_its_key_node_config_data_and_state_volume(compose):
    services = compose["services"]
    nodes = {k: v for k, v in services.items() if k.startswith("supernode-")}
    assert len(nodes) == 3
    ids = set()
    for name, node in nodes.items():
        i = name.split("-")[1]
        cmd = node["command"]
        assert "--superlink=superlink:9092" in cmd and "--root-certificates=/run/secrets/ca_crt" in cmd
        assert f"--auth-supernode-private-key=/run/secrets/site_{i}_key" in cmd
        node_config = next(a for a in cmd if a.startswith("--node-config="))
        assert 'data-dir="/data/site"' in node_config and 'state-dir="/state"' in node_config
        ids.add(re.search(r"site-id=(\d+)( cold-start=true)?", node_config).groups())
        for variant in (f"superexec-clientapp-{i}", f"superexec-clientapp-{i}-gpu"):
            app = services[variant]
            assert f"--runtime-api-address=supernode-{i}:9094" in app["command"]
            data = [v for v in app["volumes"] if v.endswith(":/data/site:ro")]
            assert len(data) == 1 and any(v == f"site-{i}-state:/state" for v in app["volumes"])
        gpu = services[f"superexec-clientapp-{i}-gpu"]
        assert gpu["profiles"] == ["gpu"] and services[f"superexec-clientapp-{i}"]["profiles"] == ["cpu"]
        assert gpu["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]
    assert ids == {("0", None), ("1", None), ("0", " cold-start=true")}
    data_dirs = [next(v for v in services[f"superexec-clientapp-{i}"]["volumes"] if "/data/site" in v) for i in "012"]
    assert len(set(data_dirs)) == 3  # each site its own data folder
    secrets = {k: default_of(v["file"]) for k, v in compose["secrets"].items()}
    assert secrets["ca_crt"] == "./certs/ca.crt" and secrets["site_2_key"] == "./certs/keys/site-2"


def test_every_named_volume_is_handed_to_the_image_user_before_use(compose):
    """Fresh named volumes belong to root and the images run as uid 49999: the one-shot
    volume-owner service must chown each, and every service mounting one must wait for it."""
    owner = compose["services"]["volume-owner"]
    assert owner["user"] == "0" and owner["entrypoint"][:2] == ["chown", "49999:49999"]
    owned = {v.split(":")[0] for v in owner["volumes"]}
    assert owned == set(compose["volumes"])
    assert {v.split(":")[1] for v in owner["volumes"]} == set(owner["entrypoint"][2:])
    for name, service in compose["services"].items():
        named = [v for v in service.get("volumes", []) if v.split(":")[0] in compose["volumes"]]
        if named and name != "volume-owner":
            assert service["depends_on"]["volume-owner"] == {"condition": "service_completed_successfully"}, name


def test_the_installed_compose_tools_accept_the_file(tmp_path):
    tools, broken = compose_tools()
    if not tools:
        pytest.skip("; ".join(broken) or "neither docker-compose nor the docker compose plugin is installed")
    env = system_tool_env({"FEDCOE_CERTS_DIR": str(tmp_path), "SUPERLINK_IMAGE": "stand-in/superlink:x"})
    for tool in tools:
        out = subprocess.run([*tool, "-f", str(COMPOSE_FILE), "--profile", "cpu", "--profile", "gpu", "config"],
                             capture_output=True, text=True, env=env, timeout=60)
        assert out.returncode == 0, f"{' '.join(tool)} config: {out.stderr}"
        resolved = yaml.safe_load(out.stdout)
        assert resolved["services"]["superlink"]["image"] == "stand-in/superlink:x"
        assert resolved["services"]["supernode-0"]["image"] == f"flwr/supernode:{flwr.__version__}"
        assert str(tmp_path / "keys" / "site-0") in str(resolved["secrets"]["site_0_key"])
