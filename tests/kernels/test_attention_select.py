"""Property tests of jaxcl.kernels.attention_select."""

import jax
import jax.numpy as jnp
import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from jaxcl.kernels import attention_select as sel

SEEDS = st.integers(0, 2**32 - 1)
D = 16
# Jitted once per shape: cheaper than compiling every primitive eagerly, and proves the kernels jit.
select = jax.jit(sel.select)
attention_logits = jax.jit(sel.attention_logits)
kl_to_target = jax.jit(sel.kl_to_target)
query = jax.jit(sel.query)
arm_grad = jax.jit(
    jax.grad(lambda k, q, active, target: sel.kl_to_target(sel.attention_logits(k, q, active), target), argnums=(0, 1))
)


@st.composite
def keys_queries_masks(draw):
    n_tasks, batch, seed = draw(st.sampled_from((1, 3, 6))), draw(st.sampled_from((1, 4))), draw(SEEDS)
    rng = np.random.default_rng(seed)
    active = rng.random((batch, n_tasks)) < 0.6
    active[np.arange(batch), rng.integers(0, n_tasks, batch)] = True  # at least one task per row
    keys = rng.uniform(-1, 1, (n_tasks, D))
    q = 3 * rng.standard_normal((batch, D))
    return jnp.asarray(keys, jnp.float32), jnp.asarray(q, jnp.float32), active


@settings(max_examples=15, deadline=None)
@given(case=keys_queries_masks())
def test_select_is_a_masked_softmax(case):
    keys, q, active = case
    weights = np.asarray(select(keys, q, jnp.asarray(active)))
    np.testing.assert_allclose(weights.sum(-1), 1.0, rtol=1e-6)
    assert np.all(weights[~active] == 0.0)  # unseen tasks get exactly zero
    logits = np.asarray(q, np.float64) @ np.asarray(keys, np.float64).T / np.sqrt(D)
    ref = np.where(active, np.exp(logits - logits.max(-1, keepdims=True)), 0.0)
    np.testing.assert_allclose(weights, ref / ref.sum(-1, keepdims=True), rtol=1e-5, atol=1e-7)
    unmasked = np.asarray(select(keys, q))
    np.testing.assert_allclose(unmasked.sum(-1), 1.0, rtol=1e-6)
    # A (T,) mask broadcasts over the batch.
    first = np.asarray(select(keys, q, jnp.asarray(active[0])))
    assert np.all(first[:, ~active[0]] == 0.0)


@settings(max_examples=15, deadline=None)
@given(case=keys_queries_masks(), seed=SEEDS)
def test_kl_to_target_is_zero_at_target_and_nonnegative(case, seed):
    keys, q, active = case
    logits = attention_logits(keys, q, jnp.asarray(active))
    at_target = kl_to_target(logits, select(keys, q, jnp.asarray(active)))
    np.testing.assert_allclose(float(at_target), 0.0, atol=1e-5)
    rng = np.random.default_rng(seed)
    target = np.where(active, rng.random(active.shape), 0.0)  # zeros where tasks are masked
    target /= target.sum(-1, keepdims=True)
    kl = float(kl_to_target(logits, jnp.asarray(target, jnp.float32)))
    assert kl >= -1e-6 and np.isfinite(kl)
    p = np.asarray(select(keys, q, jnp.asarray(active)), np.float64)
    support = target > 0
    ref = np.sum(target[support] * (np.log(target[support]) - np.log(p[support]))) / target.shape[0]
    np.testing.assert_allclose(kl, ref, rtol=1e-4, atol=1e-5)
    # The ARM gradient reaches queries and keys and stays finite with masked (-inf) logits.
    gk, gq = arm_grad(keys, q, jnp.asarray(active), jnp.asarray(target, jnp.float32))
    assert np.all(np.isfinite(gk)) and np.all(np.isfinite(gq))
    assert np.abs(gq).max() > 0 or active.sum(-1).max() == 1  # a single active task has no gradient


@settings(max_examples=8, deadline=None)
@given(seed=SEEDS, lead=st.sampled_from(((), (3,), (2, 5))))
def test_query_network(seed, lead):
    params = sel.query_init(jax.random.key(seed), D, bottleneck=7)
    assert params.w_down.shape == (D, 7) and params.w_up.shape == (7, D)
    params = params._replace(ln_scale=params.ln_scale * 2.0, ln_bias=params.ln_bias + 0.5)
    e = np.random.default_rng(seed).standard_normal((*lead, D)).astype(np.float32)
    out = np.asarray(query(params, jnp.asarray(e)))
    assert out.shape == (*lead, D)
    h = e.astype(np.float64) @ np.asarray(params.w_down, np.float64) @ np.asarray(params.w_up, np.float64)
    h = h / (1 + np.exp(-h))  # SiLU after the two linears, none between them
    ref = (h - h.mean(-1, keepdims=True)) / np.sqrt(h.var(-1, keepdims=True) + 1e-5) * 2.0 + 0.5
    np.testing.assert_allclose(out, ref, rtol=1e-3, atol=1e-3)


def test_task_key_init_is_uniform_in_unit_box():
    k = np.asarray(sel.task_key_init(jax.random.key(0), 4096))
    assert k.shape == (4096,) and k.min() >= -1 and k.max() <= 1 and k.min() < -0.99 and k.max() > 0.99
