"""The LoRA bank shared by the LoRA-family methods: per-example mixing, freezing, orthogonality."""
import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings, strategies as st

from jaxcl.kernels import lora as lora_kernel
from jaxcl.methods import IncLoRA, MethodState, ModelInfo, OLoRA, PerTask, SeqLoRA, StepContext, TaskInfo
from jaxcl.methods import axes
from jaxcl.methods.lora_bank import Current, LoRA, LoRABank

SHAPES = {"attn.q": (3, 16, 12), "attn.v": (3, 16, 8)}
MODEL = ModelInfo(SHAPES, {"attn.q": ("embed", "q_heads"), "attn.v": ("embed", "kv_heads")}, 16, False)
STEP = StepContext.start(0, 1, 0)


def _trained(key, state):
    """Pretend training happened: give the current LoRA a random non-zero b."""
    lora = {site: l._replace(b=jax.random.normal(jax.random.fold_in(key, i), l.b.shape))
            for i, (site, l) in enumerate(sorted(state.params.lora.items()))}
    return state._replace(params=Current(lora))


def _run_tasks(method, n_tasks, seed=0):
    """``n_tasks`` begin/end cycles with pretend training; one slot more than trained stays empty."""
    key = jax.random.PRNGKey(seed)
    state = axes.values(method.init(key, MODEL, n_tasks + 1))
    history = []
    for t in range(n_tasks):
        info = TaskInfo(t, n_tasks + 1)
        state = method.begin_task(jax.random.fold_in(key, 2 * t + 1), state, info)
        state = _trained(jax.random.fold_in(key, 100 + t), state)
        history.append(state.params.lora)
        state = method.end_task(state, info)
    return state, history


def _delta(method, state, site, x, ctx, layer=0):
    adapter = method.adapter(state, ctx)
    sliced = jax.tree.map(lambda a: a[layer], adapter.params[site])
    return adapter.hook.delta_fn(site, sliced, x, adapter.ctx)


def _own(lora, x, method, layer=0):
    return lora_kernel.apply({"a": lora.a[layer], "b": lora.b[layer]}, x, method.alpha, method.rank)


@settings(max_examples=10, deadline=None)
@given(n_tasks=st.integers(1, 4), seed=st.integers(0, 1000))
def test_inc_lora_sums_every_task_adapter(n_tasks, seed):
    method = IncLoRA(dropout=0.0)
    state, history = _run_tasks(method, n_tasks, seed)
    assert LoRABank.num_slots(state.fixed.past) == n_tasks + 1
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), (2, 5, 16))
    expected = sum(_own(h["attn.q"], x, method) for h in history)
    assert float(jnp.abs(expected).max()) > 0
    np.testing.assert_allclose(_delta(method, state, "attn.q", x, None), expected, rtol=1e-5, atol=1e-5)
    # the current LoRA after end_task is zero: it adds nothing until the next task draws one
    np.testing.assert_array_equal(state.params.lora["attn.q"].b, 0.0)


@settings(max_examples=10, deadline=None)
@given(n_tasks=st.integers(1, 4), seed=st.integers(0, 1000))
def test_per_task_oracle_evaluates_each_example_with_its_own_adapter(n_tasks, seed):
    method = PerTask(dropout=0.0)
    state, history = _run_tasks(method, n_tasks, seed)
    x = jax.random.normal(jax.random.PRNGKey(seed + 1), (n_tasks + 1, 5, 16))
    task_of_example = jnp.arange(n_tasks + 1)  # the last one is an unseen task (empty slot): base model
    ctx = method.eval_ctx(None, state, {"task_ids": task_of_example})
    out = _delta(method, state, "attn.v", x, ctx, layer=1)
    for b in range(n_tasks):
        np.testing.assert_allclose(out[b], _own(history[b]["attn.v"], x[b], method, layer=1), rtol=1e-5, atol=1e-5)
    np.testing.assert_array_equal(out[n_tasks], 0.0)


def test_per_task_training_sends_current_rows_to_the_current_lora_and_replayed_rows_to_their_slot():
    method = PerTask(dropout=0.0)
    state, history = _run_tasks(method, 2)
    state = _trained(jax.random.PRNGKey(5), method.begin_task(jax.random.PRNGKey(4), state, TaskInfo(2, 3)))
    x = jax.random.normal(jax.random.PRNGKey(6), (3, 4, 16))
    batch = {"task_ids": jnp.array([2, 0, 1])}  # a current row, then two replayed rows
    out = _delta(method, state, "attn.q", x, method.train_ctx(None, state, batch, StepContext.start(2, 5, 0)))
    np.testing.assert_allclose(out[0], _own(state.params.lora["attn.q"], x[0], method), rtol=1e-5, atol=1e-5)
    for row, task in ((1, 0), (2, 1)):
        np.testing.assert_allclose(out[row], _own(history[task]["attn.q"], x[row], method), rtol=1e-5, atol=1e-5)
    # A micro-batch of replayed rows only (grad_accum cuts a replaying batch so): the current task
    # comes from the step, not from the batch's largest task id, so no row reaches the current LoRA.
    batch = {"task_ids": jnp.array([0, 1, 1])}
    out = _delta(method, state, "attn.q", x, method.train_ctx(None, state, batch, StepContext.start(2, 5, 0)))
    for row, task in ((0, 0), (1, 1), (2, 1)):
        np.testing.assert_allclose(out[row], _own(history[task]["attn.q"], x[row], method), rtol=1e-5, atol=1e-5)


def test_seq_lora_keeps_one_adapter_and_no_past():
    method = SeqLoRA()
    state, history = _run_tasks(method, 3)
    assert state.fixed == ()
    np.testing.assert_array_equal(state.params.lora["attn.q"].b, history[-1]["attn.q"].b)


def test_dropout_only_in_training():
    method = IncLoRA(dropout=0.5)
    state, _ = _run_tasks(method, 1)
    state = _trained(jax.random.PRNGKey(1), state)
    x = jnp.ones((2, 4, 16))
    train = _delta(method, state, "attn.q", x, None) - _delta(method, state, "attn.q", x, None)
    np.testing.assert_array_equal(train, 0.0)  # evaluation: deterministic
    adapter = method.adapter(state, None, jax.random.PRNGKey(0))
    sliced = jax.tree.map(lambda a: a[0], adapter.params["attn.q"])
    dropped = adapter.hook.delta_fn("attn.q", sliced, x, None)
    assert not np.allclose(dropped, _delta(method, state, "attn.q", x, None))


def test_olora_penalty_is_official_formula():
    method = OLoRA(lambda1=0.5, dropout=0.0)
    state, _ = _run_tasks(method, 2)
    state = method.begin_task(jax.random.PRNGKey(9), state, TaskInfo(2, 3))
    expected = 0.0
    for site in SHAPES:
        past = np.asarray(state.fixed.past[site].a)   # (L, T, r, d)
        new = np.asarray(state.params.lora[site].a)   # (L, r, d)
        for layer in range(past.shape[0]):
            expected += 0.5 * np.abs(past[layer].reshape(-1, past.shape[-1]) @ new[layer].T).sum()
    assert expected > 0
    np.testing.assert_allclose(method.extra_loss(None, state, {}, STEP), expected, rtol=1e-5)


def test_olora_hard_projection_makes_new_rows_orthogonal_to_past():
    method = OLoRA(hard_projection=True, dropout=0.0)
    state, _ = _run_tasks(method, 2)
    state = method.begin_task(jax.random.PRNGKey(9), state, TaskInfo(2, 3))
    # a random "update" breaks orthogonality; post_update restores it
    lora = {s: LoRA(l.a + jax.random.normal(jax.random.PRNGKey(3), l.a.shape), l.b)
            for s, l in state.params.lora.items()}
    before = method.extra_loss(None, state._replace(params=Current(lora)), {}, STEP)
    state = method.post_update(MethodState(Current(lora), state.fixed), STEP)
    for site in SHAPES:
        past = np.asarray(state.fixed.past[site].a)
        new = np.asarray(state.params.lora[site].a)
        for layer in range(past.shape[0]):
            assert np.abs(past[layer].reshape(-1, past.shape[-1]) @ new[layer].T).max() < 1e-4
    assert float(before) > 1.0 and float(method.extra_loss(None, state, {}, STEP)) < 1e-3
