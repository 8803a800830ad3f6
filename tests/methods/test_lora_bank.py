"""The LoRA bank shared by the LoRA-family methods: per-example mixing, freezing, orthogonality."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from jaxcl.kernels import lora as lora_kernel
from jaxcl.methods import IncLoRA, OLoRA, PerTask, SeqLoRA, TaskInfo
from jaxcl.methods.lora_bank import num_slots

SHAPES = {"attn.q": (3, 16, 12), "attn.v": (3, 16, 8)}


def _trained(method, key, state):
    """Pretend training happened: give the current LoRA random non-zero b."""
    lora = jax.tree.map(lambda x: x, state["train"]["lora"])
    for i, site in enumerate(sorted(lora)):
        b = lora[site]["b"]
        lora[site] = dict(lora[site], b=jax.random.normal(jax.random.fold_in(key, i), b.shape))
    return {"train": {"lora": lora}, "fixed": state["fixed"]}


def _run_tasks(method, n_tasks, seed=0):
    key = jax.random.PRNGKey(seed)
    state = method.init(key, SHAPES, n_tasks + 1)  # one slot more than trained: stays empty
    history = []
    for t in range(n_tasks):
        info = TaskInfo(t, n_tasks)
        state = method.begin_task(jax.random.fold_in(key, 2 * t + 1), state, info, SHAPES)
        state = _trained(method, jax.random.fold_in(key, 100 + t), state)
        history.append(jax.tree.map(lambda x: x, state["train"]["lora"]))
        state = method.end_task(state, info)
    return state, history


def _delta(method, state, site, x, ctx):
    adapter = method.adapter(state, ctx)
    layer0 = jax.tree.map(lambda a: a[0], adapter.params[site])
    return adapter.hook.delta_fn(site, layer0, x, ctx)


@settings(max_examples=10, deadline=None)
@given(n_tasks=st.integers(1, 4), seed=st.integers(0, 1000))
def test_inc_lora_sums_every_task_adapter(n_tasks, seed):
    method = IncLoRA(dropout=0.0)
    state, history = _run_tasks(method, n_tasks, seed)
    assert num_slots(state) == n_tasks + 1
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), (2, 5, 16))
    expected = sum(lora_kernel.apply(jax.tree.map(lambda a: a[0], h["attn.q"]), x, method.alpha, method.rank)
                   for h in history)
    np.testing.assert_allclose(_delta(method, state, "attn.q", x, None), expected, rtol=1e-5, atol=1e-5)


@settings(max_examples=10, deadline=None)
@given(n_tasks=st.integers(1, 4), seed=st.integers(0, 1000))
def test_per_task_oracle_routes_each_example_to_its_own_adapter(n_tasks, seed):
    method = PerTask(dropout=0.0)
    state, history = _run_tasks(method, n_tasks, seed)
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), (n_tasks + 1, 5, 16))
    task_of_example = jnp.arange(n_tasks + 1)  # the last one is an unseen task (empty slot): base model
    ctx = jax.nn.one_hot(task_of_example, num_slots(state) + 1)
    out = _delta(method, state, "attn.v", x, {"task_weights": ctx})
    for b in range(n_tasks):
        own = lora_kernel.apply(jax.tree.map(lambda a: a[0], history[b]["attn.v"]), x[b], method.alpha, method.rank)
        np.testing.assert_allclose(out[b], own, rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out[n_tasks], 0.0)


def test_seq_lora_keeps_one_adapter_and_no_past():
    method = SeqLoRA()
    state, history = _run_tasks(method, 3)
    assert "past" not in state["fixed"]
    np.testing.assert_array_equal(state["train"]["lora"]["attn.q"]["b"], history[-1]["attn.q"]["b"])


def test_dropout_only_in_training():
    method = IncLoRA(dropout=0.5)
    state, _ = _run_tasks(method, 1)
    x = jnp.ones((2, 4, 16))
    train = method.adapter(state, None, jax.random.PRNGKey(0))
    assert "key" in train.params["attn.q"]
    assert "key" not in method.adapter(state, None).params["attn.q"]


def test_olora_penalty_is_official_formula():
    method = OLoRA(lambda1=0.5, dropout=0.0)
    state, _ = _run_tasks(method, 2)
    state = method.begin_task(jax.random.PRNGKey(9), state, TaskInfo(2, 3), SHAPES)
    assert float(method.extra_loss(state, None)) > 0
    expected = 0.0
    for site in SHAPES:
        past = state["fixed"]["past"][site]["a"]      # (L, T, r, d)
        new = state["train"]["lora"][site]["a"]       # (L, r, d)
        for layer in range(past.shape[0]):
            rows = past[layer].reshape(-1, past.shape[-1])
            expected += 0.5 * np.abs(np.asarray(rows) @ np.asarray(new[layer]).T).sum()
    np.testing.assert_allclose(method.extra_loss(state, None), expected, rtol=1e-5)


def test_olora_hard_projection_makes_new_rows_orthogonal_to_past():
    method = OLoRA(hard_projection=True, dropout=0.0)
    state, _ = _run_tasks(method, 2)
    state = method.begin_task(jax.random.PRNGKey(9), state, TaskInfo(2, 3), SHAPES)
    # a random "update" breaks orthogonality; post_update restores it
    lora = jax.tree.map(lambda a: a + jax.random.normal(jax.random.PRNGKey(3), a.shape), state["train"]["lora"])
    state = method.post_update({"train": {"lora": lora}, "fixed": state["fixed"]})
    for site in SHAPES:
        past = state["fixed"]["past"][site]["a"]
        new = state["train"]["lora"][site]["a"]
        for layer in range(past.shape[0]):
            overlap = np.asarray(past[layer].reshape(-1, past.shape[-1])) @ np.asarray(new[layer]).T
            assert np.abs(overlap).max() < 1e-4
    assert float(method.extra_loss(state, None)) < 1e-3
