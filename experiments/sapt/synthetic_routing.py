"""SAPT's routing on a small synthetic stream of separable tasks (CPU, about a minute per setting).

Task t's prompts are words of its own block of the vocabulary (ids 8 + 16t .. 23 + 16t) with no
header naming the task, and a one-token answer: the stream of the test
``tests/methods/test_sapt.py::test_routes_prompts_that_do_not_name_their_dataset``, with three tasks
instead of two. Trains through the engine's jitted step (``tests/tiny_cl.EngineSteps``) and prints
the % of each task's held-out prompts routed to it after the last task.

    PYTHONPATH=$PWD:$PWD/tests python experiments/sapt/synthetic_routing.py '{"kl_ratio": 0.1}' '{"kl_ratio": 1.0}'
"""
import functools
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax

from jaxcl.methods import ModelInfo, SAPT, StepContext, TaskInfo, axes
from tiny_cl import EngineSteps, tiny_llama

VOCAB, TASKS, STEPS = 64, 3, 15


def batches(task: int, n_rows: int = 32, batch: int = 8, seed: int = 0) -> list[dict]:
    rng = np.random.default_rng([seed, task])
    low = 8 + 16 * task
    out = []
    for _ in range(n_rows // batch):
        ids = rng.integers(low, low + 16, (batch, 8)).astype(np.int32)
        ids[:, 6] = 4 + task  # the answer
        out.append({"input_ids": ids, "attention_mask": (np.arange(8)[None] < 7).astype(np.int32).repeat(batch, 0),
                    "loss_mask": (np.arange(8)[None] == 6).astype(np.float32).repeat(batch, 0),
                    "task_ids": np.full(batch, task, np.int32), "real": np.ones(batch, bool)})
    return out


def routing(options: dict) -> list[float]:
    """``options``: SAPT's, plus the stream's ``rows`` (training prompts a task, 32), ``repeats``
    (passes over them, 15) and ``lr`` (3e-2)."""
    options = dict(options)
    rows, repeats, lr = options.pop("rows", 32), options.pop("repeats", STEPS), options.pop("lr", 3e-2)
    model = tiny_llama(VOCAB)
    method = SAPT(**dict({"pseudo_source": "real", "pseudo_min": 4}, **options))
    trainer = EngineSteps(method, model, optax.adam(lr), max_targets=2)
    state = axes.values(method.init(jax.random.PRNGKey(0), ModelInfo.of(model), TASKS))
    total = 0
    for t in range(TASKS):
        info = TaskInfo(t, TASKS, f"task{t}", batches=functools.partial(iter, batches(t, rows)), model=model)
        state = method.begin_task(jax.random.PRNGKey(10 + t), state, info)
        feed = [{k: v[None] for k, v in b.items() if k != "real"} for b in batches(t, rows)] * repeats
        state, _, _ = trainer.run(state, feed, StepContext.start(t, len(feed), total), key_seed=t)
        total += len(feed)
        state = method.end_task(state, info)
    out = []
    for t in range(TASKS):
        hits = [np.asarray(method.route(model, state, {"input_ids": jnp.asarray(b["input_ids"][:, :6]),
                                                       "attention_mask": jnp.ones((8, 6), jnp.int32)})) == t
                for b in batches(t, seed=99)]
        out.append(round(100 * float(np.mean(hits)), 1))
    return out


if __name__ == "__main__":
    for arg in sys.argv[1:] or ["{}"]:
        print(json.dumps({"options": json.loads(arg), "routing_after_last_task": routing(json.loads(arg))}), flush=True)
