"""Loading a continual-learning stream: a list of Tasks from a benchmark folder and an order."""

from __future__ import annotations

import os
from collections.abc import Sequence

from jaxcl.data.cl_benchmark import load_cl_benchmark_task
from jaxcl.data.orders import FORMATS, load_order, order_format
from jaxcl.data.superni import load_superni_task
from jaxcl.data.task import DataError, Task
from jaxcl.data.trace import load_trace_task

# The bundled WordNet stream uses the CL_Benchmark layout (see scripts/build_wordnet_stream.py).
BUNDLED_ROOT = os.path.join(os.path.dirname(__file__), "bundled", "wordnet")

# sources whose prompts open with O-LoRA's "Task:" and "Dataset:" lines
PREFIXED_SOURCES = ("cl_benchmark", "bundled")

_READERS = {
    "cl_benchmark": load_cl_benchmark_task,
    "superni": load_superni_task,
    "trace": load_trace_task,
    "bundled": load_cl_benchmark_task,
}


def load_stream(source: str, order: str | Sequence[str], root: str | None = None,
                metric: str | None = None, *, task_name: bool = True, dataset_name: bool = True) -> list[Task]:
    """Loads the tasks of a stream in training order.

    Args:
      source: ``"bundled"`` (the WordNet stream shipped with jaxcl), ``"cl_benchmark"``,
        ``"superni"`` or ``"trace"``.
      order: an order name (see :func:`jaxcl.data.orders.available_orders`) or a list of task names.
      root: the benchmark folder; ignored (must be None) for ``"bundled"``.
      metric: one metric for every task instead of each format's own (needed for a TRACE-layout
        task whose name the TRACE reader does not know).
      task_name, dataset_name: False leaves the ``Task:`` / ``Dataset:`` line out of CL_Benchmark-layout
        prompts (``"cl_benchmark"``, ``"bundled"``); the other formats' prompts have neither.

    Raises:
      DataError: unknown source or order, an order written for another format, a task missing
        under ``root`` (the message lists the known tasks), or any malformed task file.
    """
    if source not in _READERS:
        raise DataError(f"unknown data source {source!r}; known: {list(FORMATS)}")
    if source == "bundled":
        if root is not None:
            raise DataError(f"data source 'bundled' takes no root folder, got {root!r}")
        root = BUNDLED_ROOT
    elif root is None:
        raise DataError(f"data source {source!r} needs the benchmark root folder")
    if isinstance(order, str):
        if order_format(order) != source:
            raise DataError(f"order {order!r} lists {order_format(order)} tasks, not {source} tasks")
        names = load_order(order)
    else:
        names = list(order)
    if not names:
        raise DataError("the task order is empty")
    if len(set(names)) != len(names):
        raise DataError(f"the task order repeats a task: {names}")
    if source in PREFIXED_SOURCES:
        return [_READERS[source](root, name, metric, task_name=task_name, dataset_name=dataset_name) for name in names]
    return [_READERS[source](root, name, metric) for name in names]


def load_bundled_stream() -> list[Task]:
    """The offline default stream: four WordNet 3.0 tasks in the ``wordnet`` order."""
    return load_stream("bundled", "wordnet")
