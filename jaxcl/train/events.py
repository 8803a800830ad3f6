"""TensorBoard event files of a run (``RUN_DIR/tensorboard``, written by ``event_file``).

The events are the records of ``log.jsonl`` as they are logged, so the two always agree:

  ``train/<name>``  every number of a step record (loss, ce, lr, seconds, the method's step metrics)
                    at the run's global step (1, 2, ... over all tasks);
  ``eval/<task>``   each task's score of an evaluation record, at the global step it was taken
                    (0: the base model; then the last step of each task); ``routing/<task>`` the same
                    for a routing method's routing accuracy;
  ``metrics/<name>`` AP, BWT, FWT, forgetting of the finished run, and the accuracy matrix as the
                    image ``accuracy_matrix``, at the last step.

A resumed run counts the step records its log kept and starts its file with a restart at the next
step (a ``SessionLog.START``, what ``SummaryWriter(purge_step=)`` writes), so TensorBoard drops what
the killed run wrote after its checkpoint and shows what an uninterrupted run would.
"""
from __future__ import annotations

import io
import json
import os
import time

from jaxcl.train import event_file

FOLDER = "tensorboard"
# step-record fields that say where the step is rather than measure it
_POSITION = ("event", "phase", "step")


def _steps(log_path: str) -> int:
    """The step records already in ``log_path``."""
    if not os.path.exists(log_path):
        return 0
    with open(log_path, encoding="utf-8") as f:
        return sum(json.loads(line)["event"] == "step" for line in f)


class Events:
    """The event file of one run folder, fed the records ``RunFolder`` logs.

    Events are written synchronously, so a flush at each checkpoint puts on disk every event the
    checkpoint covers.
    """

    def __init__(self, out_dir: str, tasks: list[str], log_path: str):
        self.tasks = tasks
        self.steps = _steps(log_path)
        folder = os.path.join(out_dir, FOLDER)
        os.makedirs(folder, exist_ok=True)
        # the nanosecond suffix orders (and keeps apart) the files of runs resumed within a second
        self.file = event_file.EventFile(folder, suffix=f".{time.time_ns()}")
        if self.steps:  # a resumed run: TensorBoard drops the earlier files' events from here on
            self.file.write(event_file.event(self.steps + 1, restart=True))

    def _write(self, value: bytes, step: int) -> None:
        self.file.write(event_file.event(step, values=(value,)))

    def record(self, record: dict) -> None:
        """Write one ``log.jsonl`` record's numbers."""
        if record["event"] == "step":
            self.steps += 1
            for name, value in record.items():
                if name not in _POSITION and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._write(event_file.scalar(f"train/{name}", value), self.steps)
        elif record["event"] == "eval":
            for group, values in (("eval", record["scores"]), ("routing", record.get("routing_accuracy"))):
                for task, value in zip(self.tasks, values or ()):
                    self._write(event_file.scalar(f"{group}/{task}", value), self.steps)

    def results(self, results: dict) -> None:
        """The finished run's metrics and its accuracy matrix as an image."""
        import matplotlib.pyplot as plt

        from jaxcl.train.report import heatmap_figure

        for name, value in results["metrics"].items():
            if value is not None:
                self._write(event_file.scalar(f"metrics/{name}", value), self.steps)
        figure = heatmap_figure(results)
        png = io.BytesIO()
        figure.savefig(png, format="png")
        plt.close(figure)
        self._write(event_file.png_image("accuracy_matrix", png.getvalue()), self.steps)
        self.flush()

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()
