"""The persistent state of a run: its progress record, log files and checkpoints in the run folder.

``out_dir`` holds ``results.json`` (atomically, only when the run is complete), ``log.jsonl`` (one
line per optimizer step and per evaluation), ``predictions.jsonl`` (one line per test prompt per
evaluation), Orbax ``checkpoints/`` and, unless the config turns them off, TensorBoard event
files (``events.py``). A checkpoint saves the trained parameters, the optimizer
state of the current task, the method's fixed state and the ``Progress`` record (where the run is,
the rows so far, how many lines each log had), so a resumed run truncates the logs to what the
checkpoint covers and ends with the same results as an uninterrupted one. Only the first process
of a multi-host run writes the logs and results (Orbax coordinates its own checkpoint writes).
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Optional

import jax

from jaxcl.train.checkpoint import Checkpointer, write_json_atomic
from jaxcl.train.events import Events


class RunError(ValueError):
    """The run cannot start (e.g. its output folder holds another run)."""


@dataclasses.dataclass
class Progress:
    """Where a run is (a JSON record saved with every checkpoint)."""

    phase: int = 0                 # the task (phase) being trained or next to train
    step: int = 0                  # optimizer steps taken in that phase
    total_steps: int = 0           # optimizer steps since the start of the run
    rows: list = dataclasses.field(default_factory=list)          # accuracy-matrix rows so far
    routing: list = dataclasses.field(default_factory=list)       # routing accuracy rows so far
    base_scores: Optional[list] = None
    val_loss: list = dataclasses.field(default_factory=list)
    log_lines: int = 0
    prediction_lines: int = 0
    checkpoint: int = 0
    seconds: float = 0.0           # wall time of the run so far (across resumes)
    train_seconds: float = 0.0     # in the train loop (steps, batches, logging)
    eval_seconds: float = 0.0      # in evaluation (generation, scoring)
    hook_seconds: float = 0.0      # in the method's begin_task / end_task (MIST's scoring, SAPT's routing fit, ...)

    @classmethod
    def from_json(cls, values: dict) -> "Progress":
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in values.items() if k in known})


class RunFolder:
    """The files of one run."""

    def __init__(self, out_dir: str, resume: bool, tensorboard: bool = False):
        self.out_dir = out_dir
        self.tensorboard, self.tasks, self.events = tensorboard, [], None
        self.primary = jax.process_index() == 0
        self.results_path = os.path.join(out_dir, "results.json")
        self.log_path = os.path.join(out_dir, "log.jsonl")
        self.predictions_path = os.path.join(out_dir, "predictions.jsonl")
        self.config_path = os.path.join(out_dir, "config.json")
        has_run = os.path.exists(self.results_path) or os.path.isdir(os.path.join(out_dir, "checkpoints"))
        if has_run and not resume:
            raise RunError(f"{out_dir} already holds a run (results.json or checkpoints/); pass --resume to continue "
                           "it or choose another --out")

    def open(self, tasks: list = ()) -> None:
        """Create the folder and the checkpointer (after every process has checked the folder);
        ``tasks`` names the columns of the evaluation records."""
        os.makedirs(self.out_dir, exist_ok=True)
        self.tasks = list(tasks)
        self.checkpoints = Checkpointer(self.out_dir)

    def resume(self) -> Optional[tuple[int, Progress]]:
        """``(checkpoint step, progress)`` of the newest checkpoint (logs truncated to it), or None."""
        latest = self.checkpoints.latest()
        if latest is None:  # the run starts over: what an earlier attempt logged goes
            if self.primary:
                _truncate(self.log_path, 0)
                _truncate(self.predictions_path, 0)
            return None
        step, meta = latest
        progress = Progress.from_json(meta)
        if self.primary:
            _truncate(self.log_path, progress.log_lines)
            _truncate(self.predictions_path, progress.prediction_lines)
        return step, progress

    def saved_config(self) -> Optional[dict]:
        """The config the run in this folder was started (or last resumed) with, or None."""
        if not os.path.exists(self.config_path):
            return None
        with open(self.config_path, encoding="utf-8") as f:
            return json.load(f)

    def write_config(self, config: dict) -> None:
        if self.primary:
            write_json_atomic(self.config_path, config)

    def drop(self, checkpoint: int) -> None:
        """Delete checkpoint number ``checkpoint`` (its parameters are known to be bad)."""
        self.checkpoints.delete(checkpoint)

    def log(self, progress: Progress, record: dict) -> None:
        progress.log_lines += 1
        if self.primary:
            if self.tensorboard and self.events is None:  # now, after a resume truncated the log
                self.events = Events(self.out_dir, self.tasks, self.log_path)
            _append(self.log_path, [record])
            if self.events is not None:
                self.events.record(record)

    def predictions(self, progress: Progress, after: str, rows: list) -> None:
        progress.prediction_lines += len(rows)
        if self.primary:
            _append(self.predictions_path, [dict(after=after, **row) for row in rows])

    def save(self, progress: Progress, items: dict) -> None:
        """A checkpoint of ``items`` (name -> pytree; empty pytrees are left out: Orbax refuses them)."""
        progress.checkpoint += 1
        if self.events is not None:  # the events a checkpoint covers are on disk with it
            self.events.flush()
        items = {name: tree for name, tree in items.items() if jax.tree.leaves(tree)}
        self.checkpoints.save(progress.checkpoint, items, dataclasses.asdict(progress))

    def restore(self, step: int, name: str, target: Any) -> Any:
        if not jax.tree.leaves(target):
            return target
        return self.checkpoints.restore(step, name, target)

    def has(self, step: int, name: str) -> bool:
        return self.checkpoints.has(step, name)

    def write_results(self, results: dict) -> None:
        if self.primary:
            write_json_atomic(self.results_path, results)
            if self.events is not None:
                self.events.results(results)

    def close(self) -> None:
        self.checkpoints.close()
        if self.events is not None:
            self.events.close()


def _append(path: str, records: list) -> None:
    with open(path, "a", encoding="utf-8") as f:
        for record in records:
            f.write(json.dumps(record) + "\n")


def _truncate(path: str, lines: int) -> None:
    """Drop lines written after the checkpoint we resume from (they will be written again)."""
    if not os.path.exists(path):
        return
    with open(path, encoding="utf-8") as f:
        kept = f.readlines()[:lines]
    tmp = path + ".tmp"
    with open(tmp, "w", encoding="utf-8") as f:
        f.writelines(kept)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
