"""A run's folder: an earlier run of the same name is moved aside, a live one is never touched."""

from __future__ import annotations

import subprocess
import sys

import pytest

from fedcoe_flwr.server.run_dir import LOCK_FILE, RunDirectory, RunInUseError


def test_a_finished_run_of_the_same_name_is_moved_aside(make_cfg):
    cfg = make_cfg(run_name="same")
    first = RunDirectory(cfg)
    (first.path / "metrics.jsonl").write_text("{}\n")
    first.release()
    second = RunDirectory(cfg)
    assert second.previous_run is not None and (second.previous_run / "metrics.jsonl").is_file()
    assert second.path == first.path and not (second.path / "metrics.jsonl").exists()


@pytest.mark.parametrize("resume", [False, True])
def test_a_live_run_of_the_same_name_is_refused_and_left_alone(make_cfg, resume):
    cfg = make_cfg(run_name="same")
    live = RunDirectory(cfg)
    (live.path / "metrics.jsonl").write_text("{}\n")
    with pytest.raises(RunInUseError, match="run 'same' .* in use by a live run .*process"):
        RunDirectory(cfg.replace(resume=resume))
    assert (live.path / "metrics.jsonl").is_file()
    assert [p.name for p in live.path.parent.iterdir()] == ["same"]  # nothing moved aside
    live.release()
    RunDirectory(cfg.replace(resume=resume)).release()  # free once it has ended


def test_a_run_held_by_another_process_is_refused_until_that_process_ends(make_cfg):
    cfg = make_cfg(run_name="other")
    RunDirectory(cfg).release()
    folder = RunDirectory(cfg)
    folder.release()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, sys, time; f = open(sys.argv[1], 'a+'); "
         "fcntl.flock(f, fcntl.LOCK_EX); print('held', flush=True); time.sleep(60)", str(folder.path / LOCK_FILE)],
        stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunInUseError):
            RunDirectory(cfg)
    finally:
        holder.kill()  # our own child, by its handle
        holder.wait()
    assert RunDirectory(cfg).previous_run is not None  # a dead holder's lock is gone with it
