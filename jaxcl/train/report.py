"""Reading a run back: a printed accuracy matrix with metrics, a heatmap PNG, the wrong answers."""
from __future__ import annotations

import json
import os


class ReportError(ValueError):
    """results.json is missing or malformed."""


REQUIRED = ("method", "model", "tasks", "matrix", "metrics")
# Where a run's seconds went, as results.json names them (jaxcl/train/loop.py writes them).
PHASE_SECONDS = ("compile_seconds", "train_seconds", "eval_seconds", "hook_seconds")


def load_results(directory: str) -> dict:
    path = os.path.join(directory, "results.json")
    try:
        with open(path, encoding="utf-8") as f:
            results = json.load(f)
    except OSError as e:
        raise ReportError(f"{path}: cannot read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    missing = [k for k in REQUIRED if k not in results]
    if missing:
        raise ReportError(f"{path}: missing field(s) {missing}")
    return results


def wrong_answers(directory: str, limit: int, prompt_chars: int = 160) -> str:
    """Up to ``limit`` wrong answers (score below 100) per task of the run's last evaluation in
    ``predictions.jsonl``, as text; a prompt shows its last ``prompt_chars`` characters (where the
    instance is, after any instructions)."""
    path = os.path.join(directory, "predictions.jsonl")
    try:
        with open(path, encoding="utf-8") as f:
            rows = [json.loads(line) for line in f]
    except OSError as e:
        raise ReportError(f"{path}: cannot read ({e.strerror})") from None
    except json.JSONDecodeError as e:
        raise ReportError(f"{path}: line {e.lineno}: not valid JSON ({e.msg})") from None
    if not rows:
        raise ReportError(f"{path}: no predictions")
    last = rows[-1]["after"]
    rows = [r for r in rows if r["after"] == last]
    lines = [f"wrong answers after {last} (up to {limit} per task):"]
    for task in dict.fromkeys(r["task"] for r in rows):
        of_task = [r for r in rows if r["task"] == task]
        wrong = [r for r in of_task if r["score"] < 100.0]
        lines.append(f"  {task}: {len(wrong)} of {len(of_task)} wrong")
        for r in wrong[:limit]:
            prompt = r["prompt"] if len(r["prompt"]) <= prompt_chars else "..." + r["prompt"][-prompt_chars:]
            lines.append(f"    #{r['index']} {prompt!r} -> {r['prediction']!r} (expected "
                         f"{' or '.join(map(repr, r['references']))}; score {r['score']:.0f})")
    return "\n".join(lines)


def _fmt(x) -> str:
    return "   -  " if x is None else f"{x:6.1f}"


def format_matrix(results: dict) -> str:
    """The accuracy matrix (rows: after training task i; columns: task j) and the metrics, as text."""
    tasks = results["tasks"]
    width = max(len(f"after {t}") for t in tasks) + 2
    head = " " * width + "".join(f"{t[:10]:>11}" for t in tasks)
    lines = [f"method {results['method']}  model {results['model']}", head]
    base = results.get("base_scores")
    if base:
        lines.append(f"{'base':<{width}}" + "".join(f"{_fmt(x):>11}" for x in base))
    for i, row in enumerate(results["matrix"]):
        label = f"after {tasks[i]}" if len(results["matrix"]) == len(tasks) else "joint"
        lines.append(f"{label:<{width}}" + "".join(f"{_fmt(x):>11}" for x in row))
    m = results["metrics"]
    lines.append("  ".join(f"{k} {'-' if v is None else f'{v:.2f}'}" for k, v in m.items()))
    return "\n".join(lines)


def format_comparison(runs: list[dict]) -> str:
    """One line of AP / BWT / FWT / forgetting per run (results.json contents), as text."""
    width = max(len(r["method"]) for r in runs) + 2
    lines = [f"{'method':<{width}}" + "".join(f"{k:>11}" for k in ("AP", "BWT", "FWT", "forgetting"))]
    for r in runs:
        m = r["metrics"]
        lines.append(f"{r['method']:<{width}}" + "".join(
            f"{'-' if m.get(k) is None else f'{m[k]:.1f}':>11}" for k in ("AP", "BWT", "FWT", "forgetting")))
    return "\n".join(lines)


def heatmap(results: dict, path: str) -> str:
    """Write the accuracy matrix as a PNG heatmap; returns the path."""
    _save(heatmap_figure(results), path)
    return path


def heatmap_figure(results: dict):
    """The accuracy matrix as a matplotlib heatmap figure (the caller closes it)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    matrix = np.array(results["matrix"], dtype=float)
    tasks = results["tasks"]
    fig, ax = plt.subplots(figsize=(1.2 * len(tasks) + 2, 0.8 * len(matrix) + 1.5))
    im = ax.imshow(matrix, vmin=0, vmax=100, cmap="viridis")
    ax.set_xticks(range(len(tasks)), tasks, rotation=30, ha="right")
    rows = tasks if len(matrix) == len(tasks) else ["joint"]
    ax.set_yticks(range(len(rows)), [f"after {t}" for t in rows])
    for i in range(matrix.shape[0]):
        for j in range(matrix.shape[1]):
            ax.text(j, i, f"{matrix[i, j]:.0f}", ha="center", va="center",
                    color="white" if matrix[i, j] < 60 else "black")
    ax.set_title(f"{results['method']}: score (%) on task j after training task i")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    return fig


def budget_plot(results: dict, path: str) -> str | None:
    """Plot per-layer bottleneck budgets r_eff of every task (OA-Adapter's ``method_report["r_eff"]``,
    ``{site: [task][layer]}``), one panel per site; returns the path, or None when the run has none."""
    report = results.get("method_report") or {}
    r_eff = report.get("r_eff")
    if not isinstance(r_eff, dict) or not r_eff:
        return None
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    tasks = results["tasks"]
    fig, axes = plt.subplots(1, len(r_eff), figsize=(5 * len(r_eff), 3.5), squeeze=False, sharey=True)
    for ax, (site, per_task) in zip(axes[0], sorted(r_eff.items())):
        for t, layers in enumerate(per_task):
            ax.plot(range(len(layers)), layers, marker="o", ms=3, label=tasks[t] if t < len(tasks) else f"task {t}")
        ax.set_title(site)
        ax.set_xlabel("layer")
        ax.set_ylim(-0.5, report.get("r_max", max(max(x) for x in per_task)) + 0.5)
    axes[0][0].set_ylabel("r_eff (active dims)")
    axes[0][-1].legend(fontsize="small")
    used, allocated = report.get("adapter_params_used"), report.get("adapter_params_allocated")
    title = f"{results['method']}: budget per layer and task"
    if used is not None and allocated:
        title += f" — {used:,} of {allocated:,} adapter parameters used ({100 * used / allocated:.1f}%)"
    fig.suptitle(title)
    _save(fig, path)
    return path


def _save(fig, path: str) -> None:
    """Write a figure as PNG atomically (temporary file, then ``os.replace``) and close it."""
    import matplotlib.pyplot as plt

    fig.tight_layout()
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
