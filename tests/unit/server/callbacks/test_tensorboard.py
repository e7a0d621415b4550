"""TensorBoard event files of a run, read back with TensorBoard's own reader and checked against
metrics.jsonl and rounds.jsonl; a resumed run logs no round twice; summary.json's best round."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tensorboard.backend.event_processing.event_accumulator import HISTOGRAMS, EventAccumulator

from fedcoe_flwr.fileio import read_jsonl
from fedcoe_flwr.server.callbacks.summary import best_round
from fedcoe_flwr.server.callbacks.tensorboard import TB_DIR, accuracy_tag, evaluation_scalars, round_scalars
from fedcoe_flwr.server.loop import RoundLoop
from harness import InProcessGrid


def run(cfg) -> Path:
    """The run in this process, its nodes the real ClientApp handlers (3 training + 1 cold-start)."""
    grid = InProcessGrid({100 + i: {"partition-id": i, "num-partitions": cfg.num_partitions}
                          for i in range(cfg.num_partitions)})
    loop = RoundLoop(cfg)
    loop.start(grid)
    return loop.run_dir.path


def read_events(run_dir: Path) -> EventAccumulator:
    # every histogram, not a sample; purge_orphaned_data=False: a step written twice stays visible
    events = EventAccumulator(str(run_dir / TB_DIR), size_guidance={HISTOGRAMS: 0}, purge_orphaned_data=False)
    events.Reload()
    return events


def scalars(events: EventAccumulator, tag: str) -> dict[int, float]:
    found = events.Scalars(tag)
    steps = [e.step for e in found]
    assert len(steps) == len(set(steps)), f"{tag}: a step logged twice {steps}"
    return {e.step: e.value for e in found}


def check_against_jsonl(run_dir: Path, events: EventAccumulator) -> None:
    metrics, rounds = read_jsonl(run_dir / "metrics.jsonl"), read_jsonl(run_dir / "rounds.jsonl")
    evaluated = [m["round"] for m in metrics]
    # the headline tags by name, then every accuracy variant the records hold
    for tag, key in [("accuracy/global", "global_accuracy"), ("accuracy/personalised", "personalized_accuracy"),
                     ("accuracy/personalised_mean", "personalized_accuracy_mean"),
                     ("accuracy/personalised_p10", "personalized_accuracy_p10"),
                     ("accuracy/coldstart", "coldstart_accuracy"),
                     ("accuracy/global_balanced", "global_accuracy_balanced"),
                     ("accuracy/coldstart_plain", "coldstart_accuracy_plain")]:
        assert scalars(events, tag) == {m["round"]: pytest.approx(m[key], rel=1e-6) for m in metrics}, tag
    variants = {k for m in metrics for k in m if k.startswith("coldstart_accuracy_")}
    assert len(variants) >= 2  # FedCoE measures each cold-start adaptation
    for key in variants:
        assert scalars(events, accuracy_tag(key)) == {m["round"]: pytest.approx(m[key], rel=1e-6) for m in metrics}
    for m in metrics:  # every number of the evaluation record has its curve
        assert {t for t in evaluation_scalars(m)} <= set(events.Tags()["scalars"])
    assert scalars(events, "communication/bytes_down_total") == {m["round"]: m["bytes_down"] for m in metrics}
    assert scalars(events, "time/elapsed_s") == {m["round"]: pytest.approx(m["elapsed_s"], rel=1e-6)
                                                  for m in metrics}
    # one histogram of the clients' personalised accuracies per evaluation
    hist = {e.step: e.histogram_value for e in events.Histograms("accuracy/personalised_per_client")}
    assert sorted(hist) == evaluated
    for m in metrics:
        per_client = m["personalized_accuracy_per_client"]
        h = hist[m["round"]]
        assert h.num == len(per_client) == 3
        assert (h.min, h.max, h.sum) == pytest.approx((min(per_client), max(per_client), sum(per_client)))
    # per round: train loss, seconds, bytes, the method's diagnostics (one scalar per expert)
    assert scalars(events, "train/loss") == {r["round"]: pytest.approx(r["train_loss"], rel=1e-6) for r in rounds}
    assert scalars(events, "time/round_s") == {r["round"]: pytest.approx(r["time_s"], rel=1e-6) for r in rounds}
    assert scalars(events, "communication/train_bytes_down") == {r["round"]: r["train_bytes_down"] for r in rounds}
    ups = [r["bytes_up_total"] - (rounds[i - 1]["bytes_up_total"] if i else 0) for i, r in enumerate(rounds)]
    assert scalars(events, "communication/train_bytes_up") == {r["round"]: u for r, u in zip(rounds, ups)}
    assert all(u > 0 for u in ups)
    num_experts = len(rounds[0]["expert_usage"])
    for k in range(num_experts):
        assert scalars(events, f"diagnostics/expert_usage/{k}") == {
            r["round"]: pytest.approx(r["expert_usage"][k], rel=1e-6) for r in rounds}
    assert scalars(events, "diagnostics/expert_usage_entropy") == {
        r["round"]: pytest.approx(r["expert_usage_entropy"], rel=1e-6) for r in rounds}
    assert set(scalars(events, f"diagnostics/expert_global_accuracy/{num_experts - 1}")) == set(evaluated)


def test_tensorboard_events_match_the_metrics_files_and_a_resume_logs_no_round_twice(make_cfg, tmp_path,
                                                                                     fresh_caches):
    cfg = make_cfg(algorithm="fedcoe", num_rounds=2, eval_every=1, results_dir=str(tmp_path / "results"),
                   run_name="tb")
    run_dir = run(cfg)
    events = read_events(run_dir)
    check_against_jsonl(run_dir, events)
    assert sorted(scalars(events, "train/loss")) == [1, 2]

    # summary.json: the final evaluation and, per headline metric, the best one with its round
    summary = json.loads((run_dir / "summary.json").read_text())
    metrics = read_jsonl(run_dir / "metrics.jsonl")
    assert summary["final"] == metrics[-1]
    for key in ("global_accuracy", "personalized_accuracy", "coldstart_accuracy"):
        best = max(metrics, key=lambda m: m[key])
        assert summary["best"][key]["value"] == best[key]
        assert metrics[[m["round"] for m in metrics].index(summary["best"][key]["round"])][key] == best[key]

    # the run stopped after round 2's events but before its checkpoint: the resume reruns round 2
    # and must leave exactly one value per step, equal to the rewritten metrics files
    (run_dir / "checkpoints" / "round-00002.pt").unlink()
    (run_dir / "final_state.pt").unlink()
    run(cfg.replace(resume=True))
    events = read_events(run_dir)
    check_against_jsonl(run_dir, events)
    assert sorted(scalars(events, "train/loss")) == [1, 2]
    assert json.loads((run_dir / "summary.json").read_text())["segments"][-1]["from_round"] == 1


def test_best_round_takes_the_earliest_of_equal_values_and_skips_missing_ones():
    history = [{"round": 5, "global_accuracy": 0.4, "personalized_accuracy": 0.7, "coldstart_accuracy": None},
               {"round": 10, "global_accuracy": 0.5, "personalized_accuracy": 0.6, "coldstart_accuracy": None},
               {"round": 15, "global_accuracy": 0.5, "personalized_accuracy": 0.65}]
    assert best_round(history) == {"global_accuracy": {"value": 0.5, "round": 10},
                                   "personalized_accuracy": {"value": 0.7, "round": 5}}
    assert best_round([]) == {}


def test_tags_and_what_is_not_a_curve():
    assert accuracy_tag("global_accuracy") == "accuracy/global"
    assert accuracy_tag("personalized_accuracy_p10") == "accuracy/personalised_p10"
    assert accuracy_tag("coldstart_accuracy_adabn_em") == "accuracy/coldstart_adabn_em"
    record = {"round": 4, "global_accuracy": None, "global_accuracy_source": "global model",
              "personalized_accuracy": 0.5, "coldstart_routing_rows": [[0.5, 0.5]], "bytes_up": 10,
              "expert_global_accuracy": [0.2, 0.3], "mi_bits": 0.1, "elapsed_s": 3.0, "train_loss": 1.0}
    assert evaluation_scalars(record) == {"accuracy/personalised": 0.5, "communication/bytes_up_total": 10.0,
                                          "diagnostics/expert_global_accuracy/0": 0.2,
                                          "diagnostics/expert_global_accuracy/1": 0.3, "diagnostics/mi_bits": 0.1,
                                          "time/elapsed_s": 3.0}
    first = {"round": 1, "train_loss": 2.0, "replies": 3, "time_s": 1.5, "client_train_s": 1.0,
             "train_bytes_down": 100, "bytes_up_total": 40, "failed": [2], "errors": {}, "routing_load": [1, 0]}
    assert round_scalars({**first, "round": 2, "bytes_up_total": 90, "train_loss": float("nan")}, first) == {
        "train/replies": 3.0, "time/round_s": 1.5, "time/client_train_s": 1.0,
        "communication/train_bytes_down": 100.0, "communication/train_bytes_up": 50.0,
        "diagnostics/routing_load/0": 1.0, "diagnostics/routing_load/1": 0.0}
