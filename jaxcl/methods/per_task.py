"""Per-task oracle: one LoRA per task, each task evaluated with its own LoRA.

An upper reference for routing methods (Any-SSR, SAPT): the task id of every evaluation example is
given, which a real continual learner does not get. Tasks not trained yet use the base model.
"""
import dataclasses

import jax
import jax.numpy as jnp

from jaxcl.methods.lora_bank import LoRABank, num_slots


def one_hot_ctx(columns: jax.Array, num_columns: int) -> dict:
    """Per-example LoRA weights selecting bank column ``columns[b]``."""
    return {"task_weights": jax.nn.one_hot(columns, num_columns, dtype=jnp.float32)}


@dataclasses.dataclass(frozen=True)
class PerTask(LoRABank):
    name = "per_task"

    def train_ctx(self, model, state, batch):
        del model
        # Examples of the task being trained use the current LoRA (last column); replayed examples
        # of finished tasks use their own slot.
        slots = num_slots(state)
        ids = batch["task_ids"]
        current = jnp.max(ids)
        return one_hot_ctx(jnp.where(ids == current, slots, ids), slots + 1)

    def eval_ctx(self, model, state, batch, task):
        # Every task is evaluated after its LoRA was stored in its slot (or before: a zero slot).
        n = batch["input_ids"].shape[0]
        return one_hot_ctx(jnp.full((n,), task), num_slots(state) + 1)
