"""Per-task oracle: one LoRA per task, each task evaluated with its own LoRA.

Math: docs/per_task.md.

An upper reference for routing methods (Any-SSR, SAPT): the task id of every evaluation example is
given, which a real continual learner does not get. Tasks not trained yet use the base model (their
slot is still zero).
"""
from __future__ import annotations

import dataclasses
from typing import final

import jax
import jax.numpy as jnp

from jaxcl.methods.lora_bank import IncrementalLoRA, LoRABank


def own_slot_weights(task_ids: jax.Array, current_task: jax.Array, num_slots: int) -> jax.Array:
    """``(B, T + 1)`` one-hot bank weights: rows of the task being trained use the current LoRA
    (column T), rows of other tasks (replayed, or at evaluation) their own slot.

    Examples:
      >>> own_slot_weights(jnp.array([1, 0]), jnp.int32(1), 3).tolist()
      [[0.0, 0.0, 0.0, 1.0], [1.0, 0.0, 0.0, 0.0]]
    """
    columns = jnp.where(task_ids == current_task, num_slots, task_ids)
    return jax.nn.one_hot(columns, num_slots + 1, dtype=jnp.float32)


@final
@dataclasses.dataclass(frozen=True)
class PerTask(IncrementalLoRA):
    name = "per_task"

    def train_ctx(self, model, state, batch, step):
        del model
        return own_slot_weights(batch["task_ids"], step.task, LoRABank.num_slots(state.fixed.past))

    def eval_ctx(self, model, state, batch):
        del model
        # Every task is evaluated after its LoRA moved to its slot (or before training: a zero slot),
        # so no row is "current" (-1 matches no task).
        return own_slot_weights(batch["task_ids"], jnp.int32(-1), LoRABank.num_slots(state.fixed.past))

    def adapter(self, state, ctx, key=None):
        return self.bank.adapter(state.params.lora, state.fixed.past, ctx, key)
