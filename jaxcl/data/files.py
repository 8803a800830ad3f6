"""Reading benchmark files: JSON with file/line errors, and finding a task's folder by name."""

from __future__ import annotations

import json
import os
import re

from jaxcl.data.task import DataError


def read_json(path: str):
    """Parses a JSON file, raising one DataError that names the file and line on failure."""
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as e:
        raise DataError(f"{path}: cannot read file ({e.strerror})") from None
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{path}:{e.lineno}:{e.colno}: malformed JSON ({e.msg})") from None


def name_key(name: str) -> str:
    """The spelling-insensitive form used to match task names ("SST-2" == "sst2" == "Sst_2")."""
    return re.sub(r"[^0-9a-z]", "", name.lower())


def task_dirs(root: str) -> dict[str, list[str]]:
    """Maps every task name under ``root`` to its folder(s).

    A task folder holds a ``train.json`` and sits either directly under ``root`` or one level
    deeper (``root/{TaskType}/{name}``, the CL_Benchmark layout).

    Raises:
      DataError: ``root`` is not a folder.
    """
    if not os.path.isdir(root):
        raise DataError(f"{root}: benchmark root is not a folder")
    found: dict[str, list[str]] = {}
    for top in sorted(os.listdir(root)):
        top_path = os.path.join(root, top)
        if not os.path.isdir(top_path):
            continue
        candidates = [(top, top_path)]
        candidates += [(sub, os.path.join(top_path, sub)) for sub in sorted(os.listdir(top_path))]
        for name, path in candidates:
            if os.path.isfile(os.path.join(path, "train.json")):
                found.setdefault(name, []).append(path)
    return found


def find_task_dir(root: str, name: str) -> str:
    """Finds the folder of task ``name`` anywhere under ``root`` (spelling-insensitive match).

    Raises:
      DataError: no task (or more than one) matches; the message lists the known task names.
    """
    known = task_dirs(root)
    matches = known.get(name) or [
        path for task, paths in known.items() if name_key(task) == name_key(name) for path in paths
    ]
    if len(matches) == 1:
        return matches[0]
    if matches:
        raise DataError(f"{root}: task {name!r} matches several folders: {matches}")
    raise DataError(f"{root}: unknown task {name!r}; known tasks: {sorted(known, key=str.lower) or 'none'}")


def read_records(path: str, fields: tuple[str, ...]) -> list[dict]:
    """Reads a non-empty JSON list of objects whose ``fields`` are all strings.

    Raises:
      DataError: naming the file, and the example index for a bad record.
    """
    records = read_json(path)
    wanted = ", ".join(repr(f) for f in fields)
    if not isinstance(records, list):
        raise DataError(f"{path}: expected a JSON list of objects with {wanted}")
    if not records:
        raise DataError(f"{path}: the split is empty")
    for i, record in enumerate(records):
        if not isinstance(record, dict):
            raise DataError(f"{path}: example {i}: expected an object with {wanted}")
        for field in fields:
            if not isinstance(record.get(field), str):
                raise DataError(f"{path}: example {i}: missing or non-string {field!r}")
    return records
