"""Builds <benchmark>/RESULTS.md (and heatmap PNGs) from the runs of experiments/run_benchmark.py.

    PYTHONPATH=$PWD python experiments/summarize.py experiments/standard_order1 RUNS_DIR

For every config of the benchmark folder it reads ``RUNS_DIR/<name>/results.json`` (the engine's
output; ``RUNS_DIR/runs.json`` for methods that failed) and writes:
  - a table of AP / BWT / FWT / forgetting and seconds per method (with the engine's compile /
    train / evaluation seconds where results.json has them),
  - the papers' own numbers for this benchmark from ``experiments/published.json``, each with its
    source, next to ours,
  - the final score of every task per method,
  - the routing accuracy matrix of every routing method (``routing_accuracy``),
  - method_report highlights: SAPT's mean attention, OA-Adapter's used fraction, SMAT's sparsity
    per expert, MIST's mask share per task,
  - one heatmap per accuracy matrix (``jaxcl.train.report.heatmap``) in ``<benchmark>/heatmaps/``,
  - the hand-written ``<benchmark>/CLAIMS.md`` (each paper's claim and its verdict on these runs), if present,
    after the results table, so the verdicts are rebuilt with the numbers they judge.
"""
from __future__ import annotations

import argparse
import json
import os
import sys

from jaxcl.train import config as jconfig
from jaxcl.train.report import PHASE_SECONDS, heatmap

HERE = os.path.dirname(os.path.abspath(__file__))
METRICS = ("AP", "BWT", "FWT", "forgetting")


def _fmt(x, digits: int = 1) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def collect(benchmark_dir: str, runs_dir: str) -> list[dict]:
    """One entry per config of the benchmark: ``{name, config, results | None, record | None}``."""
    records = {}
    runs_json = os.path.join(runs_dir, "runs.json")
    if os.path.exists(runs_json):
        with open(runs_json, encoding="utf-8") as f:
            records = {r["name"]: r for r in json.load(f)}
    entries = []
    for file in sorted(f for f in os.listdir(benchmark_dir) if f.endswith(".yaml")):
        name = file[: -len(".yaml")]
        path = os.path.join(runs_dir, name, "results.json")
        results = None
        if os.path.exists(path):
            with open(path, encoding="utf-8") as f:
                results = json.load(f)
        entries.append({"name": name, "config": jconfig.load(os.path.join(benchmark_dir, file)),
                        "results": results, "record": records.get(name)})
    return entries


def budget_lines(cfg: jconfig.RunConfig) -> list[str]:
    """The budget every method of the folder shares, as markdown bullets."""
    d, t, e = cfg.data, cfg.train, cfg.eval
    steps = f"{t.steps_per_task} steps per task" if t.steps_per_task else f"{t.epochs:g} epoch(s) per task"
    order = d.order if isinstance(d.order, str) else " → ".join(d.order)
    return [f"- Model `{cfg.model}` ({cfg.dtype}); data `{d.source}`, order {order}.",
            f"- Training: first {d.max_train_per_task or 'all'} training examples per task, "
            f"{d.validation_fraction:.0%} of them held out for validation; {steps}, batch {t.batch_size}, "
            f"lr {t.lr:g} ({t.schedule}); prompts ≤ {d.max_prompt_tokens} tokens, answers ≤ {d.max_answer_tokens}.",
            f"- Evaluation: {e.max_test_per_task or 'all'} test examples per task (seeded sample), greedy, "
            f"≤ {e.max_new_tokens} new tokens, before the first task and after every task."]


def method_table(entries: list[dict]) -> list[str]:
    """AP / BWT / FWT / forgetting and seconds per method."""
    timed = any(k in (x["results"] or {}) for x in entries for k in PHASE_SECONDS)
    head = "| method | AP | BWT | FWT | forgetting | seconds (engine) | wall (driver) |"
    head += " compile / train / eval / task hooks s |" if timed else ""
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for x in entries:
        r, rec = x["results"], x["record"] or {}
        if r is None:
            status = f"failed: {rec['error']}" if rec.get("status") == "failed" else "not run"
            lines.append(f"| {x['config'].method} | {status} |" + " |" * (head.count("|") - 3))
            continue
        m = r["metrics"]
        row = f"| {r['method']} | " + " | ".join(_fmt(m.get(k)) for k in METRICS)
        row += f" | {_fmt(r.get('seconds'))} | {_fmt(rec.get('wall_s'))} |"
        if timed:
            row += " " + " / ".join(_fmt(r.get(k)) for k in PHASE_SECONDS) + " |"
        lines.append(row)
    return lines


def published_table(benchmark: str, entries: list[dict], published: dict) -> list[str]:
    """The papers' numbers for this benchmark next to ours (AP / BWT of the same method)."""
    ours = {x["results"]["method"]: x["results"]["metrics"] for x in entries if x["results"]}
    lines = ["| method | paper | setting | paper AP | paper BWT | our AP | our BWT | source |",
             "|---|---|---|---|---|---|---|---|"]
    rows = published.get(benchmark, []) + [p for p in published.get("other", []) if p["method"] in ours]
    for p in rows:
        mine = ours.get(p["method"], {})
        ap = "not transcribed" if p["AP"] is None else _fmt(p["AP"], 2)
        lines.append(f"| {p['method']} | {p['paper']} | {p['setting']} | {ap} | {_fmt(p['BWT'], 2)} | "
                     f"{_fmt(mine.get('AP'))} | {_fmt(mine.get('BWT'))} | {p['source']} |")
    return lines


def final_scores(entries: list[dict]) -> list[str]:
    """Each task's score after the last task (the matrix's last row), one row per method."""
    done = [x["results"] for x in entries if x["results"]]
    if not done:
        return ["(no finished runs)"]
    tasks = done[0]["tasks"]
    lines = ["| method | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
    lines += [f"| {r['method']} | " + " | ".join(_fmt(v) for v in r["matrix"][-1]) + " |" for r in done]
    return lines


def routing_tables(entries: list[dict]) -> list[str]:
    """Per routing method: % of task j's test prompts routed to task j after training task i."""
    lines = []
    for r in (x["results"] for x in entries if x["results"] and x["results"].get("routing_accuracy")):
        tasks = r["tasks"]
        lines += [f"**{r['method']}** (row: after task i; column: task j)", "",
                  "| after | " + " | ".join(tasks) + " |", "|---|" + "---|" * len(tasks)]
        for i, row in enumerate(r["routing_accuracy"]):
            cells = [_fmt(v, 0) for v in (row or [None] * len(tasks))]
            lines.append(f"| {tasks[i] if i < len(tasks) else i} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines or ["(no routing method finished)"]


def report_highlights(entries: list[dict]) -> list[str]:
    """The method_report fields that show whether a method did its job."""
    picks = {"mean_attention": "SAPT mean attention on each task's held-out inputs (row t: tasks 0..t)",
             "used_fraction": "OA-Adapter: share of the allocated adapter parameters in use",
             "sparsity_per_expert": "SMAT: share of zero gates per expert (target 0.95)",
             "mask_share_per_task": "MIST: share of the tuned weights in each task's mask"}
    lines = []
    for r in (x["results"] for x in entries if x["results"]):
        report = r.get("method_report") or {}
        for key, label in picks.items():
            if key in report:
                lines.append(f"- {r['method']}: {label}: `{json.dumps(_rounded(report[key]))}`")
    return lines or ["(none of the finished methods reports these fields)"]


def _rounded(value):
    if isinstance(value, float):
        return round(value, 3)
    if isinstance(value, list):
        return [_rounded(v) for v in value]
    if isinstance(value, dict):
        return {k: _rounded(v) for k, v in value.items()}
    return value


def write_heatmaps(benchmark_dir: str, entries: list[dict]) -> list[str]:
    """One PNG per finished run in ``<benchmark>/heatmaps/``; returns the markdown image lines."""
    folder = os.path.join(benchmark_dir, "heatmaps")
    lines = []
    for x in entries:
        if x["results"]:
            os.makedirs(folder, exist_ok=True)
            heatmap(x["results"], os.path.join(folder, f"{x['name']}.png"))
            lines.append(f"![{x['results']['method']}](heatmaps/{x['name']}.png)")
    return lines or ["(no finished runs)"]


def claims_lines(benchmark_dir: str) -> list[str]:
    """The verdicts written by hand in ``<benchmark>/CLAIMS.md`` (its own heading kept out)."""
    path = os.path.join(benchmark_dir, "CLAIMS.md")
    if not os.path.exists(path):
        return ["(no verdicts yet: CLAIMS.md is written once the runs are in)"]
    with open(path, encoding="utf-8") as f:
        lines = f.read().strip().splitlines()
    if lines and lines[0].startswith("# "):
        lines = lines[1:]
    while lines and not lines[0].strip():
        lines = lines[1:]
    return lines


def build(benchmark_dir: str, runs_dir: str, published_path: str = os.path.join(HERE, "published.json")) -> str:
    """The RESULTS.md text (heatmaps are written as a side effect)."""
    entries = collect(benchmark_dir, runs_dir)
    if not entries:
        raise SystemExit(f"{benchmark_dir}: no *.yaml configs")
    with open(published_path, encoding="utf-8") as f:
        published = json.load(f)
    benchmark = os.path.basename(os.path.normpath(benchmark_dir))
    versions = next((x["results"].get("versions", {}) for x in entries if x["results"]), {})
    device = ", ".join(sorted(set(versions.get("devices", [])))) or "unknown"
    parts = [f"# {benchmark}: {sum(1 for x in entries if x['results'])} of {len(entries)} methods",
             "", f"Built by `experiments/summarize.py {benchmark_dir} {runs_dir}` from each run's results.json "
             f"(device: {device}; jax {versions.get('jax', '?')}). Scores in %, metrics in points (docs/metrics.md).",
             "", "## Budget (the same for every method)", "", *budget_lines(entries[0]["config"]),
             "", "## Results", "", *method_table(entries),
             "", "## The papers' claims on these runs", "", *claims_lines(benchmark_dir),
             "", "## Published numbers next to ours", "",
             "The papers' setting differs from ours (model, data, budget; see experiments/published.json).", "",
             *published_table(benchmark, entries, published),
             "", "## Final score per task", "", *final_scores(entries),
             "", "## Routing accuracy", "", *routing_tables(entries),
             "", "## Method reports", "", *report_highlights(entries),
             "", "## Accuracy matrices", "", *write_heatmaps(benchmark_dir, entries), ""]
    return "\n".join(parts)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("benchmark_dir", help="e.g. experiments/standard_order1")
    parser.add_argument("runs_dir", help="the --out folder of experiments/run_benchmark.py")
    args = parser.parse_args(argv)
    text = build(args.benchmark_dir, args.runs_dir)
    path = os.path.join(args.benchmark_dir, "RESULTS.md")
    with open(path + ".tmp", "w", encoding="utf-8") as f:  # written whole or not at all
        f.write(text)
    os.replace(path + ".tmp", path)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
