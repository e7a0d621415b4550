"""A server stopped by SIGTERM (an operator's kill, a container stop) writes an
'interrupted' summary naming the signal and its last finished round, keeps its checkpoint,
and leaves the process's SIGTERM handler as it found it."""

from __future__ import annotations

import json
import os
import signal

import pytest
from harness import InProcessGrid

from fedcoe_flwr.server.loop import RoundLoop, Terminated


class SigtermGrid(InProcessGrid):
    def send_and_receive(self, msgs, timeout=None):
        out = super().send_and_receive(msgs, timeout)
        if msgs and msgs[0].metadata.message_type == "train" and \
                int(msgs[0].content.config_records["config"]["server_round"]) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return out


def test_sigterm_ends_the_run_as_interrupted_with_its_checkpoint(make_cfg, tmp_path):
    cfg = make_cfg(algorithm="fedavg", model="cnn", num_rounds=3, eval_every=0, num_clients=2,
                   num_coldstart_clients=1, results_dir=str(tmp_path), run_name="term")
    grid = SigtermGrid({100 + p: {"partition-id": p, "num-partitions": 3} for p in range(3)})
    before = signal.getsignal(signal.SIGTERM)
    with pytest.raises(Terminated):
        RoundLoop(cfg).start(grid)
    assert signal.getsignal(signal.SIGTERM) is before
    summary = json.loads((tmp_path / "term" / "summary.json").read_text())
    assert summary["status"] == "interrupted" and summary["rounds_completed"] == 1
    assert summary["failure"]["last_finished_round"] == 1 and "signal" in summary["failure"]["error"]
    assert (tmp_path / "term" / "checkpoints" / "round-00001.pt").is_file()
