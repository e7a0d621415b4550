"""Test doubles for the Flower glue: a node Context and a Grid whose nodes are the
ClientApp's handlers in this process (one Context per node, like a SuperNode)."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import torch
from PIL import Image
from flwr.app import Context, Message, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedcoe_flwr.client import handlers
from fedcoe_flwr.client.onboarding import handle_onboard
from fedcoe_flwr.records import ARRAYS, CONFIG, EXPERIMENT, config_record, experiment_record, to_array_record

REPO_ROOT = Path(__file__).resolve().parents[1]
# the tiny generated data set every fast test starts from: small enough that a FedCoE
# local epoch takes well under a second on one CPU core
TINY = dict(
    dataset="synthetic",
    synthetic_train_size=240,
    synthetic_test_size=60,
    synthetic_num_classes=4,
    image_size=16,
    num_clients=3,
    num_coldstart_clients=1,
    partition="iid",
    min_partition_size=5,
    model="resnet_moe",
    resnet_depth=8,
    resnet_width=4,
    inner_experts=2,
    inner_top_k=1,
    gate_width=4,
    num_experts=3,
    local_epochs=1,
    batch_size=16,
    eval_batch_size=64,
    lr=0.05,
)


def context(node_config: dict, node_id: int = 11, run_id: int = 7) -> Context:
    return Context(run_id=run_id, node_id=node_id, node_config=node_config, state=RecordDict(), run_config={})


class InProcessGrid:
    """``fail_on``: (message type, round) whose exchange raises after the nodes handled it
    (a server that dies mid-round, after the clients trained)."""

    def __init__(self, nodes: dict[int, dict], run_id: int = 7, fail_on: tuple[str, int] | None = None):
        self.contexts = {n: context(nc, node_id=n, run_id=run_id) for n, nc in nodes.items()}
        self.sent: list[Message] = []
        self.replies: list[Message] = []
        self.fail_on = fail_on

    def get_node_ids(self):
        return list(self.contexts)

    def send_and_receive(self, msgs, timeout=None):
        route = {"query.profile": handlers.handle_profile, "query.onboard": handle_onboard,
                 "train": handlers.handle_train, "evaluate": handlers.handle_evaluate,
                 "evaluate.coldstart": handlers.handle_coldstart, "evaluate.prior": handlers.handle_prior}
        out = []
        for msg in msgs:
            self.sent.append(msg)
            node = msg.metadata.dst_node_id
            TaskIdentity.node_id = node
            reply = route[msg.metadata.message_type](msg, self.contexts[node])
            out.append(reply)
            self.replies.append(reply)
        if self.fail_on and msgs and msgs[0].metadata.message_type == self.fail_on[0] and \
                int(msgs[0].content.config_records["config"]["server_round"]) == self.fail_on[1]:
            raise ConnectionError(f"the server died during {self.fail_on[0]} of round {self.fail_on[1]}")
        return out


def clone(arrays: dict) -> dict:
    return {k: v.clone() for k, v in arrays.items()}


def assert_same(a: dict, b: dict) -> None:
    """Two state dicts with the same keys, dtypes and values."""
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        assert torch.equal(a[k], b[k]), k


def message(cfg, message_type: str, arrays: dict, config: dict, node_id: int = 11) -> Message:
    """A server message as the round loop builds it: payload, its config, the experiment."""
    content = RecordDict({ARRAYS: to_array_record(arrays), CONFIG: config_record(config),
                          EXPERIMENT: experiment_record(cfg)})
    return Message(content=content, dst_node_id=node_id, message_type=message_type)


def system_tool_env(extra: dict | None = None) -> dict:
    """This process's environment without the virtual environment's Python settings: Debian's
    docker-compose is a Python program that must import the system's packages, not ours."""
    venv_bin = str(Path(os.environ.get("VIRTUAL_ENV", "/nonexistent")) / "bin")
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
    env["PATH"] = os.pathsep.join(p for p in env.get("PATH", "").split(os.pathsep) if p != venv_bin)
    return {**env, **(extra or {})}


def compose_tools() -> tuple[list[list[str]], list[str]]:
    """The compose commands this machine has that run (Debian's docker-compose, the docker compose
    plugin), and why each installed one that does not run was left out."""
    tools, broken = [], []
    for tool in (["docker-compose"], ["docker", "compose"]):
        if not shutil.which(tool[0]):
            continue
        probe = subprocess.run([*tool, "version"], capture_output=True, text=True, env=system_tool_env(), timeout=60)
        if probe.returncode == 0:
            tools.append(tool)
        elif tool == ["docker-compose"]:  # `docker compose` failing only means the plugin is absent
            last = (probe.stderr or probe.stdout).strip().splitlines()[-1:] or ["no output"]
            broken.append(f"{' '.join(tool)} is installed but does not run ({last[0][:160]})")
    return tools, broken


# A distinct solid colour per class, far apart so JPEG/PNG round trips keep them apart.
COLOURS = {"ant": (250, 10, 10), "bee": (10, 250, 10), "cat": (10, 10, 250)}


def make_image_folder(root: Path, counts: dict | None = None, size: int = 10, suffix: str = ".png") -> Path:
    """root/{train,test}/<class>/<i><suffix>, each image a solid class colour."""
    counts = counts or {"train": {"ant": 4, "bee": 3, "cat": 5}, "test": {"ant": 2, "bee": 2, "cat": 1}}
    for split, per_class in counts.items():
        for cls, n in per_class.items():
            folder = root / split / cls
            folder.mkdir(parents=True, exist_ok=True)
            for i in range(n):
                Image.new("RGB", (size, size), COLOURS[cls]).save(folder / f"{i:03d}{suffix}")
    return root


def make_certs(out: Path, nodes: int) -> Path:
    """A CA, the SuperLink's certificate and ``nodes`` SuperNode keys (scripts/make_certs.sh)."""
    subprocess.run(["bash", str(REPO_ROOT / "scripts" / "make_certs.sh"), str(out), str(nodes)], check=True,
                   env={**os.environ, "CERT_RSA_BITS": "2048"}, capture_output=True, timeout=120)
    return out
