"""Task orders, stored as data files ``jaxcl/data/orders/{name}.json``.

Each file is ``{"format": "cl_benchmark" | "superni" | "trace" | "bundled", "tasks": [...],
"source": "...", "aliases": [...]}``. An order is found by its file name or by one of its aliases;
aliases keep other papers' names for the same sequence (SAPT's "order 4" is O-LoRA's order 6, so
``order6.json`` lists ``"sapt_order4"``).
"""

from __future__ import annotations

import os

from jaxcl.data.files import read_json
from jaxcl.data.task import DataError

ORDERS_DIR = os.path.join(os.path.dirname(__file__), "orders")
FORMATS = ("cl_benchmark", "superni", "trace", "bundled")


def _order_files() -> dict[str, str]:
    """Maps every order name and alias to its file."""
    names: dict[str, str] = {}
    for file in sorted(os.listdir(ORDERS_DIR)):
        if file.endswith(".json"):
            path = os.path.join(ORDERS_DIR, file)
            names[file[: -len(".json")]] = path
            for alias in read_json(path).get("aliases", []):
                names[alias] = path
    return names


def available_orders() -> list[str]:
    """All order names and aliases."""
    return sorted(_order_files())


def _read_order(name: str) -> dict:
    files = _order_files()
    if name not in files:
        raise DataError(f"unknown task order {name!r}; known orders: {sorted(files)}")
    path = files[name]
    order = read_json(path)
    tasks = order.get("tasks")
    if not isinstance(tasks, list) or not tasks or not all(isinstance(t, str) for t in tasks):
        raise DataError(f"{path}: 'tasks' must be a non-empty list of task names")
    if order.get("format") not in FORMATS:
        raise DataError(f"{path}: 'format' must be one of {list(FORMATS)}")
    return order


def load_order(name: str) -> list[str]:
    """The task names of order ``name`` (a file name or alias), in training order."""
    return list(_read_order(name)["tasks"])


def order_format(name: str) -> str:
    """The data format an order's task names refer to (one of ``FORMATS``)."""
    return _read_order(name)["format"]
