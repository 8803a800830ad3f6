"""Replay: keep a few examples of every finished task and mix them into later batches.

Combinable with any method (``replay+olora``); plain ``replay`` is ``replay+seq_lora``. The memory
and the mixing are seeded (``jaxcl.data.batching.memory_indices`` / ``replay_batch``), so a resumed
run rebuilds exactly the same batches.
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class ReplayConfig:
    fraction: float = 0.2      # share of each batch drawn from the memory
    per_task: int = 50         # examples stored per finished task

    def __post_init__(self):
        if not 0.0 <= self.fraction < 1.0:
            raise ValueError(f"replay fraction must be in [0, 1), got {self.fraction}")
        if self.per_task < 1:
            raise ValueError(f"replay per_task must be >= 1, got {self.per_task}")

    def replayed_rows(self, batch_size: int) -> int:
        """Rows of a batch drawn from the memory (as ``batching.replay_batch`` counts them)."""
        return round(batch_size * self.fraction)
