"""Reading results.json back: a printed accuracy matrix with metrics, and a heatmap PNG."""
from __future__ import annotations

import json
import os


class ReportError(ValueError):
    """results.json is missing or malformed."""


REQUIRED = ("method", "model", "tasks", "matrix", "metrics")


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


def heatmap(results: dict, path: str) -> str:
    """Write the accuracy matrix as a PNG heatmap; returns the path."""
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
    tmp = path + ".tmp.png"
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, path)
    return path
