"""Replay: the current task comes from the step context, never from the rows of a batch, so a
(micro-)batch made only of replayed rows trains nothing of the current task in replay+per_task."""
import jax
import numpy as np
import optax
import pytest

from jaxcl import methods
from jaxcl.methods import ModelInfo, ReplaySpec, StepContext
from jaxcl.methods import axes
from jaxcl.methods.lora_bank import Current

from tiny_cl import EngineSteps, task_info, tiny_llama, tiny_stream


def _rows(stream, task, micro_batches=1):
    """Training rows of ``task`` only (its own task ids), with a leading grad-accumulation axis."""
    batch = next(stream.task_batches([task]))
    batch = {k: v for k, v in batch.items() if k != "real"}
    return {k: np.stack([v] * micro_batches) for k, v in batch.items()}


@pytest.fixture(scope="module")
def at_task_1(stream_root, tiny_tokenizer):
    """replay+per_task while task 1 trains: task 0's LoRA (non-zero) in its slot, a fresh current LoRA."""
    model = tiny_llama(len(tiny_tokenizer))
    stream = tiny_stream(stream_root, tiny_tokenizer)
    method = methods.build("replay+per_task", {"dropout": 0.0})
    state = axes.values(method.init(jax.random.PRNGKey(0), ModelInfo.of(model), 3))
    state = method.begin_task(jax.random.PRNGKey(1), state, task_info(stream, 0, model))
    trained = {s: l._replace(b=0.1 * jax.random.normal(jax.random.PRNGKey(i), l.b.shape))
               for i, (s, l) in enumerate(sorted(state.params.lora.items()))}
    state = method.end_task(state._replace(params=Current(trained)), task_info(stream, 0, model))
    state = method.begin_task(jax.random.PRNGKey(2), state, task_info(stream, 1, model))
    trainer = EngineSteps(method, model, optax.sgd(0.1), stream.spec.max_answer_len)
    return method, stream, state, trainer


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_a_batch_of_replayed_rows_only_leaves_the_current_lora_alone(at_task_1, micro_batches):
    method, stream, state, trainer = at_task_1
    assert method.replay == ReplaySpec(0.2, 50)
    replayed = _rows(stream, 0, micro_batches)
    after, _, metrics = trainer.run(state, [replayed], StepContext.start(1, 1, 6))
    assert float(metrics[0]["loss"]) > 0  # the rows did run through task 0's LoRA ...
    # ... and trained nothing: task 0's slot is fixed, and no row belongs to the current task 1
    jax.tree.map(np.testing.assert_array_equal, after.params, state.params)


def test_rows_of_the_current_task_train_the_current_lora(at_task_1):
    _, stream, state, trainer = at_task_1
    after, _, _ = trainer.run(state, [_rows(stream, 1)], StepContext.start(1, 1, 6))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after.params), jax.tree.leaves(state.params)))


def test_the_same_replayed_rows_train_the_lora_when_their_task_is_the_current_one(at_task_1):
    # What a max(task_ids) rule would do: for a batch of task-0 rows, call task 0 current. Here the
    # step context says so explicitly; the rows then use the current LoRA, which trains.
    _, stream, state, trainer = at_task_1
    after, _, _ = trainer.run(state, [_rows(stream, 0)], StepContext.start(0, 1, 6))
    assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(after.params), jax.tree.leaves(state.params)))
