"""The method protocol: a frozen dataclass of pure functions over a typed state.

A method's state is a ``MethodState(params, fixed)``: ``params`` is what the optimizer trains
during the current task (e.g. the current LoRA), ``fixed`` what the method keeps but never
differentiates (past adapters, routers, masks). Both are the method's own NamedTuples of arrays, so
``jax.eval_shape(method.init, ...)`` gives the template a checkpoint is restored into, and a wrong
field name fails at once. Wrappers (``mist+``, ``replay+``) keep the inner method's state as a field
of their own, so nothing can collide.

``init`` creates every array through ``jaxcl.methods.axes.logical`` with the logical axes of each
dimension; the engine reads those names once (``axes.split``) to place the state on the device
mesh, and from then on the hooks see plain arrays.

The engine calls, for each task (phase) ``t``: ``begin_task`` → jitted steps (``train_ctx`` +
``adapter`` in the forward, ``extra_loss``; then ``transform_grads``, the optimizer and
``post_update``) → ``end_task`` → evaluation (``eval_ctx`` + ``adapter``, and ``route`` for methods
that route). Every step hook receives the ``StepContext``: the task being trained and the step
counters, so no method keeps counters in trainable leaves.
"""
from __future__ import annotations

import abc
import dataclasses
from typing import Any, Callable, ClassVar, Mapping, NamedTuple, Optional

import jax
import jax.numpy as jnp
import optax

from jaxcl.models.sites import Adapter


class MethodState(NamedTuple):
    """Attributes:
      params: the trained part (a pytree of arrays; the optimizer's parameters).
      fixed: the kept, untrained part (a pytree of arrays).
    """

    params: Any
    fixed: Any


class StepContext(NamedTuple):
    """Where training stands, passed to every step hook (traced int32 scalars under ``jit``).

    Attributes:
      task: index of the task (phase) being trained.
      step: optimizer steps already taken in this task.
      num_steps: optimizer steps this task trains for (learning-rate schedules).
      total_step: optimizer steps already taken since the start of the run.
    """

    task: jax.Array
    step: jax.Array
    num_steps: jax.Array
    total_step: jax.Array

    @classmethod
    def start(cls, task: int, num_steps: int, total_step: int, step: int = 0) -> "StepContext":
        return cls(*(jnp.asarray(v, jnp.int32) for v in (task, step, num_steps, total_step)))

    def advance(self) -> "StepContext":
        return self._replace(step=self.step + 1, total_step=self.total_step + 1)


class ModelInfo(NamedTuple):
    """What a method may know about the model when it creates its state.

    Attributes:
      site_shapes: ``{site: (num_layers, d_in, d_out)}`` of every adaptable projection.
      site_axes: ``{site: (in_axis, out_axis)}`` logical axis names of each site's input and output.
      hidden_size: the model width d (input embeddings, residual stream).
      encoder_decoder: True for T5-style models.
    """

    site_shapes: Mapping[str, tuple[int, int, int]]
    site_axes: Mapping[str, tuple[str, str]]
    hidden_size: int
    encoder_decoder: bool

    @classmethod
    def of(cls, model) -> "ModelInfo":
        shapes, axes = model.site_shapes(), model.site_axes()
        # the width is the input width of any site that reads the residual stream (axis "embed")
        width = next(shapes[s][1] for s in sorted(shapes) if axes[s][0] == "embed")
        return cls(shapes, axes, width, model.is_encoder_decoder)


@dataclasses.dataclass(frozen=True)
class TaskInfo:
    """What a method may know about the task it starts or ends (host side, outside ``jit``).

    Attributes:
      index: position of the task (phase) in the stream.
      num_tasks: length of the stream.
      name: the task's name.
      batches: ``() -> iterator`` over the task's training data, every example once in a fixed
        order, as fixed-shape training batches (``input_ids, attention_mask, loss_mask``, ... of
        ``jaxcl.data.collate_train``; ``loss_mask`` marks the answer, so prompt tokens are
        ``attention_mask * (1 - loss_mask)``) plus ``task_ids`` (B,) and ``real`` (B,) bool (False on
        rows that only fill up the last batch).
      validation_batches: the same over the task's validation split (carved from its training data;
        the iterator is empty when the split is).
      model: the NNX model with the current base weights (frozen features, sensitivity gradients).
      total_steps: optimizer steps taken since the start of the run (at ``end_task``: this task's
        included).
    """

    index: int
    num_tasks: int
    name: str = ""
    batches: Optional[Callable[[], Any]] = None
    model: Any = None
    validation_batches: Optional[Callable[[], Any]] = None
    total_steps: int = 0


@dataclasses.dataclass(frozen=True)
class ReplaySpec:
    """Replay of stored examples of finished tasks in later training batches.

    Attributes:
      fraction: share of each batch drawn from the memory (once a task has finished).
      per_task: examples kept per finished task.
    """

    fraction: float = 0.2
    per_task: int = 50

    def __post_init__(self):
        if not 0.0 <= self.fraction < 1.0:
            raise ValueError(f"replay fraction must be in [0, 1), got {self.fraction}")
        if self.per_task < 1:
            raise ValueError(f"replay per_task must be >= 1, got {self.per_task}")

    def replayed_rows(self, batch_size: int) -> int:
        """Rows of a batch drawn from the memory."""
        return round(batch_size * self.fraction)


class Method(abc.ABC):
    """A continual-learning method (abstract). Concrete methods are final frozen dataclasses.

    A subclass provides ``init`` and ``adapter`` and may replace the optional hooks, whose defaults
    do nothing. It declares what it offers through class attributes instead of being probed:
    ``joint`` (train once on the union of all tasks: MTL) and ``routes`` (``route`` picks a task
    per example; the engine then reports routing accuracy).
    """

    name: ClassVar[str]
    joint: ClassVar[bool] = False
    routes: ClassVar[bool] = False

    @abc.abstractmethod
    def init(self, key: jax.Array, model: ModelInfo, num_tasks: int) -> MethodState:
        """State before the first task of a stream of ``num_tasks`` tasks, with every array made
        by ``axes.logical`` (the engine reads the axis names, then unboxes)."""

    @abc.abstractmethod
    def adapter(self, state: MethodState, ctx: Any, key: Optional[jax.Array] = None) -> Optional[Adapter]:
        """The adapter of one forward pass; ``key`` is given in training (dropout), ``None`` at eval."""

    # -- optional hooks ----------------------------------------------------------------------------
    def begin_task(self, key: jax.Array, state: MethodState, task: TaskInfo) -> MethodState:
        del key, task
        return state

    def end_task(self, state: MethodState, task: TaskInfo) -> MethodState:
        del task
        return state

    def base_trainable(self, path: str) -> bool:
        """Whether the base-model parameter at ``path`` (e.g. ``"layers/q"``) is trained."""
        del path
        return False

    def frozen_below(self, num_layers: int) -> int:
        """The number of bottom layers whose backbone weights must never change (a router reads
        them: Any-SSR); wrappers that tune the backbone (MIST) leave those layers alone."""
        del num_layers
        return 0

    def train_ctx(self, model: Any, state: MethodState, batch: dict, step: StepContext) -> Any:
        """Per-example context in training. ``batch["task_ids"]`` (B,) names each row's task (replayed
        rows are earlier tasks); ``step.task`` is the task being trained."""
        del model, state, batch, step
        return None

    def eval_ctx(self, model: Any, state: MethodState, batch: dict) -> Any:
        """Per-example context at evaluation; ``batch["task_ids"]`` (B,) may be read by oracles only."""
        del model, state, batch
        return None

    def route(self, model: Any, state: MethodState, batch: dict) -> jax.Array:
        """The task (B,) int32 a routing method (``routes = True``) picks for each prompt of a
        left-padded evaluation batch."""
        raise NotImplementedError(f"{self.name} does not route")

    def extra_loss(self, model: Any, state: MethodState, batch: dict, step: StepContext) -> jax.Array:
        """Regulariser added to the cross-entropy (scalar) of one (micro-)batch; ``model`` is the
        model of the forward pass."""
        del model, state, batch, step
        return jnp.zeros((), jnp.float32)

    def transform_grads(self, grads: Any, state: MethodState, key: jax.Array, step: StepContext) -> Any:
        """Hook on the gradients ``{"method": ..., "base": ...}`` before the optimizer."""
        del state, key, step
        return grads

    def optimizer(self, tx: optax.GradientTransformation) -> optax.GradientTransformation:
        """The optimizer of ``{"method": ..., "base": ...}`` given the run's ``tx``; a method whose
        parts want different optimizers returns an ``optax.multi_transform`` (MIST's backbone part)."""
        return tx

    def post_update(self, state: MethodState, step: StepContext) -> MethodState:
        """Hook after each optimizer update (a projection, a clamp)."""
        del step
        return state

    @property
    def replay(self) -> Optional[ReplaySpec]:
        """Replay of earlier tasks' examples in training batches (``replay+<method>``), or None."""
        return None

    def step_metrics(self, old: MethodState, new: MethodState) -> dict:
        """Scalars (traced) the engine logs per step, comparing the state before and after it."""
        del old, new
        return {}

    def report(self, state: MethodState) -> dict:
        """Extra JSON-serialisable facts for results.json."""
        del state
        return {}


class Wrapper(Method):
    """A method around an ``inner`` method (abstract): every hook is the inner method's until the
    wrapper replaces it (``replay+``, ``mist+``). The subclass declares the ``inner`` field."""

    inner: Method

    @property
    def joint(self):
        return self.inner.joint

    @property
    def routes(self):
        return self.inner.routes

    @property
    def replay(self):
        return self.inner.replay

    def init(self, key, model, num_tasks):
        return self.inner.init(key, model, num_tasks)

    def adapter(self, state, ctx, key=None):
        return self.inner.adapter(state, ctx, key)

    def begin_task(self, key, state, task):
        return self.inner.begin_task(key, state, task)

    def end_task(self, state, task):
        return self.inner.end_task(state, task)

    def base_trainable(self, path):
        return self.inner.base_trainable(path)

    def frozen_below(self, num_layers):
        return self.inner.frozen_below(num_layers)

    def train_ctx(self, model, state, batch, step):
        return self.inner.train_ctx(model, state, batch, step)

    def eval_ctx(self, model, state, batch):
        return self.inner.eval_ctx(model, state, batch)

    def route(self, model, state, batch):
        return self.inner.route(model, state, batch)

    def extra_loss(self, model, state, batch, step):
        return self.inner.extra_loss(model, state, batch, step)

    def transform_grads(self, grads, state, key, step):
        return self.inner.transform_grads(grads, state, key, step)

    def optimizer(self, tx):
        return self.inner.optimizer(tx)

    def post_update(self, state, step):
        return self.inner.post_update(state, step)

    def step_metrics(self, old, new):
        return self.inner.step_metrics(old, new)

    def report(self, state):
        return self.inner.report(state)
