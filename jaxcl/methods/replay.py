"""Replay: keep a few examples of every finished task and mix them into later batches.

Math: docs/replay.md.

``Replay(inner)`` (config ``replay+<method>``; plain ``replay`` is ``replay+seq_lora``) runs the
inner method unchanged and declares the replay that the engine's batch pipeline carries out: once
a task has finished, ``per_task`` of its training examples (a seeded choice) are kept, and
``round(batch_size · fraction)`` rows of every later batch are drawn from that memory. An epoch
still counts the current task's rows: a batch holds ``batch_size − replayed`` of them, so an epoch
takes ``ceil(n / (batch_size − replayed))`` steps. Replayed rows carry their own ``task_ids``; the
task being trained comes from ``StepContext.task``, never from the rows of a batch. The memory and
the mixing are seeded, so a resumed run rebuilds exactly the same batches.

References:
  Experience replay as the CL baseline of e.g. Chaudhry et al., 2019 (https://arxiv.org/abs/1902.10486).
"""
from __future__ import annotations

import dataclasses
from typing import final

from jaxcl.methods.base import Method, ReplaySpec, Wrapper


@final
@dataclasses.dataclass(frozen=True)
class Replay(Wrapper):
    """Attributes: ``inner`` (the wrapped method), ``fraction`` (share of each batch from the memory,
    0.2), ``per_task`` (examples kept per finished task, 50). The state is the inner method's."""

    inner: Method
    fraction: float = 0.2
    per_task: int = 50
    name = "replay"

    def __post_init__(self):
        self.replay  # validates the options

    @property
    def replay(self):
        return ReplaySpec(self.fraction, self.per_task)

    def report(self, state):
        return dict(self.inner.report(state), replay={"fraction": self.fraction, "per_task": self.per_task})
