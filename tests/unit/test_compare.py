from __future__ import annotations

import json
import shutil
from pathlib import Path
import pytest
from fedcoe_flwr import compare
from fedcoe_flwr.compare import (Progress, config_hash, finished, main, methods_from_file, parse_method,
                                 refuse_if_stale, run_dir, stale_keys)
from fedcoe_flwr.config import ConfigError, load_config
from fedcoe_flwr.report import (best_variant, label_free_variants, method_record, seconds_per_round, table, variants_table,
                                write_results_doc)
COMPARE_CONFIG = "configs/compare_cifar10_dir0.1.yaml"
WIDE = "fedcoe_wide:algorithm=fedcoe,width_multiplier=1.0,cnn_hidden=128"


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
    text = table({"m": method_record(runs, num_clients=2)})
    row = text.splitlines()[2]
    cells = [c.strip() for c in row.strip("|").split("|")]
    # mean ± population std over seeds, bytes per client per round: (4 + 2) MB / 2 rounds / 2 clients
    assert cells == ["m", "45.00 ± 5.00", "70.00 ± 10.00", "25.00 ± 5.00", "1.500", "0.000", "3.0", "100", "2",
                     "global model"]


def test_variants_table_lists_every_variant(tmp_path):
    runs = [fake_run(tmp_path, "c0", {"coldstart_accuracy_plain": 0.2, "coldstart_accuracy_em": 0.4,
                                      "global_accuracy_raw": 0.5, "global_accuracy_source": "global model"}, [1.0])]
    other = [fake_run(tmp_path, "f0", {"coldstart_accuracy": 0.3}, [1.0])]
    records = {"fedcoe": method_record(runs, 1), "fedavg": method_record(other, 1)}
    text = variants_table(records)
    assert text.splitlines()[0] == "| method | coldstart em | coldstart plain | global raw |"
    assert "| fedcoe | 40.00 ± 0.00 | 20.00 ± 0.00 | 50.00 ± 0.00 |" in text and "fedavg" not in text
    assert variants_table({"fedavg": records["fedavg"]}) == ""


def test_label_free_variants_read_from_the_metrics_keys():
    # the balanced global model, with the raw one beside it, and the other way round
    assert label_free_variants({"global_accuracy": 0.5, "global_accuracy_raw": 0.4}, "global_accuracy") == \
        {"none": 0.4, "balanced": 0.5}
    assert label_free_variants({"global_accuracy": 0.4, "global_accuracy_balanced": 0.5}, "global_accuracy") == \
        {"none": 0.4, "balanced": 0.5}
    # every cold-start adaptation; a configured one equal to none of them is its own variant
    cold = {"coldstart_accuracy": 0.6, "coldstart_accuracy_em": 0.6, "coldstart_accuracy_em_uniform": 0.5,
            "coldstart_accuracy_plain": 0.3}
    assert label_free_variants(cold, "coldstart_accuracy") == {"none": 0.3, "em": 0.6, "em_uniform": 0.5}
    assert label_free_variants({**cold, "coldstart_accuracy": 0.65}, "coldstart_accuracy")["configured"] == 0.65
    # personalised summary statistics are not variants; a method with none is unadapted
    assert label_free_variants({"personalized_accuracy": 0.7, "personalized_accuracy_p10": 0.5},
                               "personalized_accuracy") == {"none": 0.7}
    assert label_free_variants({"coldstart_accuracy": 0.2}, "coldstart_accuracy") == {"none": 0.2}


def test_the_headline_is_the_best_label_free_variant_over_the_seeds():
    seeds = [{"coldstart_accuracy": 0.3, "coldstart_accuracy_plain": 0.3, "coldstart_accuracy_em": 0.5,
              "coldstart_accuracy_adabn_em": 0.4},
             {"coldstart_accuracy": 0.3, "coldstart_accuracy_plain": 0.3, "coldstart_accuracy_em": 0.3,
              "coldstart_accuracy_adabn_em": 0.6}]
    # em: mean 0.40, adabn_em: mean 0.50; the unadapted figures beside it
    assert best_variant(seeds, "coldstart_accuracy") == ("adabn_em", [0.4, 0.6], [0.3, 0.3])
    # a tie goes to the simpler variant; nothing measured is unadapted and empty
    tie = [{"coldstart_accuracy": 0.3, "coldstart_accuracy_plain": 0.3, "coldstart_accuracy_em": 0.3}]
    assert best_variant(tie, "coldstart_accuracy")[0] == "none"
    assert best_variant([{}], "coldstart_accuracy") == ("none", [None], [None])


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


def test_a_calibration_reports_the_unadapted_model_also_at_the_top_level(tmp_path):
    """Published figures used no label-free adaptation, so a calibration quotes the raw model."""
    results, docs = tmp_path / "results", tmp_path / "docs"
    finished_run(results, "fedavg", 42, {"global_accuracy": 0.62, "global_accuracy_balanced": 0.63,
                                         "source": "global model"})
    assert main(["--config", COMPARE_CONFIG, "--seeds", "42", "--methods", "fedavg", "--results-dir", str(results),
                 "--report-only", "--kind", "calibration", "--name", "calibration_x", "--docs-dir", str(docs),
                 "--results-doc", str(tmp_path / "RESULTS.md")]) == 0
    doc = json.loads((docs / "calibration_x.json").read_text())
    assert doc["fedavg"]["global"] == {"mean": pytest.approx(62.0), "std": 0.0, "variant": "none"}
    assert doc["fedavg"]["raw"]["global"]["mean"] == pytest.approx(62.0) and doc["seeds"] == [42]
    assert doc["fedavg"]["variants"]["global_accuracy_balanced"]["mean"] == pytest.approx(63.0)  # still listed
    assert doc["methods"]["fedavg"] == doc["fedavg"] and doc["rounds"] == 20


def test_methods_file(tmp_path):
    good = tmp_path / "m.yaml"
    good.write_text("methods:\n  - fedavg\n  - fedcoe_top2:algorithm=fedcoe,top_m=2\n")
    assert methods_from_file(str(good)) == ["fedavg", "fedcoe_top2:algorithm=fedcoe,top_m=2"]
    pinned = tmp_path / "pinned.yaml"  # a file's 'set:' applies where a spec leaves the key alone
    pinned.write_text("set:\n  shared_expert_weight: 0\n  local_gate: false\n"
                      "methods:\n  - fedcoe\n  - mine:algorithm=fedcoe,shared_expert_weight=0.25\n")
    assert methods_from_file(str(pinned)) == [
        "fedcoe:shared_expert_weight=0,local_gate=false",
        "mine:algorithm=fedcoe,shared_expert_weight=0.25,local_gate=false"]
    assert parse_method(methods_from_file(str(pinned))[0])[1] == {
        "algorithm": "fedcoe", "shared_expert_weight": 0, "local_gate": False}
    (tmp_path / "pins.yaml").write_text("shared_expert_weight: 0\nlocal_gate: false\n")  # or from a file
    pinned.write_text("set: pins.yaml\nmethods:\n  - fedcoe\n")
    assert methods_from_file(str(pinned)) == ["fedcoe:shared_expert_weight=0,local_gate=false"]
    pinned.write_text("set: missing.yaml\nmethods:\n  - fedcoe\n")
    with pytest.raises(ConfigError, match="missing.yaml' not found"):
        methods_from_file(str(pinned))
    with pytest.raises(SystemExit, match="nowhere.yaml' not found"):
        methods_from_file(str(tmp_path / "nowhere.yaml"))
    bad = tmp_path / "bad.yaml"
    bad.write_text("method: fedavg\n")
    with pytest.raises(SystemExit, match="must hold 'methods:'"):
        methods_from_file(str(bad))
    for path in sorted(Path("configs/methods").glob("*.yaml")):  # every shipped method list is valid
        for spec in methods_from_file(str(path)):
            _, overrides = parse_method(spec)
            load_config("configs/compare_cifar10_dir0.1.yaml", overrides)


def finished_run(results: Path, spec: str, seed: int, final: dict, earlier: dict | None = None) -> dict:
    """A run as the simulation leaves it: summary.json (status finished, its config), metrics.jsonl
    (one line per evaluation: round 10 with half the final accuracies updated by ``earlier``, then
    round 20 equal to the summary's final), rounds.jsonl, an (empty) tb/ folder."""
    label, overrides = parse_method(spec)
    final = dict(final)
    final["global_accuracy_source"] = final.pop("source")
    run = results / f"{Path(COMPARE_CONFIG).stem}-{label}-s{seed}"
    (run / "tb").mkdir(parents=True)
    config = load_config(COMPARE_CONFIG, {**overrides, "seed": seed}).to_dict()
    first = {**{k: v / 2 for k, v in final.items() if k.endswith("accuracy")}, **(earlier or {})}
    (run / "metrics.jsonl").write_text(json.dumps({"round": 10, **first}) + "\n"
                                       + json.dumps({"round": 20, **final}) + "\n")
    (run / "rounds.jsonl").write_text("".join(json.dumps({"round": r, "time_s": 2.0}) + "\n" for r in range(1, 21)))
    (run / "summary.json").write_text(json.dumps({
        "status": "finished", "seed": seed, "algorithm": config["algorithm"], "config": config,
        "final": {**final, "round": 20},
        "rounds_completed": 20, "wall_time_s": 300.0,
        "communication": {"bytes_down": 20 * 20 * 3e6, "bytes_up": 20 * 20 * 1e6, "bytes_p2p_relayed": 0}}))
    return {**json.loads((run / "summary.json").read_text()), "run_dir": str(run)}


def test_report_writes_the_json_and_regenerates_results_md(tmp_path):
    results, docs = tmp_path / "results", tmp_path / "docs" / "results"
    for seed, (g, raw, mi) in enumerate([(0.44, 0.42, 0.3), (0.46, 0.43, 0.5)]):
        finished_run(results, WIDE, seed, {
            "global_accuracy": g, "global_accuracy_raw": raw, "personalized_accuracy": 0.8,
            "personalized_accuracy_mean": 0.7, "personalized_accuracy_p10": 0.5, "coldstart_accuracy": 0.6,
            "coldstart_accuracy_em": 0.6, "coldstart_accuracy_em_uniform": 0.35, "coldstart_accuracy_plain": 0.3,
            "expert_class_mi_bits": mi, "source": "global model", "personalized_accuracy_per_client": [0.7, 0.9]})
        # fedavg seed 1 was better at round 10 than at the end, its balanced global model too
        finished_run(results, "fedavg", seed, {"global_accuracy": 0.41, "global_accuracy_balanced": 0.43,
                                               "personalized_accuracy": 0.45 + 0.01 * seed,
                                               "coldstart_accuracy": 0.29, "source": "global model"},
                     earlier={"personalized_accuracy": 0.5, "global_accuracy_balanced": 0.47} if seed else None)
    docs.mkdir(parents=True)
    (docs / "_intro.md").write_text("What these tables are.\n")
    (docs / "compare_cifar10_dir0.1.md").write_text("Reading the comparison.\n")
    (docs / "older_notes.md").write_text("### Notes without a JSON\n\nKept verbatim.\n")
    doc_path = tmp_path / "docs" / "RESULTS.md"
    args = ["--config", COMPARE_CONFIG, "--seeds", "0", "1", "2", "--methods", WIDE, "fedavg", "pfedmoe",
            "--results-dir", str(results), "--report-only", "--docs-dir", str(docs), "--results-doc", str(doc_path)]
    assert main(args) == 0

    doc = json.loads((docs / "compare_cifar10_dir0.1.json").read_text())
    assert doc["config"] == COMPARE_CONFIG and doc["config_hash"] == config_hash(COMPARE_CONFIG, {})
    assert doc["config_hash"].startswith("sha256:") and doc["rounds"] == 20 and doc["seeds"] == [0, 1, 2]
    assert list(doc["methods"]) == ["fedcoe_wide", "fedavg"]  # pfedmoe never ran: left out
    wide, fedavg = doc["methods"]["fedcoe_wide"], doc["methods"]["fedavg"]
    assert wide["seeds"] == [0, 1] and wide["spec"] == WIDE
    assert wide["global"] == {"mean": pytest.approx(45.0), "std": pytest.approx(1.0), "variant": "balanced"}
    assert wide["personalised"] == {"mean": pytest.approx(80.0), "std": 0.0, "variant": "none"}
    assert wide["coldstart"] == {"mean": pytest.approx(60.0), "std": 0.0, "variant": "em"}
    assert wide["raw"] == {"global": {"mean": pytest.approx(42.5), "std": pytest.approx(0.5), "variant": "none"},
                           "personalised": {"mean": pytest.approx(80.0), "std": 0.0, "variant": "none"},
                           "coldstart": {"mean": pytest.approx(30.0), "std": 0.0, "variant": "none"}}
    assert wide["expert_class_mi_bits"] == {"mean": pytest.approx(0.4), "std": pytest.approx(0.1)}
    assert fedavg["global"]["variant"] == "balanced" and fedavg["raw"]["global"]["mean"] == pytest.approx(41.0)
    assert fedavg["personalised"] == {"mean": pytest.approx(45.5), "std": pytest.approx(0.5), "variant": "none"}
    assert "expert_class_mi_bits" not in fedavg
    # (3 + 1) MB per round over 20 clients; 2 s per training round
    assert fedavg["mb_per_client_per_round"] == pytest.approx(4.0) and fedavg["s_per_round"] == 2.0
    # best evaluated round: each seed's best, and its round, at the headline's variant (balanced:
    # round 10 of seed 1, not the unadapted model's best)
    assert fedavg["best"]["personalised"] == {"mean": pytest.approx(47.5), "std": pytest.approx(2.5),
                                              "rounds": [20, 10]}
    assert fedavg["best"]["global"] == {"mean": pytest.approx(45.0), "std": pytest.approx(2.0), "rounds": [20, 10]}
    comparison = (results / "compare-compare_cifar10_dir0.1" / "comparison.md").read_text()
    assert "| fedavg | 45.00 ± 2.00 (20, 10) | 47.50 ± 2.50 (20, 10) | 29.00 ± 0.00 (20, 20) |" in comparison
    # the per-client plot beside curves.png, and one TensorBoard log directory over every method and seed
    out = results / "compare-compare_cifar10_dir0.1"
    assert (out / "per_client.png").stat().st_size > 0 and (out / "curves.png").is_file()
    links = sorted(p.relative_to(out / "tb").as_posix() for p in (out / "tb").glob("*/*"))
    assert links == ["fedavg/s0", "fedavg/s1", "fedcoe_wide/s0", "fedcoe_wide/s1"]
    for link in (out / "tb").glob("*/*"):
        assert link.is_symlink() and not Path(link.readlink()).is_absolute()
    assert (out / "tb" / "fedavg" / "s1").resolve() == (results / "compare_cifar10_dir0.1-fedavg-s1" / "tb").resolve()

    text = doc_path.read_text()
    lines = text.splitlines()
    assert lines[0] == "# Results" and "do not edit this file" in lines[2]
    order = [text.index(s) for s in ("What these tables are.", "## Comparisons", "### compare_cifar10_dir0.1",
                                     "python -m fedcoe_flwr.compare --config " + COMPARE_CONFIG,
                                     "| fedcoe_wide | 45.00 ± 1.00 (balanced; raw 42.50 ± 0.50) | 80.00 ± 0.00 | "
                                     "60.00 ± 0.00 (em; raw 30.00 ± 0.00) | 4.000 |",
                                     "| fedcoe_wide | 60.00 ± 0.00 | 35.00 ± 0.00 | 30.00 ± 0.00 | n/a | 42.50 ± 0.50 |",
                                     "Reading the comparison.", "## Other measurements", "### Notes without a JSON")]
    assert order == sorted(order)
    assert "| fedavg | 43.00 ± 0.00 (balanced; raw 41.00 ± 0.00) | 45.50 ± 0.50 | 29.00 ± 0.00 |" in text
    assert "(fedcoe_wide: global balanced, cold-start em; fedavg: global balanced; every other cell unadapted)" in text

    # the file is regenerated, never edited: a hand edit does not survive, and the same inputs give the same file
    doc_path.write_text(text.replace("45.00 ± 1.00", "99.00 ± 0.00"))
    assert main(["--regenerate-docs", "--docs-dir", str(docs), "--results-doc", str(doc_path)]) == 0
    assert doc_path.read_text() == text
    # a second comparison of another kind gets its own section in its group, after the comparisons
    (docs / "explore.json").write_text(json.dumps({**doc, "kind": "exploration", "title": "How we explored"}))
    main(["--regenerate-docs", "--docs-dir", str(docs), "--results-doc", str(doc_path)])
    text = doc_path.read_text()
    assert text.index("## Comparisons") < text.index("## Explorations") < text.index("### How we explored")
    (docs / "bad.json").write_text(json.dumps({"kind": "guess", "methods": {}}))
    with pytest.raises(SystemExit, match=r"bad.json: unknown kind 'guess'"):
        main(["--regenerate-docs", "--docs-dir", str(docs), "--results-doc", str(doc_path)])


def test_archived_records_rebuild_the_report_and_count_as_finished_runs(tmp_path):
    results, archive = tmp_path / "results", tmp_path / "archive"
    for seed in (0, 1):
        finished_run(results, "fedavg", seed, {"global_accuracy": 0.4 + 0.02 * seed, "personalized_accuracy": 0.5,
                                               "coldstart_accuracy": 0.3, "source": "global model"})
    common = ["--config", COMPARE_CONFIG, "--seeds", "0", "1", "--methods", "fedavg", "--report-only"]
    docs = [["--docs-dir", str(tmp_path / d), "--results-doc", str(tmp_path / d / "RESULTS.md")] for d in ("a", "b")]
    assert main(common + ["--results-dir", str(results), "--archive", str(archive)] + docs[0]) == 0
    runs = sorted(p.name for p in archive.iterdir())
    assert runs == ["compare_cifar10_dir0.1-fedavg-s0", "compare_cifar10_dir0.1-fedavg-s1"]
    assert sorted(p.name for p in (archive / runs[0]).iterdir()) == sorted(compare.RECORD_FILES)  # no checkpoints
    shutil.rmtree(results)
    assert main(common + ["--results-dir", str(archive)] + docs[1]) == 0
    first, again = (json.loads((tmp_path / d / "compare_cifar10_dir0.1.json").read_text())["methods"] for d in "ab")
    assert again == first and first["fedavg"]["global"]["mean"] == pytest.approx(41.0)
    assert finished(archive / runs[1])["seed"] == 1  # copied into a results folder, a run that is not run again


def test_progress_counts_skipped_runs_as_done_but_not_in_the_estimate():
    progress = Progress(4)
    assert progress.finished("a-s0", None) == \
        "[compare] 1/4 done: a-s0 finished earlier; 3 more; time left unknown until one runs here"
    assert progress.finished("a-s1", 100.0) == \
        "[compare] 2/4 done: a-s1 took 1m 40s; about 3m 20s left (2 more at 1m 40s each)"
    assert progress.finished("b-s0", 3800.0) == \
        "[compare] 3/4 done: b-s0 took 1h 03m; about 32m 30s left (1 more at 32m 30s each)"
    assert progress.finished("b-s1", None).endswith("b-s1 finished earlier; all runs done")


def test_compare_prints_a_progress_line_per_run(tmp_path, monkeypatch, capsys):
    results = tmp_path / "results"
    finished_run(results, "fedavg", 0, {"global_accuracy": 0.4, "personalized_accuracy": 0.5,
                                        "coldstart_accuracy": 0.3, "source": "global model"})
    ran = []

    def fake_run_one(config, label, overrides, seed, results_dir, extra, log, stem=None):  # as run_one: finished runs reused
        assert log is None  # one run at a time prints to the terminal
        done = finished(run_dir(results_dir, Path(config).stem, label, seed))
        if done:
            return done
        ran.append((label, seed))
        return finished_run(results_dir, label, seed, {"global_accuracy": 0.4, "personalized_accuracy": 0.5,
                                                       "coldstart_accuracy": 0.3, "source": "global model"})

    clock = iter(range(0, 1000, 30))  # every run here takes 30 s
    monkeypatch.setattr(compare, "run_one", fake_run_one)
    monkeypatch.setattr(compare, "monotonic", lambda: next(clock))
    assert main(["--config", COMPARE_CONFIG, "--seeds", "0", "1", "--methods", "fedavg", "fedprox",
                 "--results-dir", str(results), "--no-docs"]) == 0
    lines = [line for line in capsys.readouterr().out.splitlines() if " done: " in line]
    stem = "compare_cifar10_dir0.1"
    assert lines == [f"[compare] 1/4 done: {stem}-fedavg-s0 finished earlier; 3 more; time left unknown until one "
                     "runs here",
                     f"[compare] 2/4 done: {stem}-fedprox-s0 took 30s; about 1m 00s left (2 more at 30s each)",
                     f"[compare] 3/4 done: {stem}-fedavg-s1 took 30s; about 30s left (1 more at 30s each)",
                     f"[compare] 4/4 done: {stem}-fedprox-s1 took 30s; all runs done"]
    assert ran == [("fedprox", 0), ("fedavg", 1), ("fedprox", 1)]  # seed by seed: whole seeds first


def test_a_comparison_on_another_split_gets_its_own_runs_and_report(tmp_path, monkeypatch):
    """``--set`` on a computing key renames the run folders and the report: the config's own
    runs and JSON stay as they are (a where-to key such as data_root changes neither)."""
    results, docs = tmp_path / "results", tmp_path / "docs"
    finished_run(results, "fedavg", 0, {"global_accuracy": 0.4, "personalized_accuracy": 0.5,
                                        "coldstart_accuracy": 0.3, "source": "global model"})
    ran = []

    def fake_run_one(config, label, overrides, seed, results_dir, extra, log, stem=None):
        ran.append((stem, overrides["dirichlet_alpha"]))
        out = run_dir(results_dir, stem, label, seed)
        (out / "tb").mkdir(parents=True)
        original = results_dir / f"{Path(config).stem}-{label}-s{seed}"
        summary = json.loads((original / "summary.json").read_text())
        summary["config"] = load_config(config, {**overrides, "seed": seed, "run_name": out.name}).to_dict()
        for name in ("metrics.jsonl", "rounds.jsonl"):
            (out / name).write_text((original / name).read_text())
        (out / "summary.json").write_text(json.dumps(summary))
        return {**summary, "run_dir": str(out)}

    monkeypatch.setattr(compare, "run_one", fake_run_one)
    assert main(["--config", COMPARE_CONFIG, "--seeds", "0", "--methods", "fedavg", "--results-dir", str(results),
                 "--set", "dirichlet_alpha=0.3", "data_root=/elsewhere/cifar.tar.gz",
                 "--docs-dir", str(docs), "--results-doc", str(tmp_path / "RESULTS.md")]) == 0
    assert ran == [("compare_cifar10_dir0.1-dirichlet_alpha_0.3", 0.3)]
    assert (results / "compare_cifar10_dir0.1-dirichlet_alpha_0.3-fedavg-s0" / "summary.json").is_file()
    doc = json.loads((docs / "compare_cifar10_dir0.1-dirichlet_alpha_0.3.json").read_text())
    assert doc["overrides"] == ["dirichlet_alpha=0.3", "data_root=/elsewhere/cifar.tar.gz"]
    assert sorted(p.name for p in docs.glob("*.json")) == ["compare_cifar10_dir0.1-dirichlet_alpha_0.3.json"]


def test_compare_jobs_runs_every_run_with_its_own_log_and_names_the_failed_one(tmp_path, monkeypatch, capsys):
    results = tmp_path / "results"
    stem = "compare_cifar10_dir0.1"
    logs = {}

    def fake_run_one(config, label, overrides, seed, results_dir, extra, log, stem=None):
        logs[(label, seed)] = log
        if (label, seed) == ("fedprox", 1):
            raise SystemExit(f"[compare] {stem}-fedprox-s1 failed (exit 1); its output: {log}")
        return finished_run(results_dir, label, seed, {"global_accuracy": 0.4, "personalized_accuracy": 0.5,
                                                       "coldstart_accuracy": 0.3, "source": "global model"})

    monkeypatch.setattr(compare, "run_one", fake_run_one)
    args = ["--config", COMPARE_CONFIG, "--seeds", "0", "1", "--methods", "fedavg", "fedprox",
            "--results-dir", str(results), "--no-docs", "--jobs", "3"]
    with pytest.raises(SystemExit, match=f"{stem}-fedprox-s1 failed"):
        main(args)
    assert logs == {(m, s): results.resolve() / f"{stem}-{m}-s{s}.log" for m in ("fedavg", "fedprox") for s in (0, 1)}
    with pytest.raises(SystemExit):
        main(args[:-1] + ["0"])
    assert "--jobs 0: must be at least 1" in capsys.readouterr().err


def test_committed_results_md_is_what_the_generator_makes(tmp_path):
    """docs/RESULTS.md is regenerated, never hand-edited: the committed file equals the generator's
    output for the committed docs/results/ (after editing a fragment: --regenerate-docs)."""
    repo_docs = Path(__file__).resolve().parents[2] / "docs"
    shutil.copytree(repo_docs / "results", tmp_path / "results")
    write_results_doc(tmp_path / "results", tmp_path / "RESULTS.md")
    assert (tmp_path / "RESULTS.md").read_text() == (repo_docs / "RESULTS.md").read_text(), \
        "docs/RESULTS.md is out of date: run python -m fedcoe_flwr.compare --regenerate-docs"
    for path in (repo_docs / "results").glob("*.json"):  # every committed file has the schema's fields
        doc = json.loads(path.read_text())
        assert {"config", "config_hash", "rounds", "seeds", "methods", "source", "command"} <= set(doc), path.name
        for label, m in doc["methods"].items():
            for metric in ("global", "personalised", "coldstart"):
                assert set(m[metric]) == {"mean", "std", "variant"} and set(m["raw"][metric]) >= {"mean", "std"}, \
                    (path.name, label, metric)
