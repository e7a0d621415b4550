"""What a comparison reports, from its finished runs: one record per method (the entries of
``docs/results/<name>.json``), the markdown tables of ``comparison.md``, and ``docs/RESULTS.md``
regenerated from every ``docs/results/*.json`` and the hand-written ``*.md`` fragments beside them.

The metrics files keep their keys (``personalized_accuracy``, ``coldstart_accuracy``: saved runs
use them); the JSON and the tables say "personalised" and "coldstart" / "cold-start"."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np

from .fileio import atomic_write, read_jsonl
from .server.callbacks.summary import best_of


class Metric(NamedTuple):
    key: str  # in metrics.jsonl / summary.json (the saved runs' spelling)
    name: str  # in docs/results/*.json
    title: str  # in tables and plots


METRICS = (Metric("global_accuracy", "global", "global"),
           Metric("personalized_accuracy", "personalised", "personalised"),
           Metric("coldstart_accuracy", "coldstart", "cold-start"))


def seconds_per_round(summary: dict[str, Any]) -> float:
    """Mean wall time of a training round (sampling to aggregation), from rounds.jsonl:
    the compute a round costs on this machine, evaluation excluded."""
    rounds = read_jsonl(Path(summary["run_dir"]) / "rounds.jsonl") if "run_dir" in summary else []
    times = [r["time_s"] for r in rounds if r.get("time_s") is not None]
    return float(np.mean(times)) if times else float("nan")


# ------------------------------------------------------------ what a run reported
# Summary statistics stored beside a metric under ``<key>_<suffix>``, not variants of it.
NOT_VARIANTS = ("mean", "p10", "source")
# Ties between equal cold-start variants go to the protocol's default adaptation.
PREFERENCE = ("adabn_em", "em_calibrated", "em", "adabn", "em_uniform", "plain")


def measured_variants(final: dict[str, Any], key: str) -> dict[str, float]:
    """``{name: value}`` for every ``<key>_<name>`` figure of the same run and model."""
    prefix = key + "_"
    return {k[len(prefix):]: v for k, v in final.items()
            if k.startswith(prefix) and k[len(prefix):] not in NOT_VARIANTS
            and isinstance(v, (int, float)) and not isinstance(v, bool)}


def label_free_variants(final: dict[str, Any], key: str) -> dict[str, float]:
    """Every label-free variant of ``key`` one run measured, by name (``none``: unadapted), read
    from the metrics' naming: ``global_accuracy_raw`` is the global model with the training prior
    left in, so ``global_accuracy`` is the balanced one (``global_accuracy_balanced`` beside an
    unadapted ``global_accuracy`` is the opposite); ``coldstart_accuracy_<name>`` is each
    cold-start adaptation (``plain``: none), and a configured ``coldstart_accuracy`` equal to none
    of them (a method's own adaptation) is ``configured``. A metric with no variants is unadapted."""
    value = final.get(key)
    variants = measured_variants(final, key)
    if "raw" in variants:
        return {"none": variants["raw"], "balanced": value} if value is not None else {"none": variants["raw"]}
    if "balanced" in variants:
        return {"none": value, "balanced": variants["balanced"]} if value is not None else {}
    if "plain" in variants:
        out = {("none" if n == "plain" else n): v for n, v in variants.items()}
        if value is not None and value not in out.values():
            out["configured"] = value
        return out
    return {"none": value} if value is not None else {}


def best_variant(finals: list[dict[str, Any]], key: str) -> tuple[str, list[float | None], list[float | None]]:
    """(the label-free variant with the best mean over the seeds that measured every variant,
    each seed's figure at it, each seed's unadapted figure). Ties go to the simpler variant
    (``PREFERENCE`` read backwards: none first)."""
    per_seed = [label_free_variants(f, key) for f in finals]
    measured = [v for v in per_seed if v]
    raw = [v.get("none") for v in per_seed]
    if not measured:
        return "none", [None] * len(finals), raw
    names = set(measured[0]).intersection(*measured[1:])
    order = ("none",) + tuple(reversed(PREFERENCE[:-1]))
    rank = {n: i for i, n in enumerate(order)}
    best = max(sorted(names, key=lambda n: rank.get(n, len(order))),
               key=lambda n: float(np.mean([v[n] for v in measured])))
    return best, [v.get(best) for v in per_seed], raw


def stats(values: list[float | None], scale: float = 100.0) -> dict[str, float | None]:
    """Mean and population std over seeds (``scale`` 100: percent), None when nothing was measured."""
    vals = [scale * v for v in values if v is not None]
    if not vals:
        return {"mean": None, "std": None}
    return {"mean": round(float(np.mean(vals)), 4), "std": round(float(np.std(vals)), 4)}


def finite_or_none(value: float, digits: int) -> float | None:
    return None if not np.isfinite(value) else round(float(value), digits)


def best_record(summaries: list[dict[str, Any]], variants: dict[str, str]) -> dict[str, Any]:
    """Per headline metric, each seed's best evaluated value (metrics.jsonl) at the label-free
    variant its headline uses (``variants``: metric name -> variant; "none": unadapted): mean ±
    std over seeds, and the round of each seed's best in seed order (None: that seed never
    measured it). Ties go to the earlier round."""
    histories = [read_jsonl(Path(s["run_dir"]) / "metrics.jsonl") for s in summaries if "run_dir" in s]
    out = {}
    for metric in METRICS:
        variant = variants.get(metric.name, "none")
        found = []
        for history in histories:
            found.append(best_of([(value, h["round"]) for h in history
                                  if isinstance(value := label_free_variants(h, metric.key).get(variant), (int, float))]))
        if any(found):
            out[metric.name] = {**stats([f[0] if f else None for f in found]),
                                "rounds": [f[1] if f else None for f in found]}
    return out


def method_record(summaries: list[dict[str, Any]], num_clients: int, adapted: bool = True) -> dict[str, Any]:
    """One method's entry of docs/results/<name>.json, from its finished runs (one per seed): each
    metric at its best label-free variant, or unadapted (``adapted`` False: a calibration against
    a published figure that used none)."""
    finals = [s.get("final", {}) for s in summaries]
    record: dict[str, Any] = {"seeds": [s.get("seed") for s in summaries]}
    raw: dict[str, Any] = {}
    for metric in METRICS:
        name, values, unadapted = best_variant(finals, metric.key)
        raw[metric.name] = {**stats(unadapted), "variant": "none"}
        record[metric.name] = {**stats(values), "variant": name} if adapted else dict(raw[metric.name])
    record["raw"] = raw
    record["best"] = best_record(summaries, {m.name: record[m.name]["variant"] for m in METRICS})
    keys = sorted({f"{m.key}_{name}" for f in finals for m in METRICS if m.key != "personalized_accuracy"
                   for name in measured_variants(f, m.key)})
    record["variants"] = {k: stats([f.get(k) for f in finals]) for k in keys}
    if any("expert_class_mi_bits" in f for f in finals):
        record["expert_class_mi_bits"] = stats([f.get("expert_class_mi_bits") for f in finals], scale=1.0)
    rounds = [max(1, s.get("rounds_completed", 1)) for s in summaries]
    comm = [s.get("communication", {}) for s in summaries]
    record["mb_per_client_per_round"] = finite_or_none(np.mean(
        [(c.get("bytes_down", 0) + c.get("bytes_up", 0)) / r / num_clients / 1e6 for c, r in zip(comm, rounds)]), 3)
    record["p2p_mb_per_client_per_round"] = finite_or_none(np.mean(
        [c.get("bytes_p2p_relayed", 0) / r / num_clients / 1e6 for c, r in zip(comm, rounds)]), 3)
    record["s_per_round"] = finite_or_none(np.mean([seconds_per_round(s) for s in summaries]), 1)
    record["wall_time_s"] = finite_or_none(np.mean([s.get("wall_time_s", 0) for s in summaries]), 0)
    record["global_from"] = finals[0].get("global_accuracy_source", "") if finals else ""
    return record


# ------------------------------------------------------------ markdown from the records
def fmt(value: float | None, spec: str) -> str:
    return "n/a" if value is None else format(value, spec)


def mean_std(cell: dict[str, Any] | None) -> str:
    if not cell or cell.get("mean") is None:
        return "n/a"
    return f"{cell['mean']:.2f} ± {cell.get('std') or 0:.2f}"


def with_raw(record: dict[str, Any], metric: str) -> str:
    """The cell of a metric at its best label-free variant, the unadapted figure beside it when
    they differ: ``48.20 ± 1.10 (em; raw 30.90 ± 2.00)``."""
    cell, raw = record.get(metric), (record.get("raw") or {}).get(metric)
    if not cell or cell.get("variant", "none") == "none" or not raw:
        return mean_std(cell)
    return f"{mean_std(cell)} ({cell['variant']}; raw {mean_std(raw)})"


def table(methods: dict[str, dict[str, Any]]) -> str:
    head = ("| method | global acc. % | personalised acc. % | cold-start acc. % | "
            "MB per client per round (down + up) | p2p MB relayed per client per round | s per round | "
            "wall time s | seeds | global from |")
    lines = [head, "|" + "---|" * 10]
    for label, r in methods.items():
        cells = [with_raw(r, m.name) for m in METRICS]
        lines.append(f"| {label} | " + " | ".join(cells) +
                     f" | {fmt(r.get('mb_per_client_per_round'), '.3f')} | "
                     f"{fmt(r.get('p2p_mb_per_client_per_round'), '.3f')} | {fmt(r.get('s_per_round'), '.1f')} | "
                     f"{fmt(r.get('wall_time_s'), '.0f')} | {len(r.get('seeds', [])) or 'n/a'} | "
                     f"{r.get('global_from', '')} |")
    return "\n".join(lines)


def best_table(methods: dict[str, dict[str, Any]]) -> str:
    """The best evaluated round of each method: each seed's best, mean ± std over seeds, and
    the round of each seed's best ("" when no method has a ``best`` block)."""
    if not any(r.get("best") for r in methods.values()):
        return ""
    lines = ["| method | " + " | ".join(f"best {m.title} acc. % (round per seed)" for m in METRICS) + " |",
             "|" + "---|" * (len(METRICS) + 1)]
    for label, r in methods.items():
        if r.get("best"):
            cells = [r["best"].get(m.name) for m in METRICS]
            lines.append(f"| {label} | " + " | ".join(
                "n/a" if not c else f"{mean_std(c)} ({', '.join('n/a' if n is None else str(n) for n in c['rounds'])})"
                for c in cells) + " |")
    return "\n".join(lines)


def variants_table(methods: dict[str, dict[str, Any]]) -> str:
    """Every variant a run reported besides its configured one, from the same run and model:
    the other global model (raw / balanced) and each cold-start adaptation on and off."""
    keys = sorted({k for r in methods.values() for k in r.get("variants", {})})
    if not keys:
        return ""
    lines = ["| method | " + " | ".join(k.replace("_accuracy_", " ") for k in keys) + " |",
             "|" + "---|" * (len(keys) + 1)]
    for label, r in methods.items():
        if r.get("variants"):
            lines.append(f"| {label} | " + " | ".join(mean_std(r["variants"].get(k)) for k in keys) + " |")
    return "\n".join(lines)


def comparison_markdown(doc: dict[str, Any]) -> str:
    """The tables of one comparison (comparison.md and its section of docs/RESULTS.md)."""
    methods = doc.get("methods", {})
    text = table(methods) + "\n"
    best = best_table(methods)
    if best:
        text += ("\nBest evaluated round (each seed's best evaluation, % mean ± std over seeds; in brackets the "
                 "round of each seed's best, in seed order):\n\n" + best + "\n")
    groups: dict[str, list[str]] = {}
    for label, r in methods.items():
        used = ", ".join(f"{m.title} {r[m.name]['variant']}" for m in METRICS
                         if isinstance(r.get(m.name), dict) and r[m.name].get("variant", "none") != "none")
        groups.setdefault(used, []).append(label)
    adapted = {used: labels for used, labels in groups.items() if used}
    if adapted:
        who = ("every row: " + next(iter(adapted)) if len(groups) == 1
               else "; ".join(f"{', '.join(labels)}: {used}" for used, labels in adapted.items())
               + "; every other cell unadapted")
        text += f"\nLabel-free adaptation in the cells above ({who}); unadapted figures: `raw` in the JSON.\n"
    variants = variants_table(methods)
    if variants:
        text += ("\nVariants measured in the same runs (the other global model; each cold-start adaptation on "
                 "and off), % mean ± std over seeds:\n\n" + variants + "\n")
    mi = {label: r["expert_class_mi_bits"] for label, r in methods.items() if r.get("expert_class_mi_bits")}
    if mi:
        text += ("\nMutual information between the gate's top expert and the class (bits, mean ± std): "
                 + ", ".join(f"{label} {c['mean']:.3f} ± {c.get('std') or 0:.3f}" for label, c in mi.items())
                 + ".\n")
    return text


# ------------------------------------------------------------ docs/results/*.json -> docs/RESULTS.md
KINDS = {"comparison": "Comparisons", "calibration": "Calibration", "ablation": "Ablations",
         "exploration": "Explorations"}
REGENERATE = "python -m fedcoe_flwr.compare --regenerate-docs"


def doc_methods(doc: dict[str, Any]) -> dict[str, Any]:
    """The per-method entries; a file written without ``methods`` (e.g. a calibration's
    ``{"fedavg": {"global": {"mean": ...}}}``) holds them at its top level."""
    if isinstance(doc.get("methods"), dict):
        return doc["methods"]
    return {k: v for k, v in doc.items() if isinstance(v, dict) and any(m.name in v for m in METRICS)}


def load_result_docs(docs_dir: Path) -> list[dict[str, Any]]:
    docs = []
    for path in sorted(docs_dir.glob("*.json")):
        try:
            doc = json.loads(path.read_text())
        except json.JSONDecodeError as err:
            raise SystemExit(f"[compare] {path} is not valid JSON ({err}); fix or remove it, then {REGENERATE}")
        kind = doc.get("kind", "comparison")
        if kind not in KINDS:
            raise SystemExit(f"[compare] {path}: unknown kind {kind!r}; use one of {', '.join(KINDS)}")
        docs.append({**doc, "name": path.stem, "kind": kind, "methods": doc_methods(doc)})
    return docs


def results_section(doc: dict[str, Any], docs_dir: Path) -> str:
    seeds = " ".join(map(str, doc.get("seeds", []))) or "n/a"
    digest = doc.get("config_hash", "")
    lines = [f"### {doc.get('title') or doc['name']}", "",
             f"`{doc['name']}.json`: config `{doc.get('config', 'n/a')}`"
             + (f" (`{digest[:19]}…`)" if digest else "")
             + f", {doc.get('rounds', 'n/a')} rounds, seeds {seeds}; final round, % mean ± std over the seeds "
             "each method finished."]
    if doc.get("source"):
        lines += ["", f"Source: {doc['source']}"]
    if doc.get("command"):
        lines += ["", "```bash", doc["command"], "```"]
    lines += ["", comparison_markdown(doc).rstrip()]
    fragment = docs_dir / f"{doc['name']}.md"
    if fragment.is_file():
        lines += ["", fragment.read_text().strip()]
    return "\n".join(lines)


def write_results_doc(docs_dir: Path, doc_path: Path) -> Path:
    """docs/RESULTS.md from every docs/results/*.json, grouped by kind and sorted by name, each
    followed by its ``<name>.md`` fragment; ``_intro.md`` first; fragments with no JSON last."""
    docs = load_result_docs(docs_dir)
    where = Path(os.path.relpath(docs_dir, doc_path.parent)).as_posix()
    parts = ["# Results", "",
             f"*Generated by `python -m fedcoe_flwr.compare` from [`{where}/*.json`]({where}/) and the `*.md` "
             f"fragments beside them: do not edit this file. Edit the fragments, then run `{REGENERATE}`.*"]
    intro = docs_dir / "_intro.md"
    if intro.is_file():
        parts += ["", intro.read_text().strip()]
    for kind, heading in KINDS.items():
        of_kind = [d for d in docs if d["kind"] == kind]
        if of_kind:
            parts += ["", f"## {heading}"]
            parts += [p for d in of_kind for p in ("", results_section(d, docs_dir))]
    named = {d["name"] for d in docs}
    others = [p for p in sorted(docs_dir.glob("*.md")) if not p.name.startswith("_") and p.stem not in named]
    if others:
        parts += ["", "## Other measurements"]
        parts += [t for p in others for t in ("", p.read_text().strip())]
    return atomic_write(doc_path, "\n".join(parts) + "\n")
