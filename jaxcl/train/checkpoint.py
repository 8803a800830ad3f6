"""Orbax checkpoints of a continual-learning run, and atomic JSON writes.

A checkpoint holds everything a run needs to continue bit-for-bit: the trained parameters and the
optimizer state of the current task, the method's fixed state (past adapters, routers, masks), and a
JSON record of where the run is (task, step within the task, the accuracy-matrix rows so far, the
base scores, the step log position). Data order and dropout keys are pure functions of
``(seed, task, step)``, so nothing else needs saving.
"""
from __future__ import annotations

import json
import os
import tempfile
from typing import Any, Optional

import jax
import orbax.checkpoint as ocp


def write_json_atomic(path: str, obj: Any) -> None:
    """Write JSON to ``path`` through a temporary file and ``os.replace`` (never half-written)."""
    directory = os.path.dirname(os.path.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-", suffix=".json")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(obj, f, indent=1)
            f.write("\n")
            f.flush()
            os.fsync(f.fileno())  # the content is on disk before the name points at it
        os.replace(tmp, path)
        _fsync_directory(directory)  # and the new name is on disk too
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _fsync_directory(directory: str) -> None:
    if not hasattr(os, "O_DIRECTORY"):  # Windows: a directory cannot be opened for fsync
        return
    fd = os.open(directory, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class Checkpointer:
    """Named pytree items plus a JSON ``meta`` record per checkpoint, restored one item at a time."""

    def __init__(self, directory: str, max_to_keep: int = 2):
        self.directory = os.path.abspath(os.path.join(directory, "checkpoints"))
        self._manager = ocp.CheckpointManager(
            self.directory,
            options=ocp.CheckpointManagerOptions(max_to_keep=max_to_keep, enable_async_checkpointing=False,
                                                 create=True))

    def save(self, step: int, items: dict, meta: dict) -> None:
        """Save ``items`` (name -> pytree) and ``meta``; ``step`` only grows (it names the checkpoint)."""
        args = {name: ocp.args.StandardSave(tree) for name, tree in items.items()}
        self._manager.save(step, args=ocp.args.Composite(meta=ocp.args.JsonSave(meta), **args), force=True)
        self._manager.wait_until_finished()

    def latest(self) -> Optional[tuple[int, dict]]:
        """``(step, meta)`` of the newest checkpoint, or None."""
        step = self._manager.latest_step()
        if step is None:
            return None
        return step, self._manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def delete(self, step: int) -> None:
        self._manager.delete(step)

    def has(self, step: int, name: str) -> bool:
        return os.path.isdir(os.path.join(self.directory, str(step), name))

    def restore(self, step: int, name: str, target: Any = None) -> Any:
        """One item; without ``target`` its containers come back as saved dicts of arrays."""
        out = self._manager.restore(step, args=ocp.args.Composite(**{name: ocp.args.StandardRestore(target)}))[name]
        return jax.tree.map(jax.numpy.asarray, out)

    def close(self) -> None:
        self._manager.close()
