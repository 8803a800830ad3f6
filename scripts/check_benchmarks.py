"""Loads every task of the benchmark streams jaxcl's experiments use and prints their sizes.

    PYTHONPATH=$PWD python scripts/check_benchmarks.py [ROOT]   # ROOT holds SuperNI/, CL_Benchmark/, TRACE/

(PYTHONPATH: a script's own folder comes first on sys.path, so without it an installed jaxcl is imported.)

A check of the real data (not a test: the tests never need it). Per task: train / test examples,
labels, metric, the longest prompt in characters, and every label or answer that occurs in test
but never in train; one line per DataWarning the readers emit. Exits 1 if a stream fails to load.
"""
from __future__ import annotations

import os
import sys
import warnings

from jaxcl.data import DataError, load_order, load_stream

# (source, sub-folder of ROOT, order or task list): the streams of experiments/*/ and TRACE's four.
STREAMS = {
    "superni_order1": ("superni", "SuperNI", "superni_order1"),
    "long_order4": ("cl_benchmark", "CL_Benchmark", [t for t in load_order("order4") if t != "yahoo"]),
    "standard_order1": ("cl_benchmark", "CL_Benchmark", [t for t in load_order("order1") if t != "yahoo"]),
    "trace4": ("trace", "TRACE", ["C-STANCE", "FOMC", "NumGLUE-cm", "NumGLUE-ds"]),
}


def describe(task) -> str:
    """One line: sizes, label count, metric, longest prompt, answers seen only in test."""
    train_answers = {e.answer for e in task.train}
    unseen = sorted({e.answer for e in task.test} - train_answers)
    labels = len(task.labels) if task.labels else "open"
    longest = max(len(e.prompt) for e in task.train + task.test)
    closed = task.labels is not None or len(train_answers) <= 20
    extra = f"  test-only answers: {unseen[:5]}" if unseen and closed else ""
    return (f"  {task.name:<46} train {len(task.train):>5}  test {len(task.test):>5}  labels {labels!s:>4}  "
            f"{task.metric:<8} longest prompt {longest:>6} chars{extra}")


def main(root: str) -> int:
    failed = 0
    for name, (source, sub, order) in STREAMS.items():
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                tasks = load_stream(source, order, os.path.join(root, sub))
            except DataError as e:
                print(f"{name}: FAILED: {e}")
                failed += 1
                continue
        print(f"{name}: {len(tasks)} tasks, {sum(len(t.train) for t in tasks)} train / "
              f"{sum(len(t.test) for t in tasks)} test examples")
        for task in tasks:
            print(describe(task))
        for w in caught:
            print(f"  warning: {w.message}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1] if len(sys.argv) > 1 else "/work/shared/benchmarks"))
