"""The method protocol: a frozen dataclass of pure functions over an explicit state pytree.

A method's state is a dict with two parts:
  ``"train"``: what the optimizer updates during the current task (e.g. the current LoRA);
  ``"fixed"``: what the method keeps but does not train (past adapters, bases, routers, masks).
Both are dicts of arrays (no ``None`` leaves, no empty arrays) so they checkpoint with Orbax as is.

The engine calls, per task ``t``: ``begin_task`` → jitted steps (``adapter`` + ``extra_loss``,
``post_update`` after each optimizer update) → ``end_task`` → evaluation (``eval_ctx`` + ``adapter``).
Methods that train base weights (SeqFT, MIST) say which through ``base_trainable``.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Optional

import jax
import jax.numpy as jnp
import optax

from jaxcl.models.sites import Adapter

State = dict
SiteShapes = dict  # {site name: (num_layers, d_in, d_out)}


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    """What a method may know about the task it starts or ends.

    Attributes:
      index: position of the task (phase) in the stream.
      num_tasks: length of the stream.
      name: the task's name.
      batches: ``() -> iterator`` over the task's training data, every example once in a fixed
        order, as training batches (``input_ids, attention_mask, loss_mask``, ... of
        ``jaxcl.data.collate_train``; ``loss_mask`` marks the answer, so prompt tokens are
        ``attention_mask * (1 - loss_mask)``) plus ``task_ids`` (B,) and ``real`` (B,) bool (False on
        rows that only fill up the last batch). For methods that fit something on the task's data
        (Any-SSR's router, MIST's sensitivity).
      validation_batches: the same over the task's validation split (carved from its training data;
        the iterator is empty when the split is), e.g. for SAPT's mean attention.
      model: the NNX model with the current base weights (frozen features, sensitivity gradients).
    """

    index: int
    num_tasks: int
    name: str = ""
    batches: Optional[Callable[[], Any]] = None
    model: Any = None
    validation_batches: Optional[Callable[[], Any]] = None


@dataclasses.dataclass(frozen=True)
class Method:
    """The identity method: nothing trained, the base model as is. Subclasses override."""

    name: ClassVar[str] = "base"
    joint: ClassVar[bool] = False   # True: train once on the union of all tasks (MTL)

    def init(self, key: jax.Array, site_shapes: SiteShapes, num_tasks: int) -> State:
        """State before the first task of a stream of ``num_tasks`` tasks."""
        del key, site_shapes, num_tasks
        return {"train": {}, "fixed": {}}

    def begin_task(self, key: jax.Array, state: State, task: TaskInfo, site_shapes: SiteShapes) -> State:
        del key, task, site_shapes
        return state

    def base_trainable(self, path: str) -> bool:
        """Whether the base-model parameter at ``path`` (e.g. ``"layers/wq"``) is trained."""
        del path
        return False

    def adapter(self, state: State, ctx: Any, key: Optional[jax.Array] = None) -> Optional[Adapter]:
        """The adapter for one forward pass; ``key`` is given in training (dropout), ``None`` at eval."""
        del state, ctx, key
        return None

    def train_ctx(self, model: Any, state: State, batch: dict) -> Any:
        """Per-example context while training; ``batch["task_ids"]`` (B,) names each example's task.
        ``model`` is the model of the forward pass (its weights are the current base weights)."""
        del model, state, batch
        return None

    def eval_ctx(self, model: Any, state: State, batch: dict, task: int) -> Any:
        """Per-example context at evaluation of task ``task``. Only oracles may use ``task``."""
        del model, state, batch, task
        return None

    def route(self, model: Any, state: State, batch: dict) -> Optional[jax.Array]:
        """Routing methods return the task (B,) int32 they pick for each example of an evaluation
        batch (left-padded prompts); the engine then reports routing accuracy per task."""
        del model, state, batch
        return None

    def extra_loss(self, state: State, base: Any) -> jax.Array:
        """Regulariser added to the cross-entropy (scalar)."""
        del state, base
        return jnp.zeros((), jnp.float32)

    def transform_grads(self, grads: Any, state: State, key: jax.Array) -> Any:
        """Hook on the gradients of ``{"method": ..., "base": ...}`` before the optimizer."""
        del state, key
        return grads

    def optimizer(self, tx: optax.GradientTransformation) -> optax.GradientTransformation:
        """The optimizer of ``{"method": ..., "base": ...}`` given the run's ``tx``; a method whose
        parts want different optimizers returns an ``optax.multi_transform`` (MIST's backbone part)."""
        return tx

    def post_update(self, state: State) -> State:
        """Hook after each optimizer update (e.g. a hard projection)."""
        return state

    def end_task(self, state: State, task: TaskInfo) -> State:
        del task
        return state

    def report(self, state: State) -> dict:
        """Extra JSON-serialisable facts for results.json."""
        del state
        return {}
