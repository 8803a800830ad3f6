"""TensorBoard event files of a run (``RUN_DIR/tensorboard``, written with tensorboardX).

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

import json
import os
import time

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

    Events are written synchronously (tensorboardX's record writer, not its ``SummaryWriter``, whose
    background queue ``flush`` does not drain), so a flush at each checkpoint puts on disk every
    event the checkpoint covers.
    """

    def __init__(self, out_dir: str, tasks: list[str], log_path: str):
        from tensorboardX.event_file_writer import EventsWriter
        from tensorboardX.proto.event_pb2 import Event, SessionLog

        self.tasks = tasks
        self.steps = _steps(log_path)
        folder = os.path.join(out_dir, FOLDER)
        os.makedirs(folder, exist_ok=True)
        # the nanosecond suffix orders (and keeps apart) the files of runs resumed within a second
        self.file = EventsWriter(os.path.join(folder, "events"), filename_suffix=f".{time.time_ns()}")
        if self.steps:  # a resumed run: TensorBoard drops the earlier files' events from here on
            self.file.write_event(Event(wall_time=time.time(), step=self.steps + 1,
                                        session_log=SessionLog(status=SessionLog.START)))

    def _write(self, summary, step: int) -> None:
        from tensorboardX.proto.event_pb2 import Event

        self.file.write_event(Event(wall_time=time.time(), step=step, summary=summary))

    def record(self, record: dict) -> None:
        """Write one ``log.jsonl`` record's numbers."""
        from tensorboardX.summary import scalar

        if record["event"] == "step":
            self.steps += 1
            for name, value in record.items():
                if name not in _POSITION and isinstance(value, (int, float)) and not isinstance(value, bool):
                    self._write(scalar(f"train/{name}", value), self.steps)
        elif record["event"] == "eval":
            for group, values in (("eval", record["scores"]), ("routing", record.get("routing_accuracy"))):
                for task, value in zip(self.tasks, values or ()):
                    self._write(scalar(f"{group}/{task}", value), self.steps)

    def results(self, results: dict) -> None:
        """The finished run's metrics and its accuracy matrix as an image."""
        from tensorboardX.summary import image, scalar
        from tensorboardX.utils import figure_to_image

        from jaxcl.train.report import heatmap_figure

        for name, value in results["metrics"].items():
            if value is not None:
                self._write(scalar(f"metrics/{name}", value), self.steps)
        self._write(image("accuracy_matrix", figure_to_image(heatmap_figure(results))), self.steps)
        self.flush()

    def flush(self) -> None:
        self.file.flush()

    def close(self) -> None:
        self.file.close()
