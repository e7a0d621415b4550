"""The compose deployment end to end (scripts/compose_e2e.sh) where a Docker engine answers;
skipped with the reason elsewhere."""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import pytest
from harness import REPO_ROOT as ROOT
from harness import compose_tools

SCRIPT = ROOT / "scripts" / "compose_e2e.sh"


# ------------------------------------------------------------------ the real thing
def engine_missing() -> str | None:
    """Why scripts/compose_e2e.sh cannot run here, or None."""
    if not shutil.which("docker"):
        return "no docker command"
    try:
        info = subprocess.run(["docker", "info"], capture_output=True, text=True, timeout=30)
    except subprocess.TimeoutExpired:
        return "docker info did not answer within 30 s"
    if info.returncode != 0:
        return "no Docker engine answers: " + " ".join((info.stderr or info.stdout).split())[:200]
    tools, broken = compose_tools()
    if not tools:
        return "; ".join(broken) or "neither docker-compose nor the docker compose plugin is installed"
    images = subprocess.run(["docker", "image", "ls", "-q", "fedcoe-standin/debian-python"], capture_output=True,
                            text=True).stdout.strip()
    if not images and (os.geteuid() != 0 or not shutil.which("debootstrap")):
        return "the Debian base image is not built and building it needs root and debootstrap"
    return None


def test_compose_deployment_end_to_end():
    reason = engine_missing()
    if reason:
        pytest.skip(reason)
    env = {**os.environ, "PYTHON": sys.executable}
    out = subprocess.run(["bash", str(SCRIPT)], cwd=ROOT, capture_output=True, text=True, env=env, timeout=3600)
    log = out.stdout + out.stderr
    assert out.returncode == 0, log[-6000:]
    assert "PASS:" in log and "back online" in log, log[-6000:]
    project = re.search(r"compose project (\S+),", log).group(1)
    assert f"no containers, networks or volumes of {project} left" in log
    label = f"label=com.docker.compose.project={project}"
    for kind in (["ps", "-a"], ["network", "ls"], ["volume", "ls"]):
        left = subprocess.run(["docker", *kind, "-q", "--filter", label], capture_output=True, text=True).stdout
        assert left.strip() == "", f"docker {' '.join(kind)}: {left}"
