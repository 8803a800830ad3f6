"""Reader for TRACE: ``{root}/{task}/{train,eval,test}.json``, each a list of ``{"prompt", "answer"}``.

TRACE prompts are used verbatim. ``eval.json`` is not read (validation is carved from train like
every other benchmark). Metrics follow the TRACE paper's per-task choice, with two simplifications:
ScienceQA's answer-letter accuracy is scored as normalised exact match of the whole answer, and
20Minuten (SARI in TRACE) is scored with ROUGE-L.
"""

from __future__ import annotations

import os

from jaxcl.data.files import find_task_dir, name_key, read_records
from jaxcl.data.task import DataError, Example, Task

TRACE_METRICS = {
    "C-STANCE": "accuracy",
    "FOMC": "accuracy",
    "MeetingBank": "rouge_l",
    "Py150": "edit_sim",
    "ScienceQA": "accuracy",
    "NumGLUE-cm": "accuracy",
    "NumGLUE-ds": "accuracy",
    "20Minuten": "rouge_l",
}


def _read_split(path: str) -> list[Example]:
    return [Example(r["prompt"], r["answer"]) for r in read_records(path, ("prompt", "answer"))]


def load_trace_task(root: str, name: str, metric: str | None = None) -> Task:
    """Loads TRACE task ``name``.

    Args:
      root: the TRACE benchmark folder (e.g. ``LLM-CL-Benchmark_5000``).
      name: the task folder name (e.g. ``C-STANCE``).
      metric: overrides the metric; required for task names not in ``TRACE_METRICS``.
    """
    task_dir = find_task_dir(root, name)
    dataset = os.path.basename(task_dir)
    if metric is None:
        by_key = {name_key(k): v for k, v in TRACE_METRICS.items()}
        if name_key(dataset) not in by_key:
            raise DataError(f"{task_dir}: no TRACE metric known for {dataset!r}; known tasks: "
                            f"{list(TRACE_METRICS)} (pass metric= for other tasks)")
        metric = by_key[name_key(dataset)]
    train, test = (_read_split(os.path.join(task_dir, f"{split}.json")) for split in ("train", "test"))
    return Task(dataset, train, test, None, metric)
