"""The comparison runner: method specs, the tables it writes, and one real (tiny) run."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from fedcoe_flwr.compare import (methods_from_file, parse_method, refuse_if_stale, seconds_per_round, stale_keys,
                                 table, variants_table)
from fedcoe_flwr.config import load_config


def fake_run(tmp_path: Path, name: str, final: dict, round_times: list[float], bytes_down=4e6, bytes_up=2e6):
    run = tmp_path / name
    run.mkdir()
    (run / "rounds.jsonl").write_text("".join(json.dumps({"round": i + 1, "time_s": t}) + "\n"
                                              for i, t in enumerate(round_times)))
    return {"final": final, "rounds_completed": len(round_times), "wall_time_s": 100.0, "run_dir": str(run),
            "communication": {"bytes_down": bytes_down, "bytes_up": bytes_up, "bytes_p2p_relayed": 0}}


def test_parse_method_variants():
    assert parse_method("fedavg") == ("fedavg", {"algorithm": "fedavg"})
    label, overrides = parse_method("fedcoe_top2:algorithm=fedcoe,top_m=2,shared_trunk=true")
    assert label == "fedcoe_top2" and overrides == {"algorithm": "fedcoe", "top_m": 2, "shared_trunk": True}
    with pytest.raises(SystemExit, match="unknown method 'fedfoo'"):
        parse_method("fedfoo")


def test_table_mean_std_bytes_and_seconds_per_round(tmp_path):
    runs = [fake_run(tmp_path, "a0", {"global_accuracy": 0.4, "personalized_accuracy": 0.6,
                                      "coldstart_accuracy": 0.2, "global_accuracy_source": "global model"},
                     [2.0, 4.0]),
            fake_run(tmp_path, "a1", {"global_accuracy": 0.5, "personalized_accuracy": 0.8,
                                      "coldstart_accuracy": 0.3}, [3.0, 3.0])]
    assert seconds_per_round(runs[0]) == pytest.approx(3.0)
    text = table([("m", runs)], num_clients=2)
    row = text.splitlines()[2]
    cells = [c.strip() for c in row.strip("|").split("|")]
    # mean ± population std over seeds, bytes per client per round: (4 + 2) MB / 2 rounds / 2 clients
    assert cells == ["m", "45.00 ± 5.00", "70.00 ± 10.00", "25.00 ± 5.00", "1.500", "0.000", "3.0", "100", "2",
                     "global model"]


def test_variants_table_lists_every_variant(tmp_path):
    runs = [fake_run(tmp_path, "c0", {"coldstart_accuracy_plain": 0.2, "coldstart_accuracy_em": 0.4,
                                      "global_accuracy_raw": 0.5, "global_accuracy_source": "global model"}, [1.0])]
    other = [fake_run(tmp_path, "f0", {"coldstart_accuracy": 0.3}, [1.0])]
    text = variants_table([("fedcoe", runs), ("fedavg", other)])
    assert text.splitlines()[0] == "| method | coldstart em | coldstart plain | global raw |"
    assert "| fedcoe | 40.00 ± 0.00 | 20.00 ± 0.00 | 50.00 ± 0.00 |" in text and "fedavg" not in text
    assert variants_table([("fedavg", other)]) == ""


def test_a_run_finished_under_other_defaults_is_not_reused(tmp_path):
    config = "configs/compare_cifar10_dir0.1.yaml"
    ran = load_config(config, {"algorithm": "fedcoe", "seed": 1}).to_dict()
    summary = {"config": {**ran, "run_name": "elsewhere", "results_dir": "/x"}, "run_dir": str(tmp_path / "r-s1")}
    assert stale_keys(summary, config, {"algorithm": "fedcoe"}, 1) == []  # bookkeeping keys do not count
    summary["config"]["aux_weight"] = 1.0  # finished under an older default
    assert stale_keys(summary, config, {"algorithm": "fedcoe"}, 1) == [("aux_weight", 1.0, ran["aux_weight"])]
    with pytest.raises(SystemExit, match=r"r-s1 finished under a different config \(aux_weight: ran 1.0"):
        refuse_if_stale(summary, config, {"algorithm": "fedcoe"}, 1)
    assert stale_keys(summary, config, {"algorithm": "fedcoe", "aux_weight": 1.0}, 1) == []
    del summary["config"]["gate_input"]  # written before the key existed: it ran the gate over the image
    assert [k for k, *_ in stale_keys(summary, config, {"algorithm": "fedcoe", "aux_weight": 1.0}, 1)] == ["gate_input"]
    # FedCoE's own keys do not make a FedAvg run stale; a key FedAvg reads does
    fedavg = {"config": {**load_config(config, {"algorithm": "fedavg", "seed": 1}).to_dict(), "aux_weight": 0.0},
              "run_dir": "r"}
    assert stale_keys(fedavg, config, {"algorithm": "fedavg"}, 1) == []
    fedavg["config"]["lr"] = 0.1
    assert stale_keys(fedavg, config, {"algorithm": "fedavg"}, 1) == [("lr", 0.1, 0.01)]


def test_methods_file(tmp_path):
    good = tmp_path / "m.yaml"
    good.write_text("methods:\n  - fedavg\n  - fedcoe_top2:algorithm=fedcoe,top_m=2\n")
    assert methods_from_file(str(good)) == ["fedavg", "fedcoe_top2:algorithm=fedcoe,top_m=2"]
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: fedavg\n")
    with pytest.raises(SystemExit, match="must hold 'methods:'"):
        methods_from_file(str(bad))
    for path in sorted(Path("configs/methods").glob("*.yaml")):  # every shipped method list is valid
        for spec in methods_from_file(str(path)):
            _, overrides = parse_method(spec)
            load_config("configs/compare_cifar10_dir0.1.yaml", overrides)


@pytest.mark.slow
def test_compare_runs_skips_and_writes_the_table(tmp_path):
    cmd = [sys.executable, "-m", "fedcoe_flwr.compare", "--config", "configs/smoke.yaml", "--seeds", "0",
           "--methods", "fedavg", "--set", "num_rounds=1", "--results-dir", str(tmp_path)]
    first = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    summary = json.loads((tmp_path / "smoke-fedavg-s0" / "summary.json").read_text())
    assert summary["status"] == "finished"
    md = (tmp_path / "compare-smoke" / "comparison.md").read_text()
    acc = 100 * summary["final"]["global_accuracy"]
    assert f"| fedavg | {acc:.2f} ± 0.00 |" in md
    assert (tmp_path / "compare-smoke" / "curves.png").is_file()
    again = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert again.returncode == 0 and "finished earlier, skipped" in again.stdout
    # --report-only runs nothing: a method never run is left out of the table
    report = subprocess.run(cmd[:cmd.index("fedavg")] + ["fedavg", "fedprox"] + cmd[cmd.index("fedavg") + 1:]
                            + ["--report-only"], capture_output=True, text=True, timeout=600)
    assert report.returncode == 0 and "running" not in report.stdout
    md = (tmp_path / "compare-smoke" / "comparison.md").read_text()
    assert "| fedavg |" in md and "| fedprox |" not in md
    assert not (tmp_path / "smoke-fedprox-s0").exists()
